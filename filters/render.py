"""The synthetic OCR branch: text rendered onto a background, with an exact ground truth.

`RenderText` reads `text` (an item of the user's text corpus) and `sample_id`; writes `image` (PNG of the
render, re-encoded by decode like any image), `text` (exactly the text drawn, in reading order: lines
joined by newlines, table cells by tabs), `lines` (every line's text and box, 0-999), `render` (JSON:
seed, font, size, colours, layout, ...) and `augmentation` (filters/augment.py). A text is cut to
what fits on the canvas: the ground truth is what was drawn, never more.

Deterministic: every choice comes from `random.Random(seed)`, seed = sha1(recipe seed, sample_id), and
fonts and backgrounds are listed in sorted order, so the same corpus, recipe and fonts give the same
pixels. Layouts: a single `line`, a `paragraph`, two `columns` (left column first), a `table` (ruled
cells, row by row). Orientations rotate the finished render by 0/90/180/270 degrees, boxes with it.
Chinese (any CJK character) is drawn with Noto CJK (SC); Latin text with any of the fonts.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import random
import re
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from filters.augment import Augment, augment
from filters.base import Stage
from filters.ocr import compact, norm_box, normalize_text
from schemas import ocr as S
from schemas.common import ERROR, ERROR_DETAIL, SAMPLE_ID

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation",
             "/usr/share/fonts/opentype/noto")
_SKIP_FONTS = ("ExtraLight", "Math", "Mono-", "Mono.")  # hairline, symbol and monospace faces
CJK_INDEX = 2  # Noto Sans/Serif CJK .ttc: face 2 is Simplified Chinese
_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\u3000-\u303f]")
_TOKEN = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\u3000-\u303f]|[^\s\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\u3000-\u303f]+")
BG_EXTS = (".jpg", ".jpeg", ".png", ".webp")


@dataclasses.dataclass(frozen=True)
class Synthetic:
    """The recipe's `ocr.synthetic`: how text is drawn."""

    font_dirs: tuple[str, ...] = FONT_DIRS
    backgrounds: str = ""  # a local folder of background images; empty: generated paper and plain colours
    layouts: tuple[str, ...] = ("line", "paragraph", "columns", "table")
    layout_weights: tuple[float, ...] = (0.3, 0.4, 0.15, 0.15)
    orientations: tuple[int, ...] = (0, 90, 270)  # degrees counter-clockwise
    orientation_weights: tuple[float, ...] = (0.9, 0.05, 0.05)
    font_size: tuple[int, int] = (18, 40)
    width: tuple[int, int] = (480, 1024)  # canvas width before orientation
    max_height: int = 1400
    max_lines: int = 24
    line_spacing: tuple[float, float] = (1.15, 1.7)
    bold: float = 0.25  # share of renders in a bold face (where the family has one)
    max_chars: int = 2000  # an item longer than this is cut (the rest is not drawn anyway)


def is_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


@functools.cache
def list_fonts(dirs: tuple[str, ...]) -> tuple[str, ...]:
    found = []
    for d in dirs:
        if os.path.isdir(d):
            found += [os.path.join(d, f) for f in os.listdir(d) if f.lower().endswith((".ttf", ".otf", ".ttc"))
                      and not any(s in f for s in _SKIP_FONTS)]
    return tuple(sorted(found))


@functools.cache
def list_backgrounds(folder: str) -> tuple[str, ...]:
    if not folder:
        return ()
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if f.lower().endswith(BG_EXTS)]
    return tuple(sorted(out))


@functools.cache
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size, index=CJK_INDEX if path.endswith(".ttc") else 0)


def text_key(text: str) -> str:
    """What two items share when they hold the same text, whitespace and its layout aside."""
    return hashlib.sha1(compact(text).encode("utf-8", "surrogatepass")).hexdigest()


def render_seed(seed: int, sample_id: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}/{sample_id}".encode()).digest()[:6], "big")


