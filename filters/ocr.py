"""PP-OCR through rapidocr (its wheel ships PP-OCR's Chinese+English ONNX models; onnxruntime, offline).

- `PpOcr` (the scene branch, and PDF pages without a text layer): reads `image` on the rows whose
  `text_source` is `ocr`; writes `text` (lines in reading order, joined by newlines) and `lines` (JSON:
  text, score, box 0-999). Only valid detections are kept: recognition score >= `min_score` and the
  line's height (the shorter side of its quadrilateral) >= `min_box_px`. A row with no valid line
  keeps `lines` = [] and is dropped later (`no_text_detected`).
- `Legibility` (rows with a ground truth: synthetic renders, text-layer pages): a PP-OCR read of the
  image (`ocr_text`) and its character error rate against `text` (`cer`); the decision (max_cer) is
  taken later, so changing the threshold reuses the reads.
- `Boxed`: a small JPEG of the image with its lines' boxes drawn (the report's thumbnail).

The model is loaded once per Python worker (`Stage.state`), with onnxruntime's threads set to the
task's cores. Any per-image failure becomes `image_undecodable`-style data, never a failed task.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import re
import unicodedata
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from filters.base import Stage
from filters.media import column_bytes
from schemas import boxes
from schemas import ocr as S
from schemas.common import ERROR, ERROR_DETAIL

_SPACE = re.compile(r"\s+")


@functools.cache
def engine(threads: int = 1, text_score: float = 0.5, use_cls: bool = True):
    """One RapidOCR per worker, thread count and score (the ONNX sessions are ~20 MB and load in ~1 s)."""
    from rapidocr import RapidOCR

    return RapidOCR(params={
        "Global.log_level": "error", "Global.text_score": float(text_score), "Global.use_cls": use_cls,
        "EngineConfig.onnxruntime.intra_op_num_threads": int(threads),
        "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        # rapidocr's default scales the SHORTER side up to 736 px: a 800x100 line became 5900x736 and
        # took seconds; PaddleOCR's own default caps the longer side at 960 instead
        "Det.limit_type": "max", "Det.limit_side_len": 960,
    })


def check_models() -> str:
    """Driver-side: the models load and read a rendered word (fails fast when rapidocr is broken)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (160, 48), "white")
    ImageDraw.Draw(img).text((8, 12), "OCR", fill="black", font_size=24)
    out = engine(1)(np.asarray(img))
    return " ".join(out.txts or ())


def normalize_text(text: str | None) -> str:
    """NFKC, whitespace runs collapsed to one space per line, empty lines removed, lines kept."""
    if not text:
        return ""
    lines = (_SPACE.sub(" ", unicodedata.normalize("NFKC", ln)).strip() for ln in text.splitlines())
    return "\n".join(ln for ln in lines if ln)


def compact(text: str | None) -> str:
    """The characters compared by the CER: NFKC, without whitespace (CJK text has no spaces to agree on)."""
    return _SPACE.sub("", unicodedata.normalize("NFKC", text or ""))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute), Hyyro's bit-parallel algorithm: O(len(a)) big-int
    steps of len(b) bits, so a 3,000-character page compares in milliseconds in pure Python."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[str, int] = {}
    for i, c in enumerate(b):
        peq[c] = peq.get(c, 0) | (1 << i)
    full, top = (1 << m) - 1, 1 << (m - 1)
    pv, mv, score = full, 0, m
    for c in a:
        eq = peq.get(c, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)
        mh = pv & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = (ph << 1) | 1
        mh = mh << 1
        pv = (mh | ~(xv | ph)) & full
        mv = ph & xv & full
    return score


def cer(truth: str, read: str) -> float:
    """Character error rate of `read` against `truth`, whitespace ignored: the smaller of the rate in
    reading order and the rate with both texts' lines sorted (PP-OCR orders lines top to bottom, so a
    legible two-column or rotated render would otherwise score as a misread). An empty truth: 0 when
    nothing was read, else 1."""
    t, r = compact(truth), compact(read)
    if not t:
        return 0.0 if not r else 1.0
    ordered = levenshtein(t, r) / len(t)
    if ordered == 0:
        return 0.0
    st = compact("".join(sorted(truth.splitlines())))
    sr = compact("".join(sorted(read.splitlines())))
    return min(ordered, levenshtein(st, sr) / len(t))


def norm_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> list[int]:
    """Pixel corners -> a 0-999 box that holds the whole line (`schemas.boxes.to_grid_containing`)."""
    return boxes.to_grid_containing((x1, y1, x2, y2), width, height)


def pixel_box(box: list[int], width: int, height: int) -> tuple[int, int, int, int]:
    """A 0-999 box back to pixels of an image of this size (any resize of the original)."""
    x1, y1, x2, y2 = box
    return (int(x1 * width / 1000), int(y1 * height / 1000), math.ceil(x2 * width / 1000),
            math.ceil(y2 * height / 1000))


