"""End to end: spark-submit the job with `--input gui=...` (HTML pages, a debian-handbook page, a WARC),
read the published shards back with the trainer's formatter and check the report names the reasons."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from tests.jobs.test_build_pretrain import submit
from tests.pipelines.test_gui import HANDBOOK, make_corpus
from tests.util import read_json

pytestmark = pytest.mark.slow


def test_gui_job_end_to_end(tmp_path):
    from trainer import formatters
    from trainer.shards import find_kinds, iter_raw_samples

    corpus = make_corpus(str(tmp_path / "in"), port=9)  # the URL list is not read here
    out = str(tmp_path / "out")
    submit("--input", f"gui={HANDBOOK}", "--input", f"gui={corpus['pages']}", "--input", f"gui={corpus['warc']}",
           "--output", out, "--set", "gui.viewports=['desktop:1024x768@1', 'phone:390x844@2']",
           "--set", "gui.renders_per_page=1", "--set", "gui.render.load_timeout_s=3", "--set", "gui.ocr.elements=2")
    summary = read_json(os.path.join(out, "reports", "summary.json"))
    k = summary["kinds"]["gui"]
    assert summary["gates"]["passed"]
    assert k["units"]["page"]["input"] == 1 + 5 + 1 and k["units"]["render"]["input"] == 7
    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    reasons = {r["reason"] for r in ledger}
    assert {"not_html", "render_timeout", "too_few_elements", "no_render_kept"} <= reasons
    found = find_kinds(os.path.join(out, "shards"), ["gui"])["gui"]
    samples = list(iter_raw_samples([f.url for f in found]))
    assert 3 <= len(samples) <= 4  # handbook, shop, form (its copy: a duplicate when drawn the same viewport)
    for s in samples:
        assert formatters.get("gui").texts(s) == [s["txt"].decode()] and "<|begin_of_box|>" in s["txt"].decode()
    with open(os.path.join(out, "reports", "index.html"), encoding="utf-8") as f:
        page = f.read()
    assert "render_timeout" in page and "too_few_elements" in page
