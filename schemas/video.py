"""Video: a video file (unit `video`, the input item) and its clips (unit `clip`, sub-items with
`parent_id` = the video). A sample is one clip: its GLM-4.1V-sampled frames and the json below.

Readers produce RAW (one row per video); the probe, scene and frame stages add the columns below.
"""
from __future__ import annotations

import itertools

import pyarrow as pa

from schemas import ledger as L
from schemas.common import ERROR_FIELDS, IDENTITY_FIELDS, READ_UNIT, SAMPLE_ID_REGEX
from schemas.contract import Check, Contract, Field, Member

KIND = "video"
VIDEO_UNIT, CLIP_UNIT = "video", "clip"
UNITS = (VIDEO_UNIT, CLIP_UNIT)  # the input item first (spine rule); samples are clips (Kind.sample_unit)

PATH = "path"  # the local file
ID_SOURCE = "id_source"  # dataset/relative path: what the item's and its clips' sample ids are made from
CAPTION = "caption"
META = "meta"  # the item's side-car / row fields, JSON text
SPANS = "spans"  # clip bounds the input gave, seconds ([{start, end, caption}]); null: scene detection decides
SPAN = pa.struct([pa.field("start", pa.float64()), pa.field("end", pa.float64()), pa.field("caption", pa.string())])

RAW = pa.schema(
    IDENTITY_FIELDS
    + [
        pa.field(L.UNIT, pa.string()), pa.field(L.PARENT_ID, pa.string()),
        pa.field(PATH, pa.string()), pa.field(ID_SOURCE, pa.string()), pa.field(CAPTION, pa.string()),
        pa.field(META, pa.string()), pa.field(SPANS, pa.list_(SPAN)), pa.field(READ_UNIT, pa.string()),
    ]
    + ERROR_FIELDS
)

# filters.video_probe.ProbeVideo
DURATION, FPS_NUM, FPS_DEN, WIDTH, HEIGHT, NUM_FRAMES, CODEC, HAS_AUDIO, FILE_BYTES = (
    "duration", "fps_num", "fps_den", "width", "height", "num_frames", "codec", "has_audio", "file_bytes")
# filters.video_scenes.DetectScenes (per video), then one row per clip
CLIP_STARTS, CLIP_ENDS, CLIP_SPANS = "clip_starts", "clip_ends", "clip_spans"  # clip_spans: the input span
CLIP_INDEX, CLIP_START, CLIP_END = "clip_index", "clip_start", "clip_end"  # frame bounds, end exclusive
# filters.video_frames.SampleFrames (per clip)
FRAMES, FRAME_SIZES, FRAME_INDICES, TIMESTAMPS, FRAME_PHASH, FRAME_WIDTH, FRAME_HEIGHT = (
    "frames", "frame_sizes", "frame_indices", "timestamps", "frame_phash", "frame_width", "frame_height")
STRIP = "strip"  # a 2 x 2 sheet of frames: the report's thumbnail of a clip
CLIP_MP4 = "clip_mp4"  # filters.video_frames.CutClip (video.write_clip): the clip as MP4

# --- ledger: units and reasons ---------------------------------------------------------------------
_q, _d = L.QUARANTINED, L.DROPPED
INTEGRITY = (
    L.Reason("video_empty", _q, "integrity", "zero-byte video file"),
    L.Reason("video_unreadable", _q, "integrity", "ffprobe cannot parse the file (not a media file, header cut off)"),
    L.Reason("video_audio_only", _q, "integrity", "the file has audio streams but no video stream"),
    L.Reason("video_zero_duration", _q, "integrity", "ffprobe finds no duration or no frames"),
    L.Reason("video_bad_stream", _q, "integrity",
             "frame size or rate outside video.probe.min_side..max_side / min_fps..max_fps", shows=("width", "fps")),
    L.Reason("video_broken", _q, "integrity", "decoding the video fails, or yields fewer than "
             "video.scenes.min_decoded_share of its declared frames"),
    L.Reason("video_too_long", _d, "integrity", "longer than video.probe.max_seconds", shows=("duration",)),
)
CLIPS = (
    L.Reason("clip_too_short", _d, "scenes", "scene shorter than video.scenes.min_seconds", shows=("clip_seconds",)),
    L.Reason("clip_decode_failed", _q, "frames", "a sampled frame of the clip cannot be decoded"),
)
VIDEO_END = (
    L.Reason("no_clip_kept", _d, "structure", "every clip of the video was dropped or quarantined"),
)
REASONS = L.reasons(L.READ, L.DOWNLOAD, INTEGRITY, CLIPS, L.DEDUP, L.STRUCTURE, VIDEO_END)

