"""Integrity of a video file: ffprobe (through ffmpeg-python) must find a video stream of sane size,
frame rate and duration.

Reads `path` (a local file) and the row's `error`; writes the stream's facts (`duration`, exact frame
rate `fps_num`/`fps_den`, `width`, `height`, `num_frames` as declared or estimated, `codec`,
`has_audio`, `file_bytes`) and `error`: one reason per way a file fails, each quarantined:
`video_empty` (zero bytes), `video_unreadable` (ffprobe cannot parse it: not a media file, a header
cut off), `video_audio_only` (streams, none of them video), `video_zero_duration` (no duration or no
frames), `video_bad_stream` (size or frame rate out of range) and `video_too_long` (above
`max_seconds`, dropped). Whether the frames decode is checked by `filters.video_scenes` (every frame
of the video) and `filters.video_frames` (every sampled frame).
"""
from __future__ import annotations

import dataclasses
import math
import os
from fractions import Fraction
from typing import Any, ClassVar

import pyarrow as pa

from filters.base import Stage
from schemas import video as S
from schemas.common import ERROR, ERROR_DETAIL


class VideoError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _rate(text: str | None) -> Fraction | None:
    try:
        r = Fraction(text)  # "30000/1001", "25/1"; "0/0" raises
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return r if r > 0 else None


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclasses.dataclass(frozen=True)
class ProbeVideo(Stage):
    """The recipe section `video.probe`."""

    name: ClassVar[str] = "video_probe"
    min_side: int = 16  # pixels; a stream smaller than this is not a usable video
    max_side: int = 8192
    min_fps: float = 1.0
    max_fps: float = 240.0
    max_seconds: float = 4 * 3600.0  # longer files are dropped (video_too_long) before any decode
    timeout_s: float = 60.0

    def adds(self) -> list[pa.Field]:
        return [
            pa.field(S.DURATION, pa.float64()), pa.field(S.FPS_NUM, pa.int64()), pa.field(S.FPS_DEN, pa.int64()),
            pa.field(S.WIDTH, pa.int32()), pa.field(S.HEIGHT, pa.int32()), pa.field(S.NUM_FRAMES, pa.int64()),
            pa.field(S.CODEC, pa.string()), pa.field(S.HAS_AUDIO, pa.bool_()), pa.field(S.FILE_BYTES, pa.int64()),
            pa.field(ERROR, pa.string()), pa.field(ERROR_DETAIL, pa.string()),
        ]

    def probe(self, path: str) -> dict[str, Any]:
        import ffmpeg

        size = os.path.getsize(path)
        if size == 0:
            raise VideoError("video_empty", "zero-byte file")
        try:
            info = ffmpeg.probe(path, timeout=self.timeout_s)
        except ffmpeg.Error as e:
            lines = [x for x in (e.stderr or b"").decode("utf-8", "replace").splitlines() if x.strip()]
            raise VideoError("video_unreadable", (lines[-1] if lines else str(e))[:300]) from None
        except Exception as e:  # noqa: BLE001 - a timeout, an ffprobe crash
            raise VideoError("video_unreadable", f"{type(e).__name__}: {e}"[:300]) from None
        streams = info.get("streams") or []
        video = next((s for s in streams if s.get("codec_type") == "video"
                      and not (s.get("disposition") or {}).get("attached_pic")), None)
        has_audio = any(s.get("codec_type") == "audio" for s in streams)
        base = {S.FILE_BYTES: size, S.HAS_AUDIO: has_audio}
        if video is None:
            if has_audio:
                raise VideoError("video_audio_only", "audio stream(s), no video stream")
            if not streams and not _float((info.get("format") or {}).get("duration")):
                raise VideoError("video_zero_duration", "the container holds no stream and no duration")
            raise VideoError("video_unreadable", f"no video stream among {len(streams)} stream(s)")
        fps = _rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate"))
        duration = _float(video.get("duration")) or _float((info.get("format") or {}).get("duration"))
        declared = video.get("nb_frames")
        frames = int(declared) if str(declared or "").isdigit() else (
            round(duration * fps) if duration and fps else 0)
        w, h = int(video.get("width") or 0), int(video.get("height") or 0)
        out = {**base, S.DURATION: duration, S.FPS_NUM: fps.numerator if fps else None,
               S.FPS_DEN: fps.denominator if fps else None, S.WIDTH: w, S.HEIGHT: h, S.NUM_FRAMES: frames,
               S.CODEC: video.get("codec_name")}
        if not duration or duration <= 0 or frames <= 0:
            raise VideoError("video_zero_duration", f"duration {duration}, {frames} frames", ) from None
        if fps is None or not self.min_fps <= fps <= self.max_fps:
            raise _with(VideoError("video_bad_stream", f"frame rate {video.get('avg_frame_rate')} outside "
                                   f"[{self.min_fps}, {self.max_fps}]"), out)
        if min(w, h) < self.min_side or max(w, h) > self.max_side:
            raise _with(VideoError("video_bad_stream", f"{w}x{h} outside sides [{self.min_side}, {self.max_side}]"),
                        out)
        if duration > self.max_seconds:
            raise _with(VideoError("video_too_long", f"{duration:.1f} s > {self.max_seconds} s"), out)
        return out

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        cols: dict[str, list] = {f.name: [] for f in self.adds()}
        for path, err, det in zip(batch.column(S.PATH).to_pylist(), batch.column(ERROR).to_pylist(),
                                  batch.column(ERROR_DETAIL).to_pylist()):
            out: dict[str, Any] = {ERROR: err, ERROR_DETAIL: det}
            if err is None:
                try:
                    out.update(self.probe(path))
                except VideoError as e:
                    out.update(getattr(e, "facts", {}))
                    out.update({ERROR: e.reason, ERROR_DETAIL: e.detail})
                except OSError as e:
                    out.update({ERROR: "read_error", ERROR_DETAIL: f"{type(e).__name__}: {e}"[:300]})
            for name, values in cols.items():
                values.append(out.get(name))
        return cols


def _with(e: VideoError, facts: dict) -> VideoError:
    e.facts = facts  # the report shows what was measured on a file it rejected
    return e
