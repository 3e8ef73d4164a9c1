"""The video kind on the spine: real clips and broken files through recipe, integrity, scenes, frames,
dedup, ledger (video and clip units), gates, report and the trainer's formatter."""
from __future__ import annotations

import io
import json
import os

import av
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import kinds
from pipelines import video as V
from pipelines.build import run_build
from pipelines.recipe import load
from schemas import video as S
from schemas.common import make_sample_id
from tests import video_media as M


@pytest.fixture(scope="module")
def video_run(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("video")
    corpus = tmp / "corpus"
    M.good_folder(str(corpus / "folder"))
    M.broken_files(str(corpus / "broken"))
    # video2dataset-style: {key}.mp4 + .txt + .json with clip spans
    v2d = corpus / "v2d"
    v2d.mkdir()
    M.ffmpeg("-i", M.BUNNY, "-c", "copy", str(v2d / "000001.mp4"))
    (v2d / "000001.txt").write_text("a big rabbit wakes up")
    (v2d / "000001.json").write_text(json.dumps({"key": "000001", "clips": [[0.0, 2.0], [2.5, 0.2], [3.0, 5.0]]}))
    # a table (Panda-70M style): a path, per-span captions, timestamps as strings; a row whose file is missing
    table = corpus / "table"
    table.mkdir()
    M.ffmpeg("-i", M.CARPHONE, "-t", "3", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-vf", "hflip",
             str(table / "flipped.mp4"))
    pq.write_table(pa.Table.from_pylist([
        {"path": "flipped.mp4", "caption": ["the caller on the left", "the caller talks on"],
         "timestamp": [["0:00:00.000", "0:00:01.500"], ["0:00:01.500", "0:00:03.000"]]},
        {"path": "gone.mp4", "caption": ["nothing"], "timestamp": [["0:00:00.000", "0:00:01.000"]]},
    ]), str(table / "clips.parquet"))
    out = str(tmp / "out")
    assert kinds.get("video") is V.KIND  # registered in pipelines/kinds.py
    recipe = load(None, ["shards.max_samples=8", "video.scenes.max_seconds=3", "video.frames.max_side=128",
                         "video.dedup.clip.pretrained=", "video.write_clip=true", "video.cut.max_side=96"],
                  [f"video={corpus}"], out)
    summary = run_build(spark, recipe, dict(recipe.inputs), out)
    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    return out, summary, ledger


def _by_key(ledger):
    return {r["source_key"]: r for r in ledger}


def test_every_integrity_failure_has_its_own_reason(video_run):
    _, _, ledger = video_run
    by = _by_key(ledger)
    want = {"empty": "video_empty", "unreadable": "video_unreadable", "audio_only": "video_audio_only",
            "zero_duration": "video_zero_duration", "truncated": "video_broken"}
    for key, reason in want.items():
        assert (by[key]["status"], by[key]["reason"], by[key]["unit"]) == ("quarantined", reason, "video"), key
        assert by[key]["detail"]
    assert by["row0000001"]["reason"] == "read_error" and "gone.mp4" in by["row0000001"]["detail"]
    assert not any(r["parent_id"] in {by[k]["sample_id"] for k in want} for r in ledger)  # no clips of them


def test_scenes_become_clips_with_bounds_and_reasons(video_run):
    _, _, ledger = video_run
    by = _by_key(ledger)
    bikes = [r for r in ledger if r["source_key"].startswith("bikes#clip")]
    # six shots; the 61-frame shot (2.44 s) fits in 3 s; none longer; the last shot (8 frames) is too short
    assert len(bikes) == 6
    assert by["bikes#clip0005"]["reason"] == "clip_too_short"
    assert all(r["parent_id"] == by["bikes"]["sample_id"] and r["unit"] == "clip" for r in bikes)
    assert by["bikes"]["status"] == "kept" and by["bikes"]["shard"]
    # ids: the same rule as every item id (make_sample_id), from dataset/relative path and the clip's key
    assert by["bikes#clip0000"]["sample_id"] == make_sample_id("video", "corpus/folder/bikes.mp4", "bikes#clip0000")
    # video2dataset spans: [2.5, 0.2] ends before it starts (skipped); 0-2 s and 3-5 s are clips
    v2d = sorted(k for k in by if k.startswith("000001#clip"))
    assert v2d == ["000001#clip0000", "000001#clip0001"]


def test_dedup_needs_both_frames_and_caption(video_run):
    _, _, ledger = video_run
    by = _by_key(ledger)
    small, same, other = by["carphone_small#clip0000"], by["carphone#clip0000"], by["carphone_other#clip0000"]
    # the re-encoded, smaller copy with the same caption goes; the copy with another caption stays
    assert (small["status"], small["reason"], small["duplicate_of"]) == ("dropped", "near_duplicate", same["sample_id"])
    assert (by["carphone_small"]["status"], by["carphone_small"]["reason"]) == ("dropped", "no_clip_kept")
    assert other["status"] == "kept" and same["status"] == "kept"


def test_accounting_and_gates(video_run):
    _, summary, ledger = video_run
    k = summary["kinds"]["video"]
    assert k["unit"] == "video" and k["units"]["video"]["input"] == 12  # 4 + 5 + 1 + 2 table rows
    assert k["read"] == {"units": 4, "items": 12}
    clips = [r for r in ledger if r["unit"] == "clip"]
    assert k["units"]["clip"]["input"] == len(clips)
    assert k["shards"]["samples"] == sum(r["status"] == "kept" for r in clips)
    g = summary["gates"]
    assert g["passed"], g["failed_critical"]
    names = {c["name"] for s in g["suites"].values() for c in s["expectations"]}
    assert {"video.shards.contract", "video.totals.kept_equals_shard_samples"} <= names


def test_shards_hold_frames_json_and_pass_the_trainer_formatter(video_run):
    out, _, ledger = video_run
    from trainer import formatters, shards
    from trainer.formatters import FormatContext
    from trainer.images import ImageConfig
    from trainer.tokenizer import train_bpe

    found = shards.find_kinds(os.path.join(out, "shards"), ["video"])["video"]
    samples = list(shards.iter_raw_samples([s.url for s in found]))
    contract = S.contract(V.Video())
    assert samples and all(contract.violations(s) == [] for s in samples)
    table = {s["__key__"]: json.loads(s["json"]) for s in samples}
    by = _by_key(ledger)
    flipped = table[by["row0000000#clip0001"]["sample_id"]]
    assert flipped["caption"] == "the caller talks on" and flipped["clip_start"] == pytest.approx(1.5, abs=0.04)
    for s in samples:
        doc = json.loads(s["json"])
        frames = sorted(e for e in s if e.endswith(".jpg"))
        assert len(frames) == len(doc["frame_indices"]) and len(frames) % 2 == 0
        assert len(doc["timestamps"]) * 2 == len(frames)
        assert Image.open(io.BytesIO(s[frames[0]])).size == (doc["frame_width"], doc["frame_height"])
        assert max(doc["frame_width"], doc["frame_height"]) <= 128
        assert doc["clip_start_frame"] <= doc["frame_indices"][0] < doc["clip_end_frame"]
        with av.open(io.BytesIO(s["mp4"])) as clip:  # write_clip: the clip itself, cut frame-exact
            assert sum(1 for _ in clip.decode(video=0)) == doc["clip_end_frame"] - doc["clip_start_frame"]
    tok = train_bpe([t for s in samples for t in formatters.get("video").texts(s) if t] * 20, vocab_size=300,
                    min_frequency=1)
    ctx = FormatContext(tok, ImageConfig(min_pixels=4 * 784, max_pixels=16 * 784), max_len=4096)
    for s in samples:
        doc = json.loads(s["json"])
        f = formatters.get("video").format(s, ctx)
        assert f.ids[0] == tok.begin_video_id and len(f.images) == len(doc["timestamps"])
        text = tok.decode(f.ids)
        assert "".join(str(t) for t in doc["timestamps"]) in "".join(c for c in text if c.isdigit())


def test_embedding_tier_drops_only_when_video_and_text_are_both_near(spark):
    from pyspark.sql import functions as F

    from filters.video_embed import TEXT_EMBEDDING, VIDEO_EMBEDDING

    def clip(i, caption, video, text, frames=4):
        return {"sample_id": f"{i:032x}", S.FRAME_PHASH: [7, 7, 9, 9][:frames], S.CAPTION: caption,
                S.FRAME_INDICES: list(range(frames)), S.WIDTH: 64, S.HEIGHT: 48,
                VIDEO_EMBEDDING: video, TEXT_EMBEDDING: text}

    rows = [clip(1, "a", [1.0, 0.0], [1.0, 0.0]),  # the keeper
            clip(2, "b", [1.0, 0.0], [0.99, 0.141], frames=2),  # both near: dropped
            clip(3, "c", [1.0, 0.0], [0.0, 1.0], frames=2),  # same video, other text: kept
            clip(4, "a", [0.0, 1.0], [1.0, 0.0], frames=2)]  # same text, other video: kept
    df = spark.createDataFrame(rows, "sample_id string, frame_phash array<bigint>, caption string, "
                                     "frame_indices array<bigint>, width int, height int, "
                                     "video_embedding array<float>, text_embedding array<float>")
    cfg = V.VideoDedup(video_threshold=0.95, text_threshold=0.95)
    got = {r["sample_id"]: r["duplicate_of"] for r in V.clip_duplicates(df, cfg, embeddings=True).collect()}
    assert got == {f"{2:032x}": f"{1:032x}"}
    # without embeddings the captions must be equal (after normalising): only clip 4 goes
    got = {r["sample_id"] for r in V.clip_duplicates(df.withColumn(S.CAPTION, F.upper(S.CAPTION)), cfg).collect()}
    assert got == {f"{4:032x}"}
    # no chaining: 0x3F is 6 bits from 0 and from 0xFFF, which is 12 bits from 0: the middle one goes, the last stays
    chain = [{**clip(i, "same", None, None, frames=f), S.FRAME_PHASH: [h] * f}
             for i, h, f in ((5, 0, 6), (6, 0x3F, 4), (7, 0xFFF, 2))]
    stats = {}
    got = {r["sample_id"]: r["duplicate_of"]
           for r in V.clip_duplicates(spark.createDataFrame(chain, df.schema), cfg, stats=stats).collect()}
    assert got == {f"{6:032x}": f"{5:032x}"} and stats["skipped"] == 0


def test_report_shows_the_kind(video_run):
    out, _, _ = video_run
    with open(os.path.join(out, "reports", "index.html"), encoding="utf-8") as f:
        page = f.read()
    for anchor in ("kind-video", "units-video", "plot-clip_seconds", "plot-frames_sampled"):
        assert f"id='{anchor}'" in page, anchor
    assert "video_audio_only" in page and "clip_too_short" in page