FRAME_MEMBER = r"\d{4}\.jpg"


def frame_exts(doc_or_n) -> list[str]:
    """Frame member names in order: 0000.jpg, 0001.jpg, ..."""
    n = doc_or_n if isinstance(doc_or_n, int) else len(doc_or_n["frame_indices"])
    return [f"{i:04d}.jpg" for i in range(n)]


def _frames_match(members: dict, doc: dict) -> bool:
    found = sorted(e for e in members if not e.startswith("__") and e.endswith(".jpg"))
    return found == frame_exts(doc)


def _timestamps_ok(members: dict, doc: dict) -> bool:
    ts = doc["timestamps"]
    return len(ts) * 2 == len(doc["frame_indices"]) and all(a <= b for a, b in itertools.pairwise(ts))


def contract(cfg=None, facts: dict | None = None) -> Contract:
    """The shard contract of a clip sample. `cfg`: the recipe section (video.frames bounds)."""
    max_frames = getattr(getattr(cfg, "frames", None), "max_frames", 600) + 1  # padding adds at most one
    max_side = getattr(getattr(cfg, "frames", None), "max_side", 448)
    return Contract(
        kind=KIND,
        members=(
            Member("0000.jpg", "jpeg", pattern=FRAME_MEMBER, thumbnail=True,
                     description="the sampled frames in order, {sample_id}.0000.jpg ..."),
            Member("txt", "text", required=False, description="the caption, when the input has one"),
            Member("mp4", "mp4", required=False, description="the clip itself (video.write_clip)"),
            Member("json", "json"),
        ),
        fields=(
            Field("sample_id", "str", False, regex=SAMPLE_ID_REGEX),
            Field("video_id", "str", False, regex=SAMPLE_ID_REGEX, description="the clip's video (ledger parent)"),
            Field("source", "str", False), Field("source_key", "str", False),
            Field("clip_index", "int", False, 0, None),
            Field("clip_start_frame", "int", False, 0, None), Field("clip_end_frame", "int", False, 1, None),
            Field("clip_start", "float", False, 0, None, description="seconds"),
            Field("clip_end", "float", False, 0, None, description="seconds"),
            Field("source_fps", "float", False, 0, None), Field("source_fps_fraction", "str", False, regex=r"\d+/\d+"),
            Field("source_width", "int", False, 1, None), Field("source_height", "int", False, 1, None),
            Field("frame_width", "int", False, 1, max_side), Field("frame_height", "int", False, 1, max_side),
            Field("frame_indices", "list", False, items=Field("frame_index", "int", False, 0, None)),
            Field("timestamps", "list", False, items=Field("timestamp", "int", False, 0, None),
                  description="one per frame pair, whole seconds from the clip start"),
            Field("caption", "str", True),
            Field("meta", "any", True),
            Field("clip_seconds", "float", True, 0, None, derive=lambda d: d["clip_end"] - d["clip_start"],
                  plot="hist", description="clip length, seconds"),
            Field("frames_sampled", "int", True, 2, max_frames, derive=lambda d: len(d["frame_indices"]),
                  plot="hist", description="frames sampled per clip"),
        ),
        checks=(
            Check("even_frame_count", "an even number of frames, one member per sampled index",
                  lambda m, d: len(d["frame_indices"]) % 2 == 0 and _frames_match(m, d)),
            Check("timestamps_per_pair", "one integer timestamp per frame pair, non-decreasing", _timestamps_ok),
            Check("txt_is_caption", "a .txt member exactly when the json has a caption, with its text",
                  lambda m, d: (m["txt"].decode() == d["caption"]) if d["caption"] else "txt" not in m),
        ),
        text_field="caption",
    )
