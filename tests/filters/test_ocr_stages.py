"""OCR stages on plain Arrow batches (no JVM), with the real PP-OCR models rapidocr ships: synthetic
renders read back, boxes on the text after a resize, scene photos with and without text, PDF pages
against an independent reader of their text layer, augmentations and the legibility CER."""
from __future__ import annotations

import difflib
import io
import json
import os
import random
import re
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageFont

from filters.augment import Augment, augment
from filters.ocr import Legibility, PpOcr, cer, levenshtein, norm_box, pixel_box, read_lines
from filters.pdf_pages import Academic, markup, pdf_pages
from filters.render import RenderText, Synthetic, render
from schemas import ocr as S

SKIMAGE = os.path.join(os.path.dirname(__import__("skimage").__file__), "data")
DEJAVU_BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
DEBIAN_PDF = "/usr/share/doc/shared-mime-info/shared-mime-info-spec.pdf"
NO_AUG = Augment(probability=0.0)
LATIN = ("The quick brown fox jumps over the lazy dog while five boxing wizards jump quickly.",
         "Pack my box with five dozen liquor jugs. Sphinx of black quartz, judge my vow.")
CHINESE = ("北京是中华人民共和国的首都，也是全国的政治中心和文化中心。",
           "长城是中国古代的军事防御工程，是一道高大、坚固而且连绵不断的长垣。")


def _row(branch="synthetic", text=None, image=None, text_source="render", sid="0" * 32):
    row = {f.name: None for f in S.RAW}
    row.update({"sample_id": sid, "kind": "ocr", "source": "s", "source_key": sid, "branch": branch, "text": text,
                "image": image, "text_source": text_source})
    return row


def _batch(rows):
    return pa.RecordBatch.from_pylist(rows, schema=S.RAW)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- text metrics and boxes --------------------------------------------------------------------------

def _dp(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_bit_parallel_levenshtein_equals_the_textbook_one():
    rng = random.Random(7)
    for _ in range(300):
        a = "".join(rng.choice("abc北京") for _ in range(rng.randint(0, 70)))
        b = "".join(rng.choice("abc北京") for _ in range(rng.randint(0, 70)))
        assert levenshtein(a, b) == _dp(a, b)
    assert cer("abcd", "abcd") == 0.0 and cer("abcd", "") == 1.0 and cer("ab cd", "abcd") == 0.0
    assert cer("left\nright", "right\nleft") == 0.0  # a column order PP-OCR reads differently is no misread


def test_boxes_are_integers_0_999_with_x1_below_x2():
    rng = random.Random(3)
    for _ in range(500):
        w, h = rng.randint(1, 4000), rng.randint(1, 4000)
        x1, x2 = sorted(rng.uniform(-5, w + 5) for _ in range(2))
        y1, y2 = sorted(rng.uniform(-5, h + 5) for _ in range(2))
        assert S.box_ok(norm_box(x1, y1, x2, y2, w, h))
    assert norm_box(0, 0, 640, 480, 640, 480) == [0, 0, 999, 999]
    assert norm_box(10, 10, 10, 10, 100, 100) == [100, 100, 101, 101]  # a point still makes x1 < x2


# --- synthetic renders ---------------------------------------------------------------------------------

def test_renders_are_deterministic_from_their_seed():
    cfg = Synthetic()
    a, b = render(LATIN[0], 11, cfg, Augment()), render(LATIN[0], 11, cfg, Augment())
    assert _png(a["image"]) == _png(b["image"]) and a["lines"] == b["lines"] and a["render"] == b["render"]
    c = render(LATIN[0], 12, cfg, Augment())
    assert _png(c["image"]) != _png(a["image"])
    assert a["render"]["seed"] == 11 and {"font", "font_size", "layout", "orientation", "ink"} <= set(a["render"])
    # the ground truth is exactly what was drawn: every line's text, in reading order
    for s in range(20):
        r = render(LATIN[1] + " " + LATIN[0], s, cfg)
        drawn = [ln["text"] for ln in r["lines"]]
        assert r["text"].replace("\t", "\n").split("\n") == drawn
        assert all(S.box_ok(ln["box"]) for ln in r["lines"])
        assert " ".join(drawn).replace("\t", " ").split() == (LATIN[1] + " " + LATIN[0]).split()[:len(
            " ".join(drawn).split())]


@pytest.mark.parametrize("texts,font_dir,max_cer", [(LATIN, "/usr/share/fonts/truetype/dejavu", 0.02),
                                                    (CHINESE, "/usr/share/fonts/opentype/noto", 0.05)])
def test_synthetic_round_trip_pp_ocr_reads_back_what_was_rendered(texts, font_dir, max_cer):
    """RenderText then Legibility (a PP-OCR read and its CER vs the ground truth): Latin text reads back
    with a CER of at most 2 %, Chinese with at most 5 %; pure noise under a ground truth scores > 0.5."""
    cfg = Synthetic(font_dirs=(font_dir,), layouts=("paragraph",), layout_weights=(1.0,), orientations=(0,),
                    orientation_weights=(1.0,), font_size=(26, 32), width=(600, 700))
    rows = [_row(text=t, sid=f"{i:032x}") for i, t in enumerate(texts)]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 400, 3), dtype=np.uint8))
    rendered = RenderText(cfg, NO_AUG, seed=5).apply(_batch(rows))
    assert rendered.column("error").to_pylist() == [None] * 2
    out = Legibility().apply(rendered, 1).to_pylist()
    for r in out:
        assert r["cer"] <= max_cer, (r["text"], r["ocr_text"], r["cer"])
        assert "Noto" in json.loads(r["render"])["font"] or font_dir.endswith("dejavu")
    garbage = Legibility().apply(_batch([_row(text=texts[0], image=_png(noise))]), 1).to_pylist()
    assert garbage[0]["cer"] > 0.5  # illegible: the legibility decision drops it at max_cer 0.5
    assert Legibility(branches=("academic",)).apply(rendered, 1).column("cer").to_pylist() == [None, None]


