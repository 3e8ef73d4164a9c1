"""Boxes, one place: every input convention -> absolute pixels -> checked -> integers 0-999 -> text.

GLM-4.1V writes a box as `[x1,y1,x2,y2]` (top-left, bottom-right), each corner x/width*1000 and
y/height*1000 as an integer in 0-999, inside `<|begin_of_box|>...<|end_of_box|>`; the several boxes of
one phrase go inside one outer bracket, separated by `;`: `<|begin_of_box|>[[1,2,3,4];[5,6,7,8]]<|end_of_box|>`.

Used by the grounding and gui kinds (pipelines), their shard contracts (schemas) and the trainer's
formatters; no Spark, no torch.

- `from_xywh` (COCO, RefCOCO: pixels), `from_unit` (GRIT: 0-1 fractions), `from_css` (Playwright: CSS
  pixels times the device scale factor) -> pixel corners (x1, y1, x2, y2) as floats.
- `check(box, width, height, min_side)` -> (clipped box, None) or (None, why): inside the image,
  positive area, at least `min_side` pixels on each side, and at least one grid unit once quantised.
- `to_grid(box, width, height)` -> the four 0-999 integers; `merge(boxes, iou)` -> which boxes
  duplicate an earlier (better) one.
- `pieces(text)`: a text holding box blocks back into pieces (the gui kind's QA pairs).
- `render(caption, phrases)` -> the pieces of the training text: caption text with each grounded
  phrase followed by its box block; `render_text` joins them into the `.txt` string.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

BEGIN_BOX, END_BOX = "<|begin_of_box|>", "<|end_of_box|>"
GRID = 1000  # corners are x / width * GRID, as integers 0..GRID-1

Box = tuple[float, float, float, float]

# why a box is refused (the grounding kind's ledger reasons for a box)
INVALID, TOO_SMALL = "box_invalid", "box_too_small"


def from_xywh(x: float, y: float, w: float, h: float) -> Box:
    """COCO / RefCOCO `bbox` [x, y, w, h] in pixels (top-left origin) -> corners."""
    return (float(x), float(y), float(x) + float(w), float(y) + float(h))


def from_unit(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> Box:
    """GRIT / SeeClick corners as 0-1 fractions of the image -> pixels."""
    return (float(x1) * width, float(y1) * height, float(x2) * width, float(y2) * height)


def from_css(x: float, y: float, w: float, h: float, device_scale: float = 1.0) -> Box:
    """A DOM rect (Playwright `bounding_box()` / getBoundingClientRect: CSS pixels, x/y/width/height)
    -> screenshot pixels (the screenshot has device_scale screenshot pixels per CSS pixel)."""
    s = float(device_scale)
    return (float(x) * s, float(y) * s, (float(x) + float(w)) * s, (float(y) + float(h)) * s)


def _finite(box: Iterable) -> Box | None:
    try:
        vals = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        return None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        return None
    return vals  # type: ignore[return-value]


def check(box: Iterable, width: int, height: int, min_side: float = 1.0) -> tuple[Box | None, str | None]:
    """A pixel box clipped to the image, or None and why: `box_invalid` (not four finite numbers, corners
    in the wrong order, nothing inside the image), `box_too_small` (a side under min_side pixels after
    clipping, or under one unit of the 0-999 grid)."""
    b = _finite(box)
    if b is None:
        return None, INVALID
    x1, y1, x2, y2 = b
    if x2 <= x1 or y2 <= y1:
        return None, INVALID
    cx1, cy1 = min(max(x1, 0.0), float(width)), min(max(y1, 0.0), float(height))
    cx2, cy2 = min(max(x2, 0.0), float(width)), min(max(y2, 0.0), float(height))
    if cx2 <= cx1 or cy2 <= cy1:
        return None, INVALID  # wholly outside the image
    clipped = (cx1, cy1, cx2, cy2)
    if cx2 - cx1 < min_side or cy2 - cy1 < min_side:
        return None, TOO_SMALL
    g = to_grid(clipped, width, height)
    if g[2] <= g[0] or g[3] <= g[1]:
        return None, TOO_SMALL
    return clipped, None


def _q(v: float, size: int) -> int:
    # the epsilon keeps a corner that is exactly on a grid line (0.8 * 451 px of 451) from flooring to
    # the unit below through float rounding
    return min(GRID - 1, max(0, int(v * GRID / size + 1e-6)))


def to_grid(box: Sequence[float], width: int, height: int) -> list[int]:
    """Pixel corners -> [x1, y1, x2, y2] as integers 0-999 (x / width * 1000, floored; the right and
    bottom edges of the image become 999)."""
    x1, y1, x2, y2 = box
    return [_q(x1, width), _q(y1, height), _q(x2, width), _q(y2, height)]


def to_grid_containing(box: Sequence[float], width: int, height: int) -> list[int]:
    """Like `to_grid`, but the grid box contains the pixel box (near corners floored, far corners
    rounded up) and is never empty (x1 < x2, y1 < y2): for text lines, whose box must hold all their ink."""
    x1, y1, x2, y2 = box

    def one(lo: float, hi: float, size: int) -> tuple[int, int]:
        a = min(GRID - 2, max(0, math.floor(lo * GRID / size + 1e-6)))
        return a, min(GRID - 1, max(a + 1, math.ceil(hi * GRID / size - 1e-6)))

    (ax, bx), (ay, by) = one(min(x1, x2), max(x1, x2), width), one(min(y1, y2), max(y1, y2), height)
    return [ax, ay, bx, by]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def merge(boxes: Sequence[Sequence[float]], scores: Sequence[float | None], threshold: float) -> list[int | None]:
    """Duplicates by IoU: for each box, the index of the better box it duplicates (IoU >= threshold),
    else None. Better = higher score, then earlier; greedy, as non-maximum suppression does."""
    order = sorted(range(len(boxes)), key=lambda i: (-(scores[i] if scores[i] is not None else 1.0), i))
    kept: list[int] = []
    out: list[int | None] = [None] * len(boxes)
    for i in order:
        twin = next((k for k in kept if iou(boxes[i], boxes[k]) >= threshold), None)
        if twin is None:
            kept.append(i)
        else:
            out[i] = twin
    return out


def valid_grid_box(box) -> bool:
    """Four ints in 0-999 with x1 < x2 and y1 < y2 (the shard contract's rule)."""
    return (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < GRID for v in box)
            and box[0] < box[2] and box[1] < box[3])


