"""End to end: spark-submit the job with `--input grounding=...` (COCO + GRIT made by the kind's test),
read the published shards back with the trainer's loader and formatter."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from tests.jobs.test_build_pretrain import submit
from tests.pipelines.test_grounding import make_corpus

pytestmark = pytest.mark.slow


def test_grounding_job_end_to_end(tmp_path):
    from trainer import formatters
    from trainer.shards import find_kinds, iter_raw_samples

    corpus = make_corpus(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    submit("--input", f"grounding={corpus['coco']}", "--input", f"grounding={corpus['grit']}", "--output", out,
           "--set", "grounding.dedup_enabled=false", "--set", "grounding.boxes.min_score=0.3")
    summary = json.load(open(os.path.join(out, "reports", "summary.json")))
    k = summary["kinds"]["grounding"]
    assert k["input"] == 6 + 5 and k["kept"] == 5  # COCO 1, 4, 5; GRIT g0, g4
    assert summary["gates"]["passed"]
    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    assert {r["unit"] for r in ledger} == {"image", "box"} and len(ledger) == 11 + 14 + 10
    found = find_kinds(os.path.join(out, "shards"), ["grounding"])["grounding"]
    samples = list(iter_raw_samples([f.url for f in found]))
    assert len(samples) == 5
    for s in samples:
        text = formatters.get("grounding").texts(s)[0]
        assert text == s["txt"].decode() and text.count("<|begin_of_box|>") >= 2
    page = open(os.path.join(out, "reports", "index.html"), encoding="utf-8").read()
    assert "too_few_boxes" in page and "box_invalid" in page