def _tokens(text: str) -> list[tuple[str, bool]]:
    """(token, space before it) pairs: CJK characters one by one, other text by words. The first token
    of a line of the source is (token, None): the wrap starts a new line there (a paragraph break)."""
    out: list[tuple[str, bool | None]] = []
    for line in text.split("\n"):
        prev_end = None
        for m in _TOKEN.finditer(line):
            out.append((m.group(), None if prev_end is None else m.start() > prev_end))
            prev_end = m.end()
    return out


def _wrap(tokens: list[tuple[str, bool]], font, max_w: float, max_lines: int) -> tuple[list[str], int]:
    """Greedy wrap: (lines, tokens used). A token wider than a line is cut by characters."""
    lines, cur, used = [], "", 0
    for tok, space in tokens:
        if space is None and cur:  # a line break of the source
            lines.append(cur)
            if len(lines) >= max_lines:
                return lines, used
            cur = ""
        cand = (cur + (" " if space and cur else "") + tok) if cur else tok
        if font.getlength(cand) <= max_w:
            cur, used = cand, used + 1
            continue
        if cur:
            lines.append(cur)
            if len(lines) >= max_lines:
                return lines, used
            cur = ""
        if font.getlength(tok) <= max_w:
            cur, used = tok, used + 1
            continue
        piece = ""
        for ch in tok:  # a long word or URL: cut by characters
            if font.getlength(piece + ch) > max_w and piece:
                lines.append(piece)
                if len(lines) >= max_lines:
                    return lines, used
                piece = ""
            piece += ch
        cur, used = piece, used + 1
    if cur and len(lines) < max_lines:
        lines.append(cur)
    return lines, used


def _background(rng: random.Random, size: tuple[int, int], backgrounds: tuple[str, ...]) -> tuple[Image.Image, str]:
    w, h = size
    if backgrounds and rng.random() < 0.7:
        path = rng.choice(backgrounds)
        try:
            with Image.open(path) as src:
                src = src.convert("RGB")
                scale = max(w / src.width, h / src.height)
                src = src.resize((max(w, round(src.width * scale)), max(h, round(src.height * scale))))
                x, y = rng.randint(0, src.width - w), rng.randint(0, src.height - h)
                photo = src.crop((x, y, x + w, y + h))
            wash = rng.choice(((255, 255, 255), (250, 245, 230), (20, 20, 20)))
            alpha = rng.uniform(0.55, 0.75)  # washed out, so any text colour of the right polarity reads
            bg = Image.blend(photo, Image.new("RGB", size, wash), alpha)
            return bg, os.path.basename(path)
        except Exception:  # noqa: BLE001, S110 - a broken background image: fall back to paper
            pass
    base = rng.choice(((255, 255, 255), (250, 246, 235), (238, 238, 232), (225, 235, 245), (30, 32, 40)))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(0, 6), (h, w, 1))
    arr = np.clip(np.asarray(base, dtype=np.float32)[None, None, :] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.GaussianBlur(0.6)), "paper"


def _ink(rng: random.Random, bg: Image.Image) -> tuple[int, int, int]:
    lum = float(np.asarray(bg.convert("L")).mean())
    if lum > 110:
        return tuple(rng.randint(0, 70) for _ in range(3))
    return tuple(rng.randint(200, 255) for _ in range(3))