def test_boxes_stay_on_the_text_after_a_resize():
    cfg = Synthetic(font_dirs=("/usr/share/fonts/truetype/liberation",), layouts=("paragraph",),
                    layout_weights=(1.0,), orientations=(0,), orientation_weights=(1.0,), font_size=(28, 28),
                    width=(700, 700))
    r = render(LATIN[0] + " " + LATIN[1], 4, cfg, NO_AUG)
    img = r["image"].resize((r["image"].width // 2, r["image"].height // 2), Image.Resampling.LANCZOS)
    grey = np.asarray(img.convert("L"), dtype=np.float32)
    ink = np.abs(grey - np.median(grey)) > 60
    inside = np.zeros_like(ink)
    for ln in r["lines"]:
        x1, y1, x2, y2 = pixel_box(ln["box"], *img.size)
        assert ink[y1:y2, x1:x2].mean() > 0.05  # each box holds strokes
        inside[max(0, y1 - 1):y2 + 1, max(0, x1 - 1):x2 + 1] = True
    assert ink[inside].sum() / ink.sum() > 0.99  # and almost no stroke lies outside the boxes
    # the first line's box, cut out of the half-size image, reads as that line
    x1, y1, x2, y2 = pixel_box(r["lines"][0]["box"], *img.size)
    crop = Image.new("RGB", (x2 - x1 + 40, y2 - y1 + 40), img.getpixel((1, 1)))
    crop.paste(img.crop((x1, y1, x2, y2)), (20, 20))
    _, every = read_lines(crop, 1, 0.0, 0.0)
    assert cer(r["lines"][0]["text"], " ".join(ln["text"] for ln in every)) <= 0.05


def test_augmentations_are_recorded_and_a_rotation_moves_the_boxes():
    base = Image.new("RGB", (400, 200), "white")
    ImageDraw.Draw(base).rectangle((150, 80, 250, 120), fill="black")
    cfg = Augment(probability=1.0, rotation=1.0, max_rotation=2.0, erosion=1.0, blur=1.0, noise=1.0, jpeg=1.0)
    img, boxes, rec = augment(base, [(150.0, 80.0, 250.0, 120.0)], 99, cfg)
    img2, boxes2, rec2 = augment(base, [(150.0, 80.0, 250.0, 120.0)], 99, cfg)
    assert rec == rec2 and boxes == boxes2 and np.array_equal(np.asarray(img), np.asarray(img2))
    assert rec["seed"] == 99 and [o["op"] for o in rec["ops"]] == ["rotate", "erode" if rec["ops"][1]["op"] == "erode"
                                                                    else "dilate", "blur", "noise", "jpeg"]
    assert rec["ops"][0]["degrees"] != 0 and abs(rec["ops"][0]["degrees"]) <= 2.0
    (x1, y1, x2, y2), = boxes
    dark = np.argwhere(np.asarray(img.convert("L")) < 100)
    assert x1 - 3 <= dark[:, 1].min() and dark[:, 1].max() <= x2 + 3
    assert y1 - 3 <= dark[:, 0].min() and dark[:, 0].max() <= y2 + 3
    assert augment(base, [], 1, Augment(probability=0.0))[2] is None


# --- scene text --------------------------------------------------------------------------------------

def _photo(name: str) -> bytes:
    with open(os.path.join(SKIMAGE, name), "rb") as f:
        return f.read()


def test_scene_ocr_on_real_photos_with_and_without_text():
    sign = Image.open(io.BytesIO(_photo("coffee.png"))).convert("RGB")
    draw = ImageDraw.Draw(sign)
    draw.rectangle((40, 30, 440, 110), fill=(250, 250, 240))
    draw.text((55, 40), "OPEN DAILY 8-5", fill=(20, 20, 20), font=ImageFont.truetype(DEJAVU_BOLD, 44))
    rows = [_row("scene", image=_photo("motorcycle_left.png"), text_source="ocr"),  # a real sign on the bike
            _row("scene", image=_photo("chelsea.png"), text_source="ocr"),  # a cat: no text
            _row("scene", image=_png(sign), text_source="ocr")]
    out = PpOcr(min_score=0.5, min_box_px=8).apply(_batch(rows), 1).to_pylist()
    bike, cat, cafe = out
    assert "YAMA" in bike["text"] and json.loads(bike["lines"])[0]["score"] >= 0.5
    assert cat["text"] == "" and json.loads(cat["lines"]) == []
    assert cafe["text"] == "OPEN DAILY 8-5"
    (line,) = json.loads(cafe["lines"])
    x1, y1, x2, y2 = pixel_box(line["box"], 600, 400)
    assert 35 <= x1 <= 70 and 30 <= y1 <= 60 and 360 <= x2 <= 445 and 80 <= y2 <= 115  # on the painted sign
    # a stricter minimum box size drops the sign's only line
    strict = PpOcr(min_score=0.5, min_box_px=80).apply(_batch(rows[2:]), 1).to_pylist()
    assert json.loads(strict[0]["lines"]) == []


# --- academic pages ----------------------------------------------------------------------------------

def _plain(text: str) -> str:
    return " ".join(re.sub(r"^(#+|-) ", "", text, flags=re.MULTILINE).split())


@pytest.mark.skipif(not os.path.exists(DEBIAN_PDF), reason="shared-mime-info's PDF is not installed")
def test_debian_pdf_pages_match_their_text_layer():
    """shared-mime-info's specification (a Debian documentation PDF): every page renders, and its markup,
    stripped of the markup signs, matches pypdf's own reading of the text layer with similarity >= 0.9."""
    from pypdf import PdfReader

    with open(DEBIAN_PDF, "rb") as f:
        data = f.read()
    pages = list(pdf_pages(data, Academic(dpi=72)))
    reader = PdfReader(io.BytesIO(data))
    assert len(pages) == len(reader.pages) >= 10
    for p in pages[:6]:
        assert p["error"] is None and p["text_source"] == "text_layer"
        assert Image.open(io.BytesIO(p["image"])).size[0] > 500
        theirs = " ".join(reader.pages[p["page"] - 1].extract_text().split())
        ratio = difflib.SequenceMatcher(None, _plain(p["markup"]), theirs, autojunk=False).ratio()
        assert ratio >= 0.9, (p["page"], ratio)
        assert all(S.box_ok(ln["box"]) for ln in p["lines"])
    assert "## 1.3. Language used in this specification" in pages[1]["markup"]
    assert "# 2. Unified system" in pages[1]["markup"]
    assert "\n- A standard way of getting the MIME type for a file." in pages[1]["markup"]


def test_a_page_without_a_text_layer_is_left_to_ocr_and_a_broken_pdf_raises():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scan = Image.new("L", (600, 120), 255)
    ImageDraw.Draw(scan).text((20, 30), "Scanned page", fill=0, font=ImageFont.truetype(DEJAVU_BOLD, 40))
    fig = plt.figure(figsize=(6, 1.2))
    fig.figimage(np.asarray(scan), cmap="gray")
    buf = io.BytesIO()
    fig.savefig(buf, format="pdf")
    plt.close(fig)
    (page,) = pdf_pages(buf.getvalue(), Academic())
    assert page["text_source"] == "ocr" and page["text"] is None and page["markup"] is None
    out = PpOcr().apply(_batch([_row("academic", image=page["image"], text_source="ocr")]), 1).to_pylist()
    assert out[0]["text"] == "Scanned page"
    import pypdfium2

    with pytest.raises(pypdfium2.PdfiumError):
        list(pdf_pages(b"%PDF-1.4 not really", Academic()))


def test_markup_headings_lists_and_paragraphs():
    def line(text, top, height=10.0, left=72.0):
        return {"text": text, "left": left, "right": 500.0, "top": top, "bottom": top - height}

    lines = [line("Results", 700, 20), line("We measured the ex-", 680), line("ample twice.", 668),
             line("- first point", 640), line("continued here", 628, left=84.0), line("New paragraph.", 600)]
    assert markup(lines) == ("# Results\n\nWe measured the example twice.\n\n- first point continued here"
                             "\n\nNew paragraph.")


def test_latex_beside_the_pdf_becomes_markup_split_at_its_pages(tmp_path):
    """A PDF with its LaTeX source beside it (the PDF drawn by matplotlib with the source's words, as a
    TeX engine would lay them out over two pages): pandoc's markup keeps the formulas' TeX and the table,
    and each page gets the blocks whose words its text layer holds (Nougat's split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    from pipelines.ocr import Ocr, read_ocr_unit

    (tmp_path / "paper.tex").write_text(r"""\documentclass{article}
\begin{document}
\section{Introduction}
We study the energy relation $E=mc^2$ in detail.
\begin{itemize}\item first observation \item second observation\end{itemize}
\[ \int_0^1 x\,dx = \frac{1}{2} \]
\section{Results}
Our measurements agree with theory.
\begin{tabular}{ll} alpha & beta \\ gamma & delta \end{tabular}
\end{document}
""", encoding="utf-8")
    pages = [["Introduction", "We study the energy relation E=mc2 in detail.", "first observation",
              "second observation", "1/2"], ["Results", "Our measurements agree with theory.", "alpha beta",
                                             "gamma delta"]]
    with plt.rc_context({"pdf.fonttype": 42}), PdfPages(tmp_path / "paper.pdf") as pdf:
        for lines in pages:
            fig = plt.figure(figsize=(6, 4))
            for k, text in enumerate(lines):
                fig.text(0.1, 0.85 - k * 0.12, text, fontsize=12)
            pdf.savefig(fig)
            plt.close(fig)
    unit = {"format": "pdf", "uri": str(tmp_path / "paper.pdf"), "root": str(tmp_path)}
    rows = list(read_ocr_unit(unit, 1 << 30, Ocr(), ""))
    assert [r["markup_source"] for r in rows] == ["latex", "latex"] and all(r["error"] is None for r in rows)
    first, second = rows[0]["markup"], rows[1]["markup"]
    assert first.startswith("# Introduction") and "$E=mc^2$" in first and "observation" in first
    assert r"$$\int_0^1 x\,dx = \frac{1}{2}$$" in first  # the display formula stays with its page
    assert second.startswith("# Results") and "| alpha | beta  |\n| gamma | delta |" in second  # a pipe table
    assert "Introduction" not in second and "Results" not in first
    (tmp_path / "paper.tex").write_bytes(b"\\begin{document}\\section{x")  # pandoc fails: the text layer stands
    rows = list(read_ocr_unit(unit, 1 << 30, Ocr(), ""))
    assert [r["markup_source"] for r in rows] == ["text_layer", "text_layer"]
    assert rows[0]["markup"].endswith("1/2") and "LaTeX source not used" in rows[0]["error_detail"]


def test_backgrounds_come_from_a_folder_of_photos(tmp_path):
    shutil.copy(os.path.join(SKIMAGE, "chelsea.png"), tmp_path / "cat.png")
    shutil.copy(os.path.join(SKIMAGE, "coffee.png"), tmp_path / "cup.png")
    cfg = Synthetic(backgrounds=str(tmp_path), layouts=("paragraph",), layout_weights=(1.0,), orientations=(0,),
                    orientation_weights=(1.0,))
    used = {render(LATIN[0], s, cfg, NO_AUG)["render"]["background"] for s in range(12)}
    assert {"cat.png", "cup.png"} <= used  # and generated paper for the rest (render draws 70 % from photos)
    photo = next(s for s in range(12) if render(LATIN[0], s, cfg, NO_AUG)["render"]["background"] != "paper")
    r = render(LATIN[0], photo, cfg, NO_AUG)
    grey = np.asarray(r["image"].convert("L"), dtype=np.float32)
    assert grey.std() > 10  # a photo, washed out behind the text, not a flat page
    assert _png(r["image"]) == _png(render(LATIN[0], photo, cfg, NO_AUG)["image"])
