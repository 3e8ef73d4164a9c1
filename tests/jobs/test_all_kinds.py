"""One run, every kind: spark-submit with an input of each of the six kinds, published together, each
kind accounted for, gated and readable by the trainer."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from tests.jobs.test_build_pretrain import submit
from tests.util import read_json

pytestmark = pytest.mark.slow

HANDBOOK = "/usr/share/doc/debian-handbook/html/en-US"


def test_one_run_curates_every_kind(sample_dir, tmp_path):
    import shutil

    import skvideo

    from tests.pipelines.test_grounding import make_corpus
    from trainer import formatters
    from trainer.shards import find_kinds, iter_raw_samples

    pages = tmp_path / "pages"
    pages.mkdir()
    for name in ("apt.html", "sect.apt-get.html"):
        shutil.copy(os.path.join(HANDBOOK, name), pages / name)
    text = tmp_path / "text"
    text.mkdir()
    (text / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog.\n\n"
                                     "Curating data for vision-language models needs care.\n")
    videos = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data")
    grounding = make_corpus(str(tmp_path / "grounding"))
    out = str(tmp_path / "out")
    submit("--input", f"image_text={sample_dir}", "--input", f"video={videos}", "--input", f"gui={pages}",
           "--input", f"interleaved={pages}", "--input", f"ocr=synthetic:{text}",
           "--input", f"grounding={grounding['coco']}", "--output", out,
           "--set", "image_text.clip.pretrained=", "--set", "interleaved.clip.pretrained=",
           "--set", "video.dedup.clip.pretrained=", "--set", "grounding.dedup_enabled=false")
    summary = read_json(os.path.join(out, "reports", "summary.json"))
    kinds = {"image_text", "video", "gui", "interleaved", "ocr", "grounding"}
    assert set(summary["kinds"]) == kinds and summary["gates"]["passed"]
    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    assert {r["kind"] for r in ledger} == kinds
    assert len({r["sample_id"] for r in ledger}) == len(ledger)  # ids never collide across kinds
    for kind, k in summary["kinds"].items():
        for unit, u in k["units"].items():  # every item of every unit accounted for, by its own kind
            rows = [r for r in ledger if r["kind"] == kind and r["unit"] == unit]
            assert u["input"] == len(rows) == u["kept"] + sum(u["dropped"].values()) + sum(u["quarantined"].values())
        assert f"{kind} features" in summary["phases"]
    assert summary["kinds"]["image_text"]["input"] == 40 and summary["kinds"]["video"]["input"] == 4
    assert summary["kinds"]["gui"]["input"] == 2 and summary["kinds"]["interleaved"]["input"] == 2
    # every kind with kept samples is published in its own folder and read by its trainer formatter
    published = {k for k, v in summary["kinds"].items() if v["shards"]["samples"]}
    assert published >= {"image_text", "video", "gui", "ocr", "grounding"}
    found = find_kinds(os.path.join(out, "shards"), sorted(published))
    for kind in published:
        samples = list(iter_raw_samples([f.url for f in found[kind]]))
        assert len(samples) == summary["kinds"][kind]["shards"]["samples"]
        assert all(formatters.get(kind).texts(s) for s in samples)
