"""The academic OCR branch: PDF pages rendered with pypdfium2 (Apache-2.0/BSD; not PyMuPDF, AGPL), each
with its text layer in reading order, per-line boxes, and light markup.

Per page: the image (PNG, `dpi`, longer side at most `max_side`), `lines` (the text layer's lines in
the PDF's content order, pdfium's text rectangles joined on a shared baseline, boxes 0-999), `text`
(those lines joined by newlines) and `markup`: markdown-like text made from the lines: a line set
clearly larger than the page's body text is a heading (`#` / `##`), a line opening with a bullet or
an enumerator is a list item (`- `), other lines are joined into paragraphs (a vertical gap larger
than usual starts a new one; a hyphen at a line's end is joined). A page without a text layer gets
`text_source: ocr` and no text: PP-OCR reads it later (filters/ocr.py). Tables and formulas are not
recovered from a text layer (they come out as lines of text).
"""
from __future__ import annotations

import dataclasses
import io
import re
import statistics
from collections.abc import Iterator

from filters.ocr import norm_box, normalize_text

_BULLET = re.compile(r"^(?:[\u2022\u00b7\u25aa\u25e6\u2023\u2043*\-\u2013]\s+|\(?[0-9a-zA-Z]{1,3}[.)]\s+(?=\S))")


@dataclasses.dataclass(frozen=True)
class Academic:
    """The recipe's `ocr.academic`."""

    dpi: int = 144
    max_side: int = 1600  # longer side of a rendered page, in pixels
    max_pages: int = 500  # pages of one PDF (the rest are not read; counted in the ledger detail of none)
    heading_ratio: float = 1.2  # a line at least this much larger than the body text is a heading
    min_text_chars: int = 10  # a page with fewer text-layer characters has no usable text layer: OCR


def _merge_rects(rects: list[tuple[tuple[float, float, float, float], str]]) -> list[dict]:
    """pdfium's text rectangles (content order) -> lines: consecutive rectangles that share a baseline."""
    lines: list[dict] = []
    for (left, bottom, right, top), text in rects:
        text = normalize_text(text).replace("\n", " ")
        if not text:
            continue
        if lines:
            last = lines[-1]
            overlap = min(top, last["top"]) - max(bottom, last["bottom"])
            if overlap > 0.5 * min(top - bottom, last["top"] - last["bottom"]) and left >= last["left"]:
                last.update(text=last["text"] + " " + text, right=max(right, last["right"]),
                            top=max(top, last["top"]), bottom=min(bottom, last["bottom"]))
                continue
        lines.append({"text": text, "left": left, "bottom": bottom, "right": right, "top": top})
    return lines


def markup(lines: list[dict], heading_ratio: float = 1.2) -> str:
    """Light markup from text-layer lines (PDF points, y up): headings, list items, paragraphs."""
    if not lines:
        return ""
    heights = [ln["top"] - ln["bottom"] for ln in lines]
    body = statistics.median([h for h, ln in zip(heights, lines) for _ in range(min(len(ln["text"]), 200))])
    blocks: list[str] = []
    para: list[str] = []
    prev = None

    def flush():
        if para:
            blocks.append(" ".join(para))
            para.clear()

    for ln, h in zip(lines, heights):
        text = ln["text"]
        if h >= body * heading_ratio and len(text) <= 120:
            flush()
            blocks.append(("# " if h >= body * heading_ratio * 1.35 else "## ") + text)
            prev = None
            continue
        if _BULLET.match(text):
            flush()
            blocks.append("- " + _BULLET.sub("", text, count=1))
            prev = {**ln, "left": ln["left"]}
            continue
        gap = (prev["bottom"] - ln["top"]) if prev is not None else 0.0
        if (not para and blocks and blocks[-1].startswith("- ") and prev is not None and 0 <= gap <= 0.8 * body
                and ln["left"] > prev["left"] + 1):  # a list item's continuation line (indented)
            blocks[-1] += " " + text
            continue
        if prev is None or gap > 0.8 * body or gap < -body:  # a wide gap, or a jump back up (a new column)
            flush()
        if para and para[-1].endswith("-") and text[:1].islower():
            para[-1] = para[-1][:-1] + text
        else:
            para.append(text)
        prev = ln
    flush()
    return "\n\n".join(blocks)