def box_block(boxes: Sequence[Sequence[int]]) -> str:
    """The inside of one box block: `[[x1,y1,x2,y2];[...]]`. Raises ValueError on a box off the grid."""
    if not boxes:
        raise ValueError("a box block needs at least one box")
    for b in boxes:
        if not valid_grid_box(list(b)):
            raise ValueError(f"box {list(b)!r}: want four integers 0-999 with x1<x2, y1<y2")
    return "[" + ";".join("[" + ",".join(str(v) for v in b) + "]" for b in boxes) + "]"


def render(caption: str, phrases: Sequence[dict]) -> list[tuple[str, str]]:
    """The training text as pieces: ("text", s) and ("box", "[[...];[...]]"). Each phrase
    (`{"span": [start, end], "boxes": [[x1,y1,x2,y2], ...]}`) gets its box block right after
    caption[start:end]; phrases without boxes are left as plain text. Blocks are inserted in order of
    their span's end (then start), so nested spans read "a man<box> with a hat<box>"."""
    pieces: list[tuple[str, str]] = []
    at = 0
    grounded = sorted((p for p in phrases if p.get("boxes")), key=lambda p: (p["span"][1], p["span"][0]))
    for p in grounded:
        start, end = int(p["span"][0]), int(p["span"][1])
        if not 0 <= start < end <= len(caption):
            raise ValueError(f"span {start}:{end} is outside a caption of {len(caption)} characters")
        if end > at:
            pieces.append(("text", caption[at:end]))
            at = end
        pieces.append(("box", box_block(p["boxes"])))
    if at < len(caption):
        pieces.append(("text", caption[at:]))
    return pieces


def render_text(caption: str, phrases: Sequence[dict]) -> str:
    """The `.txt` of a grounding sample: the caption with `<|begin_of_box|>[[...]]<|end_of_box|>` after
    each grounded phrase."""
    return "".join(s if k == "text" else BEGIN_BOX + s + END_BOX for k, s in render(caption, phrases))


_BLOCK = re.compile(re.escape(BEGIN_BOX) + r"(.*?)" + re.escape(END_BOX), re.DOTALL)
_BOX = re.compile(r"\[(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})\]")


def parse_block(block: str) -> list[list[int]]:
    """`[[x1,y1,x2,y2];[...]]` -> its boxes; raises ValueError on anything else or a box off the grid."""
    if not (block.startswith("[") and block.endswith("]")):
        raise ValueError(f"box block {block!r}: want [[x1,y1,x2,y2];...]")
    out = []
    for part in block[1:-1].split(";"):
        m = _BOX.fullmatch(part)
        if m is None:
            raise ValueError(f"box {part!r}: want [x1,y1,x2,y2] with integer corners")
        out.append([int(v) for v in m.groups()])
    box_block(out)  # the grid rules
    return out


def pieces(text: str) -> list[tuple[str, str]]:
    """A text that already holds box blocks (a QA pair, a rendered caption) -> ("text", s) and ("box",
    "[[...]]") pieces, as `render` gives them; every block is checked (parse_block)."""
    out: list[tuple[str, str]] = []
    at = 0
    for m in _BLOCK.finditer(text):
        if m.start() > at:
            out.append(("text", text[at:m.start()]))
        parse_block(m.group(1))
        out.append(("box", m.group(1)))
        at = m.end()
    if at < len(text):
        out.append(("text", text[at:]))
    return out


def count_boxes(phrases: Sequence[dict]) -> int:
    return sum(len(p.get("boxes") or ()) for p in phrases)
