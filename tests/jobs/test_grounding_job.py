"""End to end: spark-submit the job with `--input grounding=...` (COCO + GRIT made by the kind's test),
read the published shards back with the trainer's loader and formatter."""
from __future__ import annotations

import http.server
import json
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.filters.test_grounding_detect import FakeDetector
from tests.jobs.test_build_pretrain import submit
from tests.pipelines.test_grounding import _jpeg, _photo, make_corpus
from tests.util import read_json

pytestmark = pytest.mark.slow


@pytest.fixture()
def detector():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeDetector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/detect"
    server.shutdown()


def test_grounding_job_end_to_end(tmp_path, detector):
    from trainer import formatters
    from trainer.shards import find_kinds, iter_raw_samples

    corpus = make_corpus(str(tmp_path / "in"))
    captions = tmp_path / "in" / "captions"
    captions.mkdir()
    table = pa.table({"key": ["c0"], "caption": ["a cat asleep on a table"], "jpg": [_jpeg(_photo("chelsea"))]})
    pq.write_table(table, str(captions / "captions.parquet"))  # no spans: the served detector boxes them
    out = str(tmp_path / "out")
    submit("--input", f"grounding={corpus['coco']}", "--input", f"grounding={corpus['grit']}",
           "--input", f"grounding={captions}", "--output", out, "--set", f"grounding.detector.endpoint={detector}",
           "--set", "grounding.dedup_enabled=false", "--set", "grounding.boxes.min_score=0.3")
    summary = read_json(os.path.join(out, "reports", "summary.json"))
    k = summary["kinds"]["grounding"]
    assert k["input"] == 6 + 5 + 1 and k["kept"] == 6  # COCO 1, 4, 5; GRIT g0, g4; the detector's c0
    assert summary["gates"]["passed"]
    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    assert {r["unit"] for r in ledger} == {"image", "box"} and len(ledger) == 12 + 15 + 10 + 2
    found = find_kinds(os.path.join(out, "shards"), ["grounding"])["grounding"]
    samples = list(iter_raw_samples([f.url for f in found]))
    assert len(samples) == 6
    (c0,) = [s for s in samples if json.loads(s["json"])["source_key"] == "c0"]
    assert json.loads(c0["json"])["source_format"] == "captions"
    assert c0["txt"].decode() == ("a cat<|begin_of_box|>[[100,100,500,900]]<|end_of_box|> asleep on a "
                                  "table<|begin_of_box|>[[0,600,999,999]]<|end_of_box|>")
    for s in samples:
        text = formatters.get("grounding").texts(s)[0]
        assert text == s["txt"].decode() and text.count("<|begin_of_box|>") >= 2
    with open(os.path.join(out, "reports", "index.html"), encoding="utf-8") as f:
        page = f.read()
    assert "too_few_boxes" in page and "box_invalid" in page
