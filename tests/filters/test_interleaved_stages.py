"""Stages of the interleaved kind on real pages and plain Arrow batches (no JVM): main-content extraction on
Debian's debian-handbook, src resolution, the document text statistics and language, MinHash on planted
near-duplicate pages, QR/barcode detection on generated codes, and the unit filter."""
from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from filters.decode import Decode
from filters.doc_text import (
    DocText,
    OnUnit,
    estimated_jaccard,
    gopher_stats,
    minhash,
    perm_masks,
    shingles,
    words_of,
)
from filters.html_extract import ReadDocuments, document_text, extract_page, resolve_src
from filters.qr import find_barcodes
from schemas import interleaved as S

HANDBOOK = "/usr/share/doc/debian-handbook/html"
PAGE = "sect.main-desktop-tools.html"


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def copy_page(lang: str, page: str, dest: str) -> str:
    """A real handbook page and the images it names, copied under dest/ (same relative layout)."""
    os.makedirs(dest, exist_ok=True)
    src_dir = os.path.join(HANDBOOK, lang)
    shutil.copy(os.path.join(src_dir, page), os.path.join(dest, page))
    html = read_text(os.path.join(src_dir, page))
    for im in extract_page(html).images:
        path = os.path.normpath(os.path.join(dest, im.src))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copy(os.path.normpath(os.path.join(src_dir, im.src)), path)
    return os.path.join(dest, page)


def noise_image(path: str, w: int, h: int, seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w, 1)), (y * 255 // max(h, 1)), ((x + y) * 127 // max(w + h, 1))], -1)
    arr = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=80)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    return buf.getvalue()


def test_extraction_keeps_figures_in_place_on_real_pages():
    html = read_text(os.path.join(HANDBOOK, "en-US", PAGE))
    page = extract_page(html)
    assert page.title == "13.4. Email"
    assert [im.src for im in page.images] == ["Common_Content/images//image_left.png",
                                              "Common_Content/images//image_right.png", "images/evolution.png",
                                              "images/kmail.png", "images/thunderbird.png"]
    assert [im.alt for im in page.images][2:] == ["The Evolution email software", "The KMail email software",
                                                  "The Thunderbird email software"]
    order = [("i", s["image"]) if "image" in s else ("t", s["text"][:30]) for s in page.segments]
    positions = [p for k, p in order if k == "i"]
    assert positions[-3:] == [2, 3, 4]  # the figures, in document order
    text = document_text(page.segments)
    # each figure sits after the paragraph that introduces it and before its caption
    for i, (intro, caption) in enumerate([("GNOME email client", "Figure 13.8"), ("KDE email software", "Figure 13.9"),
                                          ("Mozilla software suite", "Figure 13.10")]):
        k = next(j for j, s in enumerate(page.segments) if s.get("image") == 2 + i)
        assert intro in page.segments[k - 1]["text"] and page.segments[k + 1]["text"].startswith(caption)
    # navigation ("Prev", "Next") and the ebook banner are boilerplate: gone
    assert "Download the ebook" not in text and "Prev" not in text.split()


def test_extraction_handles_chinese_and_drops_images_in_boilerplate():
    html = read_text(os.path.join(HANDBOOK, "zh-CN", PAGE))
    page = extract_page(html)
    assert "邮件" in document_text(page.segments) and sum(im.in_main for im in page.images) >= 3
    planted = ("<html><head><title>t</title></head><body><nav class='menu'><a href='/'><img src='logo.png' "
               "alt='home'></a> <a href='/a'>About</a> <a href='/b'>Blog</a></nav><article><h1>A title</h1>"
               "<p>" + "Some words of real article text here. " * 20 + "</p><img src='fig.png' alt='a figure'>"
               "<p>" + "More text after the figure follows now. " * 10 + "</p></article><footer><p>Footer links "
               "<img src='badge.png'></p></footer></body></html>")
    page = extract_page(planted)
    assert {im.src: im.in_main for im in page.images} == {"logo.png": False, "fig.png": True, "badge.png": False}
    assert [s.get("image") for s in page.segments if "image" in s] == [1]


