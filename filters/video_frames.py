"""Frames of a clip, sampled as GLM-4.1V's video processor does, written as JPEGs.

`glm_frame_indices` is the sampling rule, a pure function: a clip of up to `max_seconds` (300 s) is
sampled at `sample_fps` (2 fps) with frame indices ceil(i * video_fps / 2); a longer clip gets
`max_frames` (600) frames evenly spaced over it. Repeated indices are removed and the count is
padded to even by repeating the last frame (two frames make one temporal patch of the ViT).
`pair_timestamps` gives one timestamp per frame pair: the first frame's time in whole seconds (the
processor writes `int(seconds)` as text after each pair). The frame rate is exact (a fraction such as
30000/1001), so the indices do not depend on float rounding.

`SampleFrames` reads `path`, the clip's frame bounds (`clip_start`, `clip_end`, end exclusive) and
the video's rate (`fps_num`/`fps_den`); it decodes the clip once with PyAV (seeking to its start),
keeps the sampled frames, shrinks each to at most `max_side` pixels and encodes it as JPEG. It writes
`frames` (the JPEGs one after the other; `frame_sizes` splits them), `frame_indices` (in the source
video), `timestamps` (one per pair, seconds from the clip start), `frame_phash` (64-bit pHash per
frame, for dedup), `frame_width`/`frame_height`, `strip` (a 2 x 2 sheet of frames, the report's
thumbnail), and `error` = `clip_decode_failed` when a sampled
frame cannot be decoded (the rows's earlier `error` is kept).
"""
from __future__ import annotations

import dataclasses
import io
import math
from fractions import Fraction
from typing import Any, ClassVar

import pyarrow as pa

from filters.base import Stage
from schemas import video as S
from schemas.common import ERROR, ERROR_DETAIL