def read_lines(img, threads: int, min_score: float, min_box_px: float) -> tuple[list[dict], list[dict]]:
    """PP-OCR on a PIL RGB image: (valid lines, every line) in reading order (top to bottom, left to
    right, as rapidocr sorts them), each {"text", "score", "box"} with the box 0-999."""
    out = engine(threads, min(min_score, 0.5))(np.asarray(img))
    valid, every = [], []
    if out.boxes is None or out.txts is None:
        return valid, every
    w, h = img.size
    for quad, txt, score in zip(out.boxes, out.txts, out.scores):
        q = np.asarray(quad, dtype=np.float64)
        side_h = (np.linalg.norm(q[3] - q[0]) + np.linalg.norm(q[2] - q[1])) / 2
        side_w = (np.linalg.norm(q[1] - q[0]) + np.linalg.norm(q[2] - q[3])) / 2
        text = normalize_text(txt).replace("\n", " ")
        line = {"text": text, "score": round(float(score), 4),
                "box": norm_box(q[:, 0].min(), q[:, 1].min(), q[:, 0].max(), q[:, 1].max(), w, h)}
        every.append(line)
        if text and float(score) >= min_score and min(side_h, side_w) >= min_box_px:
            valid.append(line)
    return valid, every


def _open_rgb(data: bytes):
    from PIL import Image

    from filters.decode import to_rgb

    return to_rgb(Image.open(io.BytesIO(data)))


@dataclasses.dataclass(frozen=True)
class PpOcr(Stage):
    """Reads `image`, `text_source`; on the rows to be read by OCR writes `text` and `lines`."""

    name: ClassVar[str] = "ppocr"
    min_score: float = 0.5  # recognition confidence of a valid line
    min_box_px: float = 8.0  # a valid line is at least this many pixels high (and wide)

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.TEXT, pa.string()), pa.field(S.LINES, pa.string()),
                pa.field(ERROR, pa.string()), pa.field(ERROR_DETAIL, pa.string())]

    def setup(self, threads: int) -> Any:
        return threads

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        out = {S.TEXT: batch.column(S.TEXT).to_pylist(), S.LINES: batch.column(S.LINES).to_pylist(),
               ERROR: batch.column(ERROR).to_pylist(), ERROR_DETAIL: batch.column(ERROR_DETAIL).to_pylist()}
        sources = batch.column(S.TEXT_SOURCE).to_pylist()
        images = column_bytes(batch, S.IMAGE)
        for i, (src, data) in enumerate(zip(sources, images)):
            if src != "ocr" or out[ERROR][i] is not None or not data:
                continue
            try:
                lines, _ = read_lines(_open_rgb(data), state, self.min_score, self.min_box_px)
            except Exception as e:  # noqa: BLE001 - one image's failure is that image's reason
                out[ERROR][i], out[ERROR_DETAIL][i] = "image_undecodable", f"PP-OCR: {type(e).__name__}: {e}"[:300]
                continue
            out[S.TEXT][i] = "\n".join(ln["text"] for ln in lines)
            out[S.LINES][i] = S.lines_json(lines)
        return out


@dataclasses.dataclass(frozen=True)
class Legibility(Stage):
    """Reads `image_ref`, `text`, `text_source`, `branch`; writes `ocr_text` and `cer` on rows with a
    ground truth (text_source render or text_layer) of `branches`, null elsewhere. The threshold is
    applied later."""

    name: ClassVar[str] = "legibility"
    enabled: bool = True
    max_cer: float = 0.5  # above it a render is illegible (applied by the kind's decision, not here)
    max_side: int = 1600  # the read is made at most this large (PP-OCR's own limit is 2000)
    branches: tuple[str, ...] = ("synthetic", "academic")  # a full page's read costs ~20x a rendered line's

    def cache_key(self) -> Any:
        return (self.enabled, self.max_side, self.branches)

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.OCR_TEXT, pa.string()), pa.field(S.CER, pa.float32())]

    def setup(self, threads: int) -> Any:
        return threads

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        texts, sources = batch.column(S.TEXT).to_pylist(), batch.column(S.TEXT_SOURCE).to_pylist()
        branches = batch.column(S.BRANCH).to_pylist()
        images = column_bytes(batch, S.IMAGE)
        read, rates = [], []
        for text, src, branch, data in zip(texts, sources, branches, images):
            if src not in ("render", "text_layer") or branch not in self.branches or not data:
                read.append(None)
                rates.append(None)
                continue
            img = _open_rgb(data)
            if max(img.size) > self.max_side:
                img.thumbnail((self.max_side, self.max_side))
            _, every = read_lines(img, state, 0.0, 0.0)
            got = "\n".join(ln["text"] for ln in every)
            read.append(got)
            rates.append(cer(text or "", got))
        return {S.OCR_TEXT: read, S.CER: rates}


@dataclasses.dataclass(frozen=True)
class Boxed(Stage):
    """Reads `image`, `lines`; writes `boxed`: a JPEG of at most `size` px with each line's box drawn."""

    name: ClassVar[str] = "boxed"
    size: int = 320

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.BOXED, pa.binary())]

    def draw(self, data: bytes | None, lines: str | None) -> bytes | None:
        from PIL import ImageDraw

        if not data:
            return None
        try:
            img = _open_rgb(data)
            img.thumbnail((self.size, self.size))
            draw = ImageDraw.Draw(img)
            for line in json.loads(lines or "[]"):
                draw.rectangle(pixel_box(line["box"], *img.size), outline=(255, 0, 0), width=1)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
            return buf.getvalue()
        except Exception:  # noqa: BLE001 - a thumbnail only; decode has named the image's problem
            return None

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        images = column_bytes(batch, S.IMAGE)
        return {S.BOXED: [self.draw(d, ln) for d, ln in zip(images, batch.column(S.LINES).to_pylist())]}