def test_resolve_src(tmp_path):
    root = str(tmp_path)
    page = f"{root}/en/a.html"
    assert resolve_src(page, root, "images/x.png") == ("file", f"{root}/en/images/x.png")
    assert resolve_src(page, root, "../img/x%20y.png?v=2#f") == ("file", f"{root}/img/x y.png")
    assert resolve_src(page, root, "/shared/x.png") == ("file", f"{root}/shared/x.png")
    assert resolve_src(page, root, "../../etc/passwd")[0] == "error:image_outside_input"
    assert resolve_src(page, root, "https://e.org/x.png") == ("url", "https://e.org/x.png")
    assert resolve_src(page, root, "//cdn.e.org/x.png") == ("url", "https://cdn.e.org/x.png")
    assert resolve_src(page, root, "javascript:void(0)")[0] == "error:image_outside_input"
    assert resolve_src(page, root, "")[0] == "error:image_missing"
    assert resolve_src(page, root, "data:image/png;base64,AAAA")[0] == "data"
    s3 = resolve_src("s3://b/corpus/en/a.html", "s3://b/corpus", "../img/x.png")
    assert s3 == ("file", "s3://b/corpus/img/x.png")


def test_reader_rows_account_for_every_img(tmp_path):
    root = str(tmp_path)
    page = copy_page("en-US", PAGE, os.path.join(root, "en"))
    os.remove(os.path.join(root, "en", "images", "kmail.png"))
    rows = ReadDocuments().read_page(page, root, "hb", "pages:x")
    doc, images = rows[0], rows[1:]
    assert doc["unit"] == "document" and doc["source_key"] == f"en/{PAGE}" and doc.get("error") is None
    assert [r["source_key"] for r in images] == [f"en/{PAGE}::{s}" for s in (
        "Common_Content/images//image_left.png", "Common_Content/images//image_right.png", "images/evolution.png",
        "images/kmail.png", "images/thunderbird.png")]
    assert all(r["parent_id"] == doc["sample_id"] and r["unit"] == "image" for r in images)
    assert images[3]["error"] == "image_missing" and images[3].get("image") is None
    assert images[2]["image"][:8] == b"\x89PNG\r\n\x1a\n" and "Evolution" in images[2]["caption"]
    assert len({r["sample_id"] for r in rows}) == len(rows)
    pa.RecordBatch.from_pylist(rows, schema=S.RAW)  # the declared schema holds them


def test_decode_runs_on_image_rows_only(tmp_path):
    root = str(tmp_path)
    page = copy_page("en-US", PAGE, os.path.join(root, "en"))
    batch = pa.RecordBatch.from_pylist(ReadDocuments().read_page(page, root, "hb", "u"), schema=S.RAW)
    out = OnUnit(Decode()).apply(batch)
    rows = out.to_pylist()
    assert rows[0]["error"] is None and rows[0]["width"] is None  # the document is not an image
    assert [(r["width"], r["height"]) for r in rows[1:3]] == [(192, 50), (62, 50)]
    assert all(r["image"][:3] == b"\xff\xd8\xff" for r in rows[1:])  # decoded to JPEG


def test_doc_text_language_and_gopher_statistics():
    rows = []
    for lang in ("en-US", "zh-CN", "de-DE"):
        rows += ReadDocuments().read_page(os.path.join(HANDBOOK, lang, PAGE), HANDBOOK, "hb", "u")[:1]
    junk = "\n".join(["# buy now ..."] * 30)
    rows.append(rows[0] | {"sample_id": "f" * 32, S.SEGMENTS: json.dumps([{"text": junk}])})
    batch = pa.RecordBatch.from_pylist(rows, schema=S.RAW)
    out = DocText().apply(batch).to_pylist()
    assert [r["language"] for r in out[:3]] == ["en", "zh", "de"]
    en = out[0]
    assert 150 < en["words"] < 400 and 4 < en["mean_word_length"] < 7 and en["dup_line_frac"] == 0
    assert len(en["minhash"]) == 4 * 120 and len(en["paragraphs"]) == len(en["paragraph_chars"]) > 3
    bad = out[3]
    assert bad["dup_line_frac"] == 1.0 and bad["symbol_ratio"] > 0.1 and bad["ellipsis_lines"] == 1.0
    assert gopher_stats("- a\n- b\n* c\nplain")["bullet_lines"] == 0.75


