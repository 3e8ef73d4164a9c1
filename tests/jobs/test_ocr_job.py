"""End to end: spark-submit the job with `--input ocr=...` (a text corpus and a photo folder), then read the
published shards back with the trainer's loader and formatter."""
from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from tests.jobs.test_build_pretrain import submit

pytestmark = pytest.mark.slow

SKIMAGE = os.path.join(os.path.dirname(__import__("skimage").__file__), "data")


def test_ocr_job_publishes_shards_the_trainer_reads(tmp_path):
    texts, photos, out = tmp_path / "texts", tmp_path / "photos", str(tmp_path / "out")
    texts.mkdir()
    photos.mkdir()
    (texts / "notes.txt").write_text("Curating data is most of the work.\n\nThe model only sees what survives.\n\n"
                                     "天气很好，我们去公园散步。", encoding="utf-8")
    shutil.copy(os.path.join(SKIMAGE, "motorcycle_left.png"), photos / "bike.png")
    shutil.copy(os.path.join(SKIMAGE, "astronaut.png"), photos / "astronaut.png")
    submit("--input", f"ocr=synthetic:{texts}", "--input", f"ocr=scene:{photos}", "--output", out,
           "--set", "ocr.chunk_chars=40", "--set", "ocr.synthetic.orientations=[0]",
           "--set", "ocr.synthetic.orientation_weights=[1.0]", "--set", "ocr.synthetic.width=[800,1000]")
    with open(os.path.join(out, "reports", "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    k = summary["kinds"]["ocr"]
    assert summary["gates"]["passed"] and k["input"] == 5 and k["read"]["items"] == 5
    ledger = {r["source_key"]: (r["status"], r["reason"]) for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()}
    assert ledger["astronaut"] == ("dropped", "no_text_detected") and ledger["bike"] == ("kept", None)
    assert [ledger[f"chunk00000{i}"][0] for i in range(3)] == ["kept"] * 3

    from trainer import formatters, shards
    from trainer.formatters import FormatContext
    from trainer.images import ImageConfig
    from trainer.tokenizer import train_bpe

    found = shards.find_kinds(os.path.join(out, "shards"), ["ocr"])["ocr"]
    samples = list(shards.iter_raw_samples([s.url for s in found]))
    assert len(samples) == 4 == k["kept"]
    fmt = formatters.get("ocr")
    tok = train_bpe([t for s in samples for t in fmt.texts(s)] * 20, vocab_size=300, min_frequency=1)
    ctx = FormatContext(tok, ImageConfig(min_pixels=4 * 784, max_pixels=16 * 784), max_len=512)
    texts_read = {tok.decode(fmt.format(s, ctx).ids) for s in samples}
    assert any(t.endswith("The model only sees what survives.<|endoftext|>") for t in texts_read)
    assert any(t.endswith("天气很好,我们去公园散步。<|endoftext|>") for t in texts_read)