def render(text: str, seed: int, cfg: Synthetic, aug: Augment | None = None) -> dict[str, Any]:
    """Draw `text`; returns {image (PIL RGB), text, lines (boxes 0-999), render, augmentation}."""
    rng = random.Random(seed)
    text = normalize_text(text)[: cfg.max_chars]
    cjk = is_cjk(text)
    fonts = list_fonts(tuple(cfg.font_dirs))
    pool = [f for f in fonts if "CJK" in f] if cjk else list(fonts)
    if not pool:
        raise FileNotFoundError(f"no {'CJK ' if cjk else ''}font under {cfg.font_dirs}")
    bold = rng.random() < cfg.bold
    faces = [f for f in pool if ("Bold" in f) == bold] or pool
    font_path = rng.choice(faces)
    size = rng.randint(*cfg.font_size)
    font = _font(font_path, size)
    layout = rng.choices(cfg.layouts, weights=cfg.layout_weights[: len(cfg.layouts)])[0]
    orientation = rng.choices(cfg.orientations, weights=cfg.orientation_weights[: len(cfg.orientations)])[0]
    spacing = round(rng.uniform(*cfg.line_spacing), 2)
    ascent, descent = font.getmetrics()
    line_h = round((ascent + descent) * spacing)
    margin = rng.randint(size // 2, size * 2)
    width = rng.randint(*cfg.width)
    tokens = _tokens(text)
    max_lines = max(1, min(cfg.max_lines, (cfg.max_height - 2 * margin) // line_h))

    placed: list[tuple[str, float, float]] = []  # (text, x, y) of each line, in reading order
    rows: list[list[int]] = []  # table: indices into placed, per row
    rules: list[tuple[int, int, int, int]] = []
    if layout == "line":
        lines, _ = _wrap(tokens, font, width - 2 * margin, 1)
        width = min(width, int(font.getlength(lines[0])) + 2 * margin) if lines else width
        placed = [(ln, margin, margin) for ln in lines]
        height = margin * 2 + line_h
    elif layout == "columns":
        gutter = rng.randint(size, size * 3)
        col_w = (width - 2 * margin - gutter) / 2
        lines, _ = _wrap(tokens, font, col_w, max_lines * 2)
        per_col = max(1, -(-len(lines) // 2))  # the left column first, then the right one
        for i, ln in enumerate(lines):
            col, row = divmod(i, per_col)
            placed.append((ln, margin + col * (col_w + gutter), margin + row * line_h))
        height = margin * 2 + min(len(lines), per_col) * line_h
    elif layout == "table":
        ncols = rng.randint(2, 4)
        words = [t for t, _ in tokens]
        step = 1 if cjk else rng.randint(1, 2)
        cells = [("" if cjk else " ").join(words[i:i + step]) for i in range(0, len(words), step)]
        pad = max(4, size // 3)
        avail = width - 2 * margin
        while True:  # the most columns (up to the draw) whose widest cells fit the canvas, cells in order
            nrows = max(1, min(max_lines, len(cells) // ncols or 1))
            used_cells = cells[: nrows * ncols]
            col_w = [0.0] * ncols
            for i, c in enumerate(used_cells):
                col_w[i % ncols] = max(col_w[i % ncols], font.getlength(c))
            if ncols == 1 or sum(col_w) + 2 * pad * ncols <= avail:
                break
            ncols -= 1
        cells = used_cells
        xs = [margin]
        for w_ in col_w:
            xs.append(xs[-1] + round(w_) + 2 * pad)
        width = xs[-1] + margin
        for r in range(nrows):
            row = []
            for c in range(ncols):
                i = r * ncols + c
                if i < len(cells) and cells[i]:
                    row.append(len(placed))
                    placed.append((cells[i], xs[c] + pad, margin + r * line_h))
            rows.append(row)
        height = margin * 2 + nrows * line_h
        for x in xs:
            rules.append((x, margin, x, margin + nrows * line_h))
        for r in range(nrows + 1):
            rules.append((xs[0], margin + r * line_h, xs[-1], margin + r * line_h))
    else:  # paragraph
        lines, _ = _wrap(tokens, font, width - 2 * margin, max_lines)
        placed = [(ln, margin, margin + i * line_h) for i, ln in enumerate(lines)]
        height = margin * 2 + len(lines) * line_h
    width, height = int(width), int(max(height, line_h + 2 * margin))
    bg, bg_name = _background(rng, (width, height), list_backgrounds(cfg.backgrounds))
    ink = _ink(rng, bg)
    draw = ImageDraw.Draw(bg)
    for r in rules:
        draw.line(r, fill=ink, width=1)
    boxes = []
    offset = (line_h - (ascent + descent)) / 2  # centre the glyphs in their line
    for ln, x, y in placed:
        draw.text((x, y + offset), ln, font=font, fill=ink)
        boxes.append(draw.textbbox((x, y + offset), ln, font=font))
    if orientation:
        bg, boxes = _orient(bg, boxes, orientation)
    augmentation = None
    if aug is not None:
        bg, boxes, augmentation = augment(bg, [tuple(map(float, b)) for b in boxes], seed, aug)
    w, h = bg.size
    lines = [{"text": ln, "score": 1.0, "box": norm_box(*b, w, h)} for (ln, _, _), b in zip(placed, boxes)]
    if layout == "table":
        truth = "\n".join("\t".join(placed[i][0] for i in row) for row in rows if row)
    else:
        truth = "\n".join(ln for ln, _, _ in placed)
    info = {"seed": seed, "font": os.path.basename(font_path), "font_size": size, "bold": bold, "layout": layout,
            "orientation": orientation, "line_spacing": spacing, "ink": list(ink), "background": bg_name,
            "margin": margin}
    return {"image": bg, "text": truth, "lines": lines, "render": info, "augmentation": augmentation}


def _orient(img: Image.Image, boxes: list, degrees: int) -> tuple[Image.Image, list]:
    """Rotate by a multiple of 90 degrees counter-clockwise; boxes follow exactly."""
    w, h = img.size
    out = []
    for x1, y1, x2, y2 in boxes:
        if degrees == 90:
            out.append((y1, w - x2, y2, w - x1))
        elif degrees == 180:
            out.append((w - x2, h - y2, w - x1, h - y1))
        else:  # 270
            out.append((h - y2, x1, h - y1, x2))
    ops = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    return img.transpose(ops[degrees]), out


@dataclasses.dataclass(frozen=True)
class RenderText(Stage):
    """Reads `sample_id`, `branch`, `text`; on synthetic rows writes the render (see the module doc)."""

    name: ClassVar[str] = "render"
    synthetic: Synthetic = Synthetic()
    augment: Augment = Augment()
    seed: int = 0

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.IMAGE, pa.binary()), pa.field(S.TEXT, pa.string()), pa.field(S.LINES, pa.string()),
                pa.field(S.RENDER, pa.string()), pa.field(S.AUGMENTATION, pa.string()), pa.field(S.TEXT_KEY, pa.string()),
                pa.field(ERROR, pa.string()), pa.field(ERROR_DETAIL, pa.string())]

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        out = {f.name: batch.column(f.name).to_pylist() for f in self.adds()}
        ids, branches = batch.column(SAMPLE_ID).to_pylist(), batch.column(S.BRANCH).to_pylist()
        for i, (sid, branch) in enumerate(zip(ids, branches)):
            if branch != "synthetic" or out[ERROR][i] is not None:
                continue
            text = normalize_text(out[S.TEXT][i])
            if not text:
                out[ERROR][i], out[ERROR_DETAIL][i] = "text_missing", "no text left after normalisation"
                out[S.TEXT][i] = None
                continue
            out[S.TEXT_KEY][i] = text_key(text)
            r = render(text, render_seed(self.seed, sid), self.synthetic, self.augment)
            buf = io.BytesIO()
            r["image"].save(buf, format="PNG")
            out[S.IMAGE][i] = buf.getvalue()
            out[S.TEXT][i] = r["text"]
            out[S.LINES][i] = S.lines_json(r["lines"])
            out[S.RENDER][i] = json.dumps(r["render"], sort_keys=True)
            out[S.AUGMENTATION][i] = None if r["augmentation"] is None else json.dumps(r["augmentation"], sort_keys=True)
        return out