def _perturb(words: list[str], share: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = list(words)
    for i in rng.choice(len(out), int(len(out) * share), replace=False):
        out[i] = f"w{rng.integers(1e9)}"
    return out


def test_minhash_recall_and_precision_on_planted_near_duplicates():
    """Handbook pages (real text); a near duplicate is a page with 2 % of its words replaced (true Jaccard
    0.77-0.83) and another
    template's boilerplate around it; the others are distinct pages. Banding 20 x 6 at Jaccard 0.7."""
    pages = sorted(p for p in os.listdir(os.path.join(HANDBOOK, "en-US")) if p.endswith(".html"))[:40]
    texts = [document_text(extract_page(read_text(os.path.join(HANDBOOK, "en-US", p))).segments)
             for p in pages]
    texts = [t for t in texts if len(words_of(t)) > 150][:25]
    masks = perm_masks(120)
    template = words_of("Home | News | Contact us | Subscribe to our newsletter | (c) 2024 Example Media Group")
    sig = [minhash(shingles(words_of(t), 5), masks) for t in texts]
    near = [minhash(shingles(template + _perturb(words_of(t), 0.02, i) + template, 5), masks)
            for i, t in enumerate(texts)]
    bands = 20

    def candidate(a: bytes, b: bytes) -> bool:
        w = 4 * 6
        return any(a[k * w:(k + 1) * w] == b[k * w:(k + 1) * w] for k in range(bands))

    found = sum(candidate(a, b) and estimated_jaccard(a, b) >= 0.7 for a, b in zip(sig, near))
    false = sum(candidate(sig[i], near[j]) and estimated_jaccard(sig[i], near[j]) >= 0.7
                for i in range(len(sig)) for j in range(len(sig)) if i != j)
    assert found / len(sig) >= 0.95  # recall
    assert false == 0  # precision: no distinct pair passes
    assert max(estimated_jaccard(sig[i], sig[j]) for i in range(len(sig)) for j in range(i)) < 0.3


def test_qr_and_barcodes_are_found_in_generated_codes():
    import zxingcpp

    qr = zxingcpp.create_barcode("https://example.org/promo", zxingcpp.BarcodeFormat.QRCode)
    ean = zxingcpp.create_barcode("5901234123457", zxingcpp.BarcodeFormat.EAN13)
    found = []
    for code in (qr, ean):
        img = Image.fromarray(np.asarray(code.to_image(scale=6, add_quiet_zones=True))).convert("RGB")
        canvas = Image.new("RGB", (img.width + 120, img.height + 80), (240, 240, 230))
        canvas.paste(img, (60, 40))
        buf = io.BytesIO()
        canvas.save(buf, format="JPEG", quality=90)
        found.append(find_barcodes(buf.getvalue()))
    assert found == ["QR Code", "EAN-13"]
    assert find_barcodes(noise_image("", 300, 200, 1)) is None
    assert find_barcodes(b"not an image") is None


@pytest.mark.parametrize("src", ["data"])
def test_data_uri_images_are_read(tmp_path, src):
    import base64

    png = noise_image("", 160, 160, 3, "PNG")
    html = ("<html><body><article><p>" + "Plenty of words in this article body. " * 20 + "</p><img src='data:image/png;"
            f"base64,{base64.b64encode(png).decode()}' alt='inline'><p>" + "And more words. " * 10 +
            "</p></article></body></html>")
    (tmp_path / "p.html").write_text(html)
    rows = ReadDocuments().read_page(str(tmp_path / "p.html"), str(tmp_path), "d", "u")
    assert rows[1]["image"] == png and rows[1]["source_key"].startswith("p.html::data:image/png;base64,")


# --- WARC and tables ----------------------------------------------------------------------------------------

def make_warc(site: str, dest: str, pages: list[str], name: str = "crawl") -> str:
    """A real WARC: `python -m http.server` serves `site`, `wget -p --warc-file` crawls the pages (with
    their images) into dest/<name>.warc.gz, and leaves its mirror beside it."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=site,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        os.makedirs(dest, exist_ok=True)
        urls = [f"http://127.0.0.1:{port}/{p}" for p in pages]
        subprocess.run(["wget", "-q", "-p", "-e", "robots=off", f"--warc-file={name}", "-P", ".", *urls], cwd=dest,
                       check=False, timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=10)
    return os.path.join(dest, f"{name}.warc.gz")


def test_warc_pages_get_their_images_from_the_same_warc(tmp_path):
    site = str(tmp_path / "site")
    copy_page("en-US", PAGE, site)
    os.remove(os.path.join(site, "images", "kmail.png"))  # the crawl gets a 404 for it
    warc = make_warc(site, str(tmp_path / "crawl"), [PAGE])
    # the mirror wget leaves beside the WARC would also serve the images: remove it, to read the WARC alone
    shutil.rmtree(next(p for p in (tmp_path / "crawl").iterdir() if p.is_dir()))
    unit = {"format": "warc", "uri": warc, "root": str(tmp_path), "read_unit": warc, "dataset": "d"}
    docs = list(ReadDocuments(fetch_remote=False).read_unit(unit))
    assert len(docs) == 1  # the page; the 404s (css, the missing image) and the images are not documents
    rows = docs[0]
    doc, images = rows[0], {r["source_key"].split("::", 1)[1]: r for r in rows[1:]}
    assert doc["source_key"].startswith("crawl/crawl.warc.gz#http://127.0.0.1:")
    assert doc["page_url"].endswith("/" + PAGE) and doc.get("error") is None
    assert images["images/evolution.png"]["image"][:8] == b"\x89PNG\r\n\x1a\n"
    # `images//x.png`: the crawler keeps the double slash in the target URI, urljoin drops it: still found
    assert images["Common_Content/images//image_left.png"]["image"][:8] == b"\x89PNG\r\n\x1a\n"
    assert images["images/kmail.png"]["error"] == "image_missing"  # not in the WARC (404), not beside it
    assert images["images/thunderbird.png"]["page_host"] == "127.0.0.1"
    assert json.loads(doc["segments"])[-1]["text"].startswith("Figure 13.10")


def test_obelics_and_mmc4_rows(tmp_path):
    import pyarrow.parquet as pq

    fig = noise_image(str(tmp_path / "img" / "a.jpg"), 200, 160, 4)
    rows = [
        {"id": "doc-1", "texts": ["Intro text.", None, "", "After the image."], "images": [None, "img/a.jpg", None, ""],
         "metadata": json.dumps([None, {"alt_text": "a picture"}, None, None]),
         "general_metadata": json.dumps({"url": "https://example.org/a"})},
        {"id": "doc-2", "texts": ["x", "y"], "images": [None], "metadata": "[]", "general_metadata": "{}"},
        {"id": "doc-3", "texts": ["both", None], "images": ["https://e.org/x.jpg", "https://e.org/y.jpg"],
         "metadata": "[]", "general_metadata": "{}"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "obelics.parquet"))
    unit = {"format": "obelics", "uri": str(tmp_path / "obelics.parquet"), "root": str(tmp_path), "read_unit": "u",
            "dataset": "d"}
    docs = list(ReadDocuments().read_unit(unit))
    assert [d[0]["source_key"] for d in docs] == ["obelics.parquet#doc-1", "obelics.parquet#doc-2",
                                                    "obelics.parquet#doc-3"]
    one = docs[0]
    assert json.loads(one[0]["segments"]) == [{"text": "Intro text."}, {"image": 1}, {"text": "After the image."}]
    assert one[1]["source_key"] == "obelics.parquet#doc-1::1" and one[1]["image"] == fig
    assert one[1]["alt"] == "a picture" and one[0]["page_url"] == "https://example.org/a"
    assert docs[1][0]["error"] == "row_invalid" and docs[2][0]["error"] == "row_invalid"
    mmc4 = {"url": "https://example.org/m", "text_list": ["First sentence.", "Second one.", "Third."],
            "image_info": [{"image_name": "img/a.jpg", "raw_url": "https://e.org/a.jpg", "matched_text_index": 1,
                            "matched_sim": 0.31},
                           {"raw_url": "https://e.org/b.jpg", "matched_text_index": 0, "matched_sim": 0.22}]}
    (tmp_path / "mmc4.jsonl").write_text(json.dumps(mmc4) + "\n{broken\n")
    unit = dict(unit, format="mmc4", uri=str(tmp_path / "mmc4.jsonl"))
    docs = list(ReadDocuments().read_unit(unit))
    rows = docs[0]
    assert json.loads(rows[0]["segments"]) == [{"text": "First sentence."}, {"image": 1},
                                               {"text": "Second one."}, {"image": 0}, {"text": "Third."}]
    by_pos = {r["position"]: r for r in rows[1:]}
    assert by_pos[0]["image"] == fig and by_pos[0]["matched_sim"] == pytest.approx(0.31)
    assert by_pos[1]["url"] == "https://e.org/b.jpg" and by_pos[1].get("image") is None
    assert docs[1][0]["error"] == "read_error" and docs[1][0]["source_key"] == "mmc4.jsonl#line1"


def test_token_counts_follow_glm41v_resize():
    from pipelines.interleaved import Tokens, image_tokens, text_tokens

    cfg = Tokens()
    assert image_tokens(1024, 742, cfg) == round(742 / 28) * round(1024 / 28) == 962  # smart_resize rounds
    assert image_tokens(28, 28, cfg) == 16  # scaled up to min_pixels = 112 x 112: 4 x 4 tokens
    assert image_tokens(20000, 20000, cfg) <= cfg.max_pixels // 784
    assert text_tokens("abcd" * 10, cfg) == 10 and text_tokens("中文字符", cfg) == 4


def test_a_page_crawled_twice_gives_two_documents_with_distinct_keys(tmp_path):
    site = str(tmp_path / "site")
    copy_page("en-US", PAGE, site)
    with open(make_warc(site, str(tmp_path / "a"), [PAGE], "a"), "rb") as f:
        data = f.read()
    both = tmp_path / "both.warc.gz"
    both.write_bytes(data + data)  # the same crawl twice: gzip members concatenate
    unit = {"format": "warc", "uri": str(both), "root": str(tmp_path), "read_unit": "u", "dataset": "d"}
    docs = [rows[0] for rows in ReadDocuments(fetch_remote=False).read_unit(unit)]
    assert len(docs) == 2 and docs[1]["source_key"] == docs[0]["source_key"] + "#2"
    assert docs[0]["sample_id"] != docs[1]["sample_id"]


def print_pdf(html_path: str, pdf_path: str) -> str:
    """A real PDF with figures: headless Chromium prints a handbook page with its images."""
    import subprocess

    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
                    f"--print-to-pdf={pdf_path}", f"file://{html_path}"], check=True, timeout=120,
                   capture_output=True)
    return pdf_path


def test_pdf_gives_text_and_figures_in_reading_order(tmp_path):
    site = str(tmp_path / "site")
    pdf = print_pdf(copy_page("en-US", PAGE, site), str(tmp_path / "book.pdf"))
    unit = {"format": "pdf", "uri": pdf, "root": str(tmp_path), "read_unit": "u", "dataset": "d"}
    docs = list(ReadDocuments().read_unit(unit))
    assert len(docs) == 1
    rows = docs[0]
    segments = json.loads(rows[0]["segments"])
    assert rows[0]["source_key"] == "book.pdf" and rows[0].get("error") is None
    images = rows[1:]
    assert [r["source_key"] for r in images] == ["book.pdf::p0.0", "book.pdf::p0.1", "book.pdf::p0.2",
                                                 "book.pdf::p1.0", "book.pdf::p2.0"]
    sizes = [Image.open(io.BytesIO(r["image"])).size for r in images]
    assert sizes[2:] == [(1024, 742), (1024, 719), (1024, 741)]  # the three figures at full resolution
    # each figure comes after the text that introduces it and right before its caption
    text_before = ""
    for s in segments:
        if "image" in s and s["image"] >= 2:
            intro = {2: "GNOME email client", 3: "KMail only handles email", 4: "Mozilla software suite"}[s["image"]]
            assert intro in text_before
            nxt = segments[segments.index(s) + 1]["text"]
            assert nxt.startswith(f"Figure 13.{6 + s['image']}.")
        elif "text" in s:
            text_before += s["text"] + "\n"