def glm_frame_indices(num_frames: int, fps: Fraction | float, sample_fps: int = 2, max_seconds: float = 300.0,
                      max_frames: int = 600) -> list[int]:
    """Indices (0-based, within the clip) of the frames GLM-4.1V samples from a clip of `num_frames`
    frames at `fps`. Always a non-empty, even-length list for num_frames >= 1."""
    if num_frames < 1:
        raise ValueError("a clip has at least one frame")
    fps = Fraction(fps).limit_denominator(1_000_000)
    if fps <= 0:
        raise ValueError(f"frame rate {fps} is not positive")
    last = num_frames - 1
    duration = Fraction(num_frames) / fps
    if duration <= max_seconds:
        n = math.floor(duration * sample_fps)
        # ceil(i * fps / sample_fps) in exact integer arithmetic
        raw = [min(last, -(-(i * fps.numerator) // (fps.denominator * sample_fps))) for i in range(n)]
    else:
        # max_frames evenly spaced over [0, duration], end included (numpy.linspace), floor(t * fps)
        raw = [min(last, math.floor(Fraction(k, max_frames - 1) * duration * fps)) for k in range(max_frames)]
    seen: set[int] = set()
    out = [i for i in raw if not (i in seen or seen.add(i))]
    if not out:  # a clip shorter than one sampling period still shows its first frame
        out = [0]
    if len(out) % 2:
        out.append(out[-1])
    return out


def pair_timestamps(indices: list[int], fps: Fraction | float) -> list[int]:
    """One whole-second timestamp per frame pair: that of the pair's first frame (non-decreasing)."""
    fps = Fraction(fps).limit_denominator(1_000_000)
    return [int(Fraction(indices[k]) / fps) for k in range(0, len(indices), 2)]


def resize_to(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size a frame is stored at: its own, shrunk so the longer side is at most max_side."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_frames(path: str, targets: list[int], start: int, fps: Fraction) -> dict[int, Any]:
    """PIL images of the source frames `targets` (sorted, absolute indices), decoding from frame `start`.
    A target with no frame of its own (a variable-rate gap) gets the next decoded frame. Raises on a
    decode error; returns fewer entries than asked when the stream ends first."""
    import av

    wanted = sorted(set(targets))
    got: dict[int, Any] = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        base = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        if start > 0:
            container.seek(int((base + float(start / fps)) / stream.time_base), stream=stream, backward=True)
        ptr = 0
        for frame in container.decode(stream):
            t = frame.time if frame.time is not None else base
            idx = round((t - base) * fps)
            while ptr < len(wanted) and idx >= wanted[ptr]:
                got[wanted[ptr]] = frame.to_image()
                ptr += 1
            if ptr == len(wanted):
                break
    return got


def frame_strip(images: list, count: int, height: int, columns: int = 2) -> bytes:
    """Up to `count` of the frames, evenly chosen, in rows of `columns` at `height` pixels each, as one
    JPEG (the report shrinks thumbnails to a small box: a 2 x 2 sheet stays legible, a long strip not)."""
    from PIL import Image

    n = len(images)
    picks = [images[round(k * (n - 1) / max(1, count - 1))] for k in range(min(count, n))]
    width = max(1, round(picks[0].width * height / picks[0].height))
    cols = min(columns, len(picks))
    rows = -(-len(picks) // cols)
    sheet = Image.new("RGB", (width * cols, height * rows))
    for k, img in enumerate(picks):
        sheet.paste(img.resize((width, height), Image.Resampling.BILINEAR), ((k % cols) * width, (k // cols) * height))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class SampleFrames(Stage):
    """The recipe section `video.frames`: GLM-4.1V's sampling, and how frames are stored."""

    name: ClassVar[str] = "video_frames"
    sample_fps: int = 2
    max_seconds: float = 300.0  # clips up to this long: sample_fps; longer: max_frames evenly spaced
    max_frames: int = 600
    max_side: int = 448  # stored frames' longer side, pixels (smaller frames are kept as they are)
    jpeg_quality: int = 90
    strip_frames: int = 4  # the report's frame sheet: this many frames, evenly chosen, two per row
    strip_height: int = 72

    def adds(self) -> list[pa.Field]:
        return [
            pa.field(S.FRAMES, pa.binary()), pa.field(S.FRAME_SIZES, pa.list_(pa.int32())),
            pa.field(S.FRAME_INDICES, pa.list_(pa.int64())), pa.field(S.TIMESTAMPS, pa.list_(pa.int32())),
            pa.field(S.FRAME_PHASH, pa.list_(pa.int64())), pa.field(S.FRAME_WIDTH, pa.int32()),
            pa.field(S.FRAME_HEIGHT, pa.int32()), pa.field(S.STRIP, pa.binary()),
            pa.field(ERROR, pa.string()), pa.field(ERROR_DETAIL, pa.string()),
        ]

    def sample(self, path: str, start: int, end: int, fps: Fraction) -> dict[str, Any]:
        from PIL import Image

        from filters.decode import phash, signed64

        rel = glm_frame_indices(end - start, fps, self.sample_fps, self.max_seconds, self.max_frames)
        absolute = [start + i for i in rel]
        images = decode_frames(path, absolute, start, fps)
        missing = [i for i in absolute if i not in images]
        if missing:
            raise ValueError(f"{len(missing)} of {len(absolute)} sampled frames not decoded (first: {missing[0]})")
        blob, sizes, hashes, shown = io.BytesIO(), [], [], []
        w, h = resize_to(*images[absolute[0]].size, self.max_side)
        for i in absolute:  # a padded pair repeats its last frame: encoded once per member, as the trainer reads it
            img = images[i].convert("RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            pos = blob.tell()
            img.save(blob, format="JPEG", quality=self.jpeg_quality)
            sizes.append(blob.tell() - pos)
            hashes.append(signed64(phash(img)))
            shown.append(img)
        return {S.FRAMES: blob.getvalue(), S.FRAME_SIZES: sizes, S.FRAME_INDICES: absolute,
                S.TIMESTAMPS: pair_timestamps(rel, fps), S.FRAME_PHASH: hashes, S.FRAME_WIDTH: w, S.FRAME_HEIGHT: h,
                S.STRIP: frame_strip(shown, self.strip_frames, self.strip_height)}

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        cols: dict[str, list] = {f.name: [] for f in self.adds()}
        rows = batch.select([S.PATH, S.CLIP_START, S.CLIP_END, S.FPS_NUM, S.FPS_DEN, ERROR, ERROR_DETAIL,
                             "unit"]).to_pylist()
        for r in rows:
            out: dict[str, Any] = {ERROR: r[ERROR], ERROR_DETAIL: r[ERROR_DETAIL]}
            if r[ERROR] is None and r["unit"] == S.CLIP_UNIT:
                try:
                    out.update(self.sample(r[S.PATH], r[S.CLIP_START], r[S.CLIP_END],
                                           Fraction(r[S.FPS_NUM], r[S.FPS_DEN])))
                except Exception as e:  # noqa: BLE001 - PyAV raises many kinds; the clip is quarantined with it
                    out.update({ERROR: "clip_decode_failed", ERROR_DETAIL: f"{type(e).__name__}: {e}"[:300]})
            for name, values in cols.items():
                values.append(out.get(name))
        return cols


@dataclasses.dataclass(frozen=True)
class CutClip(Stage):
    """The clip itself as an MP4 (H.264, re-encoded so the cut is frame-exact, at most `max_side`
    pixels), for `video.write_clip`. Reads `path`, the clip's frame bounds and size; writes `clip_mp4`
    (null where the cut fails: the frames are the sample, the clip is an extra)."""

    name: ClassVar[str] = "video_cut"
    max_side: int = 448
    crf: int = 28

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.CLIP_MP4, pa.binary())]

    def cut(self, path: str, start: int, end: int, size: tuple[int, int]) -> bytes:
        import ffmpeg

        w, h = (max(2, v - v % 2) for v in resize_to(*size, self.max_side))  # H.264 wants even sides
        out, _ = (ffmpeg.input(path).trim(start_frame=start, end_frame=end).setpts("PTS-STARTPTS")
                  .filter("scale", w, h)
                  .output("pipe:", format="mp4", vcodec="libx264", crf=self.crf, pix_fmt="yuv420p",
                          movflags="frag_keyframe+empty_moov")
                  .run(capture_stdout=True, capture_stderr=True))
        return out

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        rows = batch.select([S.PATH, S.CLIP_START, S.CLIP_END, S.WIDTH, S.HEIGHT, ERROR]).to_pylist()
        out = []
        for r in rows:
            data = None
            if r[ERROR] is None and r[S.CLIP_START] is not None:
                try:
                    data = self.cut(r[S.PATH], r[S.CLIP_START], r[S.CLIP_END], (r[S.WIDTH], r[S.HEIGHT]))
                except Exception:  # noqa: BLE001 - ffmpeg.Error and the like: the sample goes without its mp4
                    data = None
            out.append(data)
        return {S.CLIP_MP4: out}