def pdf_pages(data: bytes, cfg: Academic) -> Iterator[dict]:
    """Every page (up to max_pages) of a PDF: {page, image (PNG bytes), text, lines, markup, text_source,
    error}. Raises when the document cannot be opened (the caller records it); a page that fails to
    render gets its own error."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(data)
    try:
        for i in range(min(len(pdf), cfg.max_pages)):
            try:
                yield _page(pdf, i, cfg)
            except Exception as e:  # noqa: BLE001 - one page's failure is that page's row
                yield {"page": i + 1, "error": "pdf_unreadable", "detail": f"page {i + 1}: {type(e).__name__}: {e}"}
    finally:
        pdf.close()


def _page(pdf, i: int, cfg: Academic) -> dict:
    page = pdf[i]
    try:
        pw, ph = page.get_size()
        scale = min(cfg.dpi / 72.0, cfg.max_side / max(pw, ph, 1.0))
        img = page.render(scale=scale).to_pil().convert("RGB")
        tp = page.get_textpage()
        try:
            rects = [(tp.get_rect(k), tp.get_text_bounded(*tp.get_rect(k))) for k in range(tp.count_rects())]
            chars = tp.count_chars()
        finally:
            tp.close()
    finally:
        page.close()
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    merged = _merge_rects(rects)
    if chars < cfg.min_text_chars or sum(len(ln["text"]) for ln in merged) < cfg.min_text_chars:
        return {"page": i + 1, "image": buf.getvalue(), "text": None, "lines": None, "markup": None,
                "text_source": "ocr", "error": None, "detail": None}
    lines = [{"text": ln["text"], "score": 1.0,
              "box": norm_box(ln["left"], ph - ln["top"], ln["right"], ph - ln["bottom"], pw, ph)} for ln in merged]
    return {"page": i + 1, "image": buf.getvalue(), "text": "\n".join(ln["text"] for ln in merged), "lines": lines,
            "markup": markup(merged, cfg.heading_ratio), "text_source": "text_layer", "error": None, "detail": None}


# --- LaTeX source beside the PDF (Nougat's markup) ------------------------------------------------------

PANDOC_TO = "markdown-raw_html-raw_tex-native_divs-native_spans-simple_tables-multiline_tables-grid_tables-fenced_divs-bracketed_spans-header_attributes-link_attributes"
_WORD = re.compile(r"[^\W\d_]{3,}|[\u4e00-\u9fff]", re.UNICODE)


def latex_markup(tex: bytes, timeout: float = 60.0) -> str:
    """LaTeX -> light markup with pandoc (Debian's pandoc; no network, no TeX engine): markdown headings,
    lists, pipe tables, formulas kept as TeX between $ / $$. Raises on a pandoc failure."""
    import subprocess

    proc = subprocess.run(["pandoc", "-f", "latex", "-t", PANDOC_TO, "--wrap=none"], input=tex,
                          capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pandoc exited {proc.returncode}: {proc.stderr.decode('utf-8', 'replace')[:300]}")
    return proc.stdout.decode("utf-8").strip()


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)}


def split_at_pages(markup_text: str, pages: list[str | None]) -> list[str]:
    """The markup's blocks (blank-line separated) assigned to the PDF's pages, in order, as Nougat does:
    each block goes to the page whose text layer holds most of its words, subject to pages never going
    back (a dynamic programme over blocks x pages). Blocks without words (a display formula) follow the
    page that maximises the whole assignment, i.e. their neighbours'. Returns one markup per page."""
    blocks = [b.strip() for b in markup_text.split("\n\n") if b.strip()]
    n, m = len(blocks), len(pages)
    if m == 0:
        return []
    if n == 0:
        return [""] * m
    page_words = [_words(p or "") for p in pages]
    score = []
    for b in blocks:
        w = _words(b)
        score.append([len(w & pw) / len(w) if w else 0.0 for pw in page_words])
    best = [[0.0] * m for _ in range(n)]
    back = [[0] * m for _ in range(n)]
    for j in range(m):
        best[0][j] = score[0][j]
    for i in range(1, n):
        run, arg = best[i - 1][0], 0
        for j in range(m):
            if best[i - 1][j] > run:
                run, arg = best[i - 1][j], j
            best[i][j], back[i][j] = run + score[i][j], arg
    j = max(range(m), key=lambda k: (best[n - 1][k], -k))
    assign = [0] * n
    for i in range(n - 1, -1, -1):
        assign[i] = j
        j = back[i][j]
    out: list[list[str]] = [[] for _ in range(m)]
    for b, p in zip(blocks, assign):
        out[p].append(b)
    return ["\n\n".join(x) for x in out]
