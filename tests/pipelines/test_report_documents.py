"""The report's document gallery: a kind that declares a layout (interleaved) has sampled documents shown as
the head of their text with every image's thumbnail in place and its own fate. The layout cut on Arrow
batches; the material and the rendered page from the interleaved kind's run on real debian-handbook pages
(the session-scoped `interleaved_run` of tests/pipelines/conftest.py)."""
from __future__ import annotations

import io
import json
import os
from html.parser import HTMLParser

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.report import material as M
from pipelines.report import page as R


@pytest.fixture
def run(interleaved_run):  # the session's run of the interleaved kind (tests/pipelines/conftest.py)
    return interleaved_run


def test_layout_excerpt_cuts_text_and_images_in_reading_order():
    words = " ".join(["handbook"] * 200)  # 1,799 characters
    layout = [{"text": "Title"}, {"image": 0}, {"text": words}, {"image": 1}, {"text": "tail"}, {"image": 7}]
    batch = pa.RecordBatch.from_pylist([
        {"segments": json.dumps(layout)},
        {"segments": json.dumps([{"image": i} for i in range(5)] + [{"text": "x"}])},
        {"segments": "not json"}, {"segments": None},
    ])
    out = M.LayoutExcerpt(chars=1000, images=3).apply(batch).to_pylist()
    assert "segments" not in out[0]
    head = json.loads(out[0]["layout_excerpt"])
    assert head[:2] == [{"text": "Title"}, {"image": 0}] and len(head) == 3  # cut inside the long text
    cut = head[2]["text"]
    assert cut.endswith("handbook…") and len(cut) <= 1000 - len("Title") + 1 and words.startswith(cut[:-1])
    assert out[0]["layout_shown"] == [0] and out[0]["layout_placed"] == [0, 1, 7]
    assert out[0]["layout_chars"] == len("Title") + len(words) + len("tail") and out[0]["layout_images"] == 3
    # at most `images` images; the text after them is not shown either (the head is a prefix of the document)
    assert json.loads(out[1]["layout_excerpt"]) == [{"image": 0}, {"image": 1}, {"image": 2}]
    assert out[1]["layout_placed"] == [0, 1, 2, 3, 4] and out[1]["layout_images"] == 5
    for bad in out[2:]:
        assert bad["layout_excerpt"] is None and bad["layout_shown"] is None and bad["layout_chars"] is None


class _Documents(HTMLParser):
    """Each <article class=doc> of the page: its data attributes, and in order its text segments and images
    (data-sample, data-fate, data-position, whether in the text or after it)."""

    def __init__(self):
        super().__init__()
        self.docs: list[dict] = []
        self.in_seg = self.off = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "article" and "doc" in cls:
            self.docs.append({"sample": a.get("data-sample"), "fate": a.get("data-fate"), "parts": []})
        elif not self.docs:
            return
        elif tag == "div" and "seg" in cls:
            self.in_seg = True
            self.docs[-1]["parts"].append(["text", ""])
        elif tag == "div" and "offtext" in cls:
            self.off = True
        elif tag == "figure" and "docimg" in cls:
            self.docs[-1]["parts"].append(["image", a.get("data-sample"), a.get("data-fate"), a.get("data-position"),
                                           "off" if self.off else "in"])
        elif tag == "img" and self.docs[-1]["parts"] and self.docs[-1]["parts"][-1][0] == "image":
            self.docs[-1]["parts"][-1].append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "div" and self.in_seg:
            self.in_seg = False
        if tag == "article":
            self.off = False

    def handle_data(self, data):
        if self.in_seg:
            self.docs[-1]["parts"][-1][1] += data


def _ledger(out: str) -> dict[str, dict]:
    return {r["sample_id"]: r for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()}


