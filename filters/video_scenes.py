"""Scene cuts: a video becomes clips with frame bounds (PySceneDetect's content detector, PyAV backend).

Reads `path`, the probed rate (`fps_num`/`fps_den`) and `spans` (clip bounds in seconds the input
gave, e.g. video2dataset's `clips` or a table's `timestamp`; null: detect). Every frame of the video is
decoded here, so this is also the full-decode integrity check: a decode error, or fewer frames than
`min_decoded_share` of those ffprobe declared, is `video_broken`. Writes `num_frames` (decoded
frames: the true count), `clip_starts` / `clip_ends` (frame numbers, end exclusive) and `error`.

Bounds: a scene longer than `max_seconds` is cut into equal parts no longer than it (a 40-minute
single-shot video must not become one straggling clip); scenes shorter than `min_seconds` are kept as
clips here and dropped by the pipeline's rule (`clip_too_short`), so the ledger shows them.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction
from typing import Any, ClassVar

import pyarrow as pa

from filters.base import Stage
from schemas import video as S
from schemas.common import ERROR, ERROR_DETAIL


def split_long(start: int, end: int, max_frames: int) -> list[tuple[int, int]]:
    """[start, end) cut into the fewest equal parts of at most max_frames frames."""
    n = max(1, math.ceil((end - start) / max_frames))
    bounds = [start + (end - start) * k // n for k in range(n + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


@dataclasses.dataclass(frozen=True)
class DetectScenes(Stage):
    """The recipe section `video.scenes`."""

    name: ClassVar[str] = "video_scenes"
    detect: bool = True  # false: one clip per video (or the input's spans), still cut at max_seconds
    threshold: float = 27.0  # ContentDetector: mean HSV change between frames that makes a cut
    min_scene_frames: int = 8  # the detector's own minimum (frames) between two cuts
    min_seconds: float = 1.0  # shorter clips are dropped (clip_too_short)
    max_seconds: float = 60.0  # longer scenes are cut into equal parts no longer than this
    downscale: int = 0  # the detector's frame downscale; 0: PySceneDetect picks one from the width
    min_decoded_share: float = 0.9  # fewer decoded frames than this share of the declared ones: video_broken

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.NUM_FRAMES, pa.int64()), pa.field(S.CLIP_STARTS, pa.list_(pa.int64())),
                pa.field(S.CLIP_ENDS, pa.list_(pa.int64())), pa.field(S.CLIP_SPANS, pa.list_(pa.int32())),
                pa.field(ERROR, pa.string()),
                pa.field(ERROR_DETAIL, pa.string())]

    def scenes(self, path: str, fps: Fraction, declared: int, spans: list | None) -> dict[str, Any]:
        from scenedetect import ContentDetector, SceneManager, open_video

        video = open_video(path, backend="pyav")
        manager = SceneManager()
        if self.downscale:
            manager.auto_downscale, manager.downscale = False, self.downscale
        if self.detect and not spans:
            manager.add_detector(ContentDetector(threshold=self.threshold, min_scene_len=self.min_scene_frames))
        decoded = manager.detect_scenes(video)  # decodes every frame, with or without a detector
        if decoded < self.min_decoded_share * declared:
            raise ValueError(f"decoded {decoded} of {declared} declared frames")
        if spans:  # (start, end, index of the span): a span's clips keep its caption
            cuts = [(max(0, round(a * fps)), min(decoded, round(b * fps)), k) for k, (a, b) in enumerate(spans)]
            cuts = [c for c in cuts if c[1] > c[0]]
        else:
            cuts = [(a.frame_num, b.frame_num, None) for a, b in manager.get_scene_list()] or [(0, decoded, None)]
        limit = max(1, math.floor(self.max_seconds * fps))
        clips = [(*part, k) for a, b, k in cuts for part in split_long(a, min(b, decoded), limit)]
        return {S.NUM_FRAMES: decoded, S.CLIP_STARTS: [c[0] for c in clips], S.CLIP_ENDS: [c[1] for c in clips],
                S.CLIP_SPANS: [c[2] for c in clips]}

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        cols: dict[str, list] = {f.name: [] for f in self.adds()}
        rows = batch.select([S.PATH, S.FPS_NUM, S.FPS_DEN, S.NUM_FRAMES, S.SPANS, ERROR, ERROR_DETAIL]).to_pylist()
        for r in rows:
            out: dict[str, Any] = {S.NUM_FRAMES: r[S.NUM_FRAMES], ERROR: r[ERROR], ERROR_DETAIL: r[ERROR_DETAIL]}
            if r[ERROR] is None:
                spans = [(s["start"], s["end"]) for s in r[S.SPANS]] if r[S.SPANS] else None
                try:
                    out.update(self.scenes(r[S.PATH], Fraction(r[S.FPS_NUM], r[S.FPS_DEN]), r[S.NUM_FRAMES], spans))
                except Exception as e:  # noqa: BLE001 - PyAV/PySceneDetect raise many kinds on damaged streams
                    out.update({ERROR: "video_broken", ERROR_DETAIL: f"{type(e).__name__}: {e}"[:300]})
            for name, values in cols.items():
                values.append(out.get(name))
        return cols