def test_documents_material_is_sampled_and_bounded(run):
    out, _, _ = run
    mdir = M.material_dir(out, "interleaved")
    with open(os.path.join(mdir, "material.json"), encoding="utf-8") as f:
        meta = json.load(f)["documents"]
    assert meta["layout"] == ["segments", "position"] and meta["chars"] == M.DOC_CHARS
    docs = pq.read_table(os.path.join(mdir, "documents.parquet")).to_pylist()
    images = pq.read_table(os.path.join(mdir, "document-images.parquet")).to_pylist()
    assert meta["documents"] == len(docs) and meta["images"] == len(images)
    ledger = _ledger(out)
    by_key = {d["source_key"]: d for d in docs}
    for d in docs:
        assert ledger[d["sample_id"]]["unit"] == "document" and (d["status"], d["reason"]) == (
            ledger[d["sample_id"]]["status"], ledger[d["sample_id"]]["reason"])
        text = "".join(s.get("text", "") for s in json.loads(d["layout_excerpt"]))
        assert len(text) <= M.DOC_CHARS and "segments" not in d
    kept = [d for d in docs if "kept" in d["sections"]]
    assert len(kept) == 4 and all(d["status"] == "kept" for d in kept)  # the run keeps 4 (<= DOC_KEPT)
    for reason in ("language", "too_few_words", "photo_album", "text_near_duplicate"):
        assert any(reason in d["sections"] for d in docs), reason
    article = by_key["planted/article.html"]
    assert {"kept", "image:qr_code", "image:ad_image"} <= set(article["sections"])
    # the article's images: those its head places, in place, and the two in its navigation and footer
    mine = {r["source_key"].split("::", 1)[1]: r for r in images if r["parent_id"] == article["sample_id"]}
    assert mine["nav-logo.png"]["in_text"] is False and mine["nav-logo.png"]["reason"] == "image_boilerplate"
    assert mine["badge.png"]["in_text"] is False
    assert mine["fig1.jpg"]["in_text"] and mine["fig1.jpg"]["status"] == "kept"
    assert mine["fig1.jpg"]["position"] in article["layout_shown"]
    for r in images:
        assert (r["status"], r["reason"]) == (ledger[r["sample_id"]]["status"], ledger[r["sample_id"]]["reason"])
        if r["thumb"] is not None:
            assert max(Image.open(io.BytesIO(r["thumb"])).size) <= 160
    assert mine["missing.png"]["reason"] == "image_missing" and mine["missing.png"]["thumb"] is None


def test_report_page_shows_documents_with_images_in_place(run):
    out, _, _ = run
    ledger = _ledger(out)
    with open(os.path.join(out, "reports", "index.html"), encoding="utf-8") as f:
        page = f.read()
    assert page == R.render(out, in_run=True)  # the run's page is the one the material renders
    assert "id='documents-interleaved'" in page and "id='documents-interleaved-image-qr_code'" in page
    parser = _Documents()
    parser.feed(page)
    docs = {d["sample"]: d for d in parser.docs}
    article = next(d for s, d in docs.items() if ledger[s]["source_key"] == "planted/article.html")
    assert article["fate"] == "kept"
    parts = article["parts"]
    # the article opens with its heading and first paragraph, then the first figure, then the next paragraph
    assert parts[0][0] == "text" and "After the first boot" in parts[0][1]
    first = next(i for i, p in enumerate(parts) if p[0] == "image")
    assert ledger[parts[first][1]]["source_key"].endswith("::fig1.jpg") and parts[first][2] == "kept"
    assert parts[first][5].startswith("data:image/jpeg;base64,") and parts[first + 1][0] == "text"
    # every image in the page says what became of it, as the ledger does
    fates = {}
    for p in (p for d in parser.docs for p in d["parts"] if p[0] == "image" and p[1]):
        row = ledger[p[1]]
        assert p[2] == ("kept" if row["status"] == "kept" else row["reason"])
        assert row["parent_id"] in docs
        fates[row["source_key"].split("::", 1)[1]] = (p[2], p[4])
    assert fates["nav-logo.png"] == ("image_boilerplate", "off")
    positions = [int(p[3]) for p in parts if p[0] == "image" and p[4] == "in"]
    assert positions == sorted(positions) and len(positions) >= 5  # in reading order, several in the head
    assert {"qr_code", "ad_image", "image_missing", "image_too_small"} <= {p[2] for p in parts if p[0] == "image"}
    # a dropped document shows its reason and the value that decided it
    lang = next(d for s, d in docs.items() if ledger[s]["reason"] == "language")
    assert lang["fate"] == "language" and any(p[0] == "text" and p[1].strip() for p in lang["parts"])


def test_documents_render_in_headless_chromium(run):
    """The figures sit between the paragraphs on screen (not after the text), every thumbnail loads."""
    import pytest

    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.jobs.test_report import CHROMIUM, CHROMIUM_ARGS

    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make system installs it)")
    out, _, _ = run
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto("file://" + os.path.join(out, "reports", "index.html"), wait_until="load")
            assert not errors, errors
            broken = page.eval_on_selector_all("article.doc img", "els => els.filter(e => !(e.complete && "
                                               "e.naturalWidth > 0)).length")
            assert broken == 0 and page.locator("article.doc img").count() >= 20
            article = page.locator("article.doc", has_text="planted/article.html").first
            segs = article.locator(".doctext > .seg")
            fig = article.locator(".doctext > figure.docimg").first
            top = [segs.nth(i).bounding_box()["y"] for i in range(segs.count())]
            y = fig.bounding_box()["y"]
            assert top[0] < y < top[-1]  # the first figure is drawn between the first and the last paragraph
        finally:
            browser.close()
