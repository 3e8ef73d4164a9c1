"""The interleaved kind on the spark fixture: a mixed folder of real debian-handbook pages (English, Chinese,
German, an exact copy, the same article under another site template) and planted pages with every kind of
bad image; the ledger accounts for every document and every `<img>`; shards follow the contract and the
trainer's formatter reads them."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from filters.html_extract import document_text, extract_page
from tests.filters.test_interleaved_stages import HANDBOOK, PAGE, copy_page, noise_image, read_text

COPYRIGHT = "Copyright 2024 Example Corp. All rights reserved, reproduction without permission is prohibited."
# long_context 1000: the two handbook pages (~3,250 tokens each) go to interleaved_long, the planted articles
# (~400 and ~800) stay
TEST_SETTINGS = ["interleaved.clip.enabled=false", "interleaved.images.max_documents=3", "shards.max_samples=3",
                 "interleaved.tokens.long_context=1000"]


def _paragraphs(lang: str, page: str, max_words: int) -> list[str]:
    text = document_text(extract_page(read_text(os.path.join(HANDBOOK, lang, page))).segments)
    out, n = [], 0
    for p in text.split("\n\n")[1:]:
        if n >= max_words:
            break
        out.append(p)
        n += len(p.split())
    return out


def _page(body: str, title: str = "planted") -> str:
    return (f"<html><head><title>{title}</title></head><body><nav><a href='/'><img src='nav-logo.png' alt='home'>"
            f"</a> <a href='/news'>News</a> <a href='/about'>About us</a></nav><article>{body}</article>"
            f"<footer><p>Follow us <img src='badge.png' alt='badge'></p></footer></body></html>")


def _qr_jpeg(path: str) -> None:
    import zxingcpp

    code = zxingcpp.create_barcode("https://example.org/promo", zxingcpp.BarcodeFormat.QRCode)
    img = Image.fromarray(np.asarray(code.to_image(scale=8, add_quiet_zones=True))).convert("RGB")
    canvas = Image.new("RGB", (img.width + 100, img.height + 60), (250, 245, 235))
    canvas.paste(img, (50, 30))
    canvas.save(path, format="JPEG", quality=90)


def make_corpus(root: str) -> dict[str, tuple[str, str | None]]:
    """The mixed folder; returns source_key -> (status, reason) for the rows whose fate is fixed."""
    import base64

    copy_page("en-US", PAGE, os.path.join(root, "en"))
    copy_page("zh-CN", PAGE, os.path.join(root, "zh"))
    copy_page("de-DE", PAGE, os.path.join(root, "de"))
    copy_page("en-US", PAGE, os.path.join(root, "copy"))
    # the same article under another site's template, one sentence dropped and a few words changed
    paras = _paragraphs("en-US", PAGE, 10_000)
    paras = [p.replace("powerful", "capable").replace("excellent", "great") for p in paras if "Exchange" not in p]
    site2 = os.path.join(root, "site2")
    os.makedirs(site2)
    body = "".join(f"<p>{p}</p>" for p in paras[:4]) + "<img src='../en/images/evolution.png' alt='Evolution'>" + \
        "".join(f"<p>{p}</p>" for p in paras[4:]) + f"<p>{COPYRIGHT}</p>"
    with open(os.path.join(site2, "email-clients.html"), "w", encoding="utf-8") as f:
        f.write(_page(body, "Email clients"))
    planted = os.path.join(root, "planted")
    os.makedirs(planted)
    for name, (w, h, seed) in {"fig1.jpg": (320, 240, 1), "fig2.jpg": (300, 220, 2), "logo.png": (200, 200, 3),
                               "banner.jpg": (300, 250, 4), "promo.jpg": (220, 180, 5), "tiny.png": (20, 20, 6),
                               "a1.jpg": (240, 200, 7), "a2.jpg": (240, 200, 8), "a3.jpg": (240, 200, 9),
                               "a4.jpg": (240, 200, 10), "nav-logo.png": (180, 180, 11)}.items():
        noise_image(os.path.join(planted, name), w, h, seed, "PNG" if name.endswith(".png") else "JPEG")
    with open(os.path.join(planted, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not really a png")
    _qr_jpeg(os.path.join(planted, "qr.jpg"))
    inline = base64.b64encode(noise_image("", 160, 160, 12, "PNG")).decode()
    text = _paragraphs("en-US", "sect.after-first-boot.html", 250)
    body = (f"<h1>After the first boot</h1><p>{text[0]}</p><img src='fig1.jpg' alt='Figure one'><p>{text[1]}</p>"
            "<img src='logo.png' alt='Our logo'><img src='missing.png' alt='gone'><img src='broken.png' alt='x'>"
            "<img src='../../outside.png' alt='outside'><img src='qr.jpg' alt='scan me'>"
            "<img src='banner.jpg' alt='Spring sale'><a href='https://ad.doubleclick.net/click?x=1'>"
            "<img src='promo.jpg' alt='Offer'></a><img src='tiny.png' alt='dot'>"
            f"<img src='data:image/png;base64,{inline}' alt='inline figure'><img src='fig1.jpg' alt='again'>"
            + "".join(f"<p>{p}</p>" for p in text[2:]) + f"<p>{COPYRIGHT}</p>")
    with open(os.path.join(planted, "article.html"), "w", encoding="utf-8") as f:
        f.write(_page(body, "After the first boot"))
    text = _paragraphs("en-US", "sect.web-browsers.html", 200)
    body = (f"<p>{text[0]}</p><img src='fig2.jpg' alt='Figure two'><img src='logo.png' alt='Our logo'>"
            + "".join(f"<p>{p}</p>" for p in text[1:]) + f"<p>{COPYRIGHT}</p>")
    with open(os.path.join(planted, "article2.html"), "w", encoding="utf-8") as f:
        f.write(_page(body, "Web browsers"))
    words = " ".join(_paragraphs("en-US", "sect.office-suites.html", 60)[0].split()[:60])
    body = (f"<p>{words}</p>" + "".join(f"<img src='a{i}.jpg' alt='photo {i}'>" for i in range(1, 5))
            + "<img src='logo.png' alt='Our logo'>" + f"<p>{COPYRIGHT}</p>")
    with open(os.path.join(planted, "album.html"), "w", encoding="utf-8") as f:
        f.write(_page(body, "Holiday photos"))
    with open(os.path.join(planted, "short.html"), "w", encoding="utf-8") as f:
        f.write(_page("<p>Hello there, a short note.</p><img src='fig2.jpg' alt='x'>"))
    with open(os.path.join(planted, "empty.html"), "w", encoding="utf-8") as f:
        f.write("<html><body><img src='fig2.jpg'></body></html>")
    a = "planted/article.html::"
    return {
        "de/" + PAGE: ("dropped", "language"),
        "zh/" + PAGE: ("kept", None),
        "planted/short.html": ("dropped", "too_few_words"),
        "planted/empty.html": ("dropped", "no_main_content"),
        "planted/article.html": ("kept", None), "planted/article2.html": ("kept", None),
        "planted/album.html": ("dropped", "photo_album"),
        "site2/email-clients.html": ("dropped", "text_near_duplicate"),
        f"en/{PAGE}::Common_Content/images//image_left.png": ("dropped", "image_too_small"),
        f"zh/{PAGE}::images/evolution.png": ("kept", None),
        a + "nav-logo.png": ("dropped", "image_boilerplate"), a + "badge.png": ("dropped", "image_boilerplate"),
        a + "fig1.jpg": ("kept", None), a + "fig1.jpg#2": ("kept", None),
        a + "logo.png": ("dropped", "image_repeated"), "planted/article2.html::logo.png": ("dropped", "image_repeated"),
        a + "missing.png": ("quarantined", "image_missing"), a + "broken.png": ("quarantined", "image_undecodable"),
        a + "../../outside.png": ("quarantined", "image_outside_input"), a + "qr.jpg": ("dropped", "qr_code"),
        a + "banner.jpg": ("dropped", "ad_image"), a + "promo.jpg": ("dropped", "ad_image"),
        a + "tiny.png": ("dropped", "image_too_small"),
        a + f"data:image/png;base64,{inline}": ("kept", None),
        "planted/article2.html::fig2.jpg": ("kept", None),
        "planted/album.html::a1.jpg": ("dropped", "parent_removed"),
        f"de/{PAGE}::images/kmail.png": ("dropped", "parent_removed"),
    }


@pytest.fixture
def run(interleaved_run):
    return interleaved_run


def _ledger(out: str) -> dict[str, dict]:
    return {r["source_key"]: r for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()}


def test_every_document_and_img_is_in_the_ledger_with_its_reason(run):
    out, summary, want = run
    rows = _ledger(out)
    got = {k: (rows[k]["status"], rows[k]["reason"]) for k in want}
    assert got == want
    pages = [k for k in rows if "::" not in k]
    assert len(pages) == 10 and all(rows[k]["unit"] == "document" for k in pages)
    # every <img> of every page has a row, under its page
    for k in pages:
        html = read_text(rows[k]["source"])
        n = len(extract_page(html).images) if rows[k]["reason"] != "read_error" else 0
        imgs = [r for r in rows.values() if r["parent_id"] == rows[k]["sample_id"]]
        assert len(imgs) == n and all(r["unit"] == "image" and r["source_key"].startswith(k + "::") for r in imgs)
    # the exact copy: one of the two kept, the other names it
    en, copy = rows[f"en/{PAGE}"], rows[f"copy/{PAGE}"]
    assert sorted([en["reason"] or "", copy["reason"] or ""]) == ["", "text_exact_duplicate"]
    keeper, dup = (en, copy) if en["status"] == "kept" else (copy, en)
    assert dup["duplicate_of"] == keeper["sample_id"]
    assert rows["site2/email-clients.html"]["duplicate_of"] == keeper["sample_id"]
    k = summary["kinds"]["interleaved"]
    assert k["units"]["document"]["input"] == 10 and k["units"]["image"]["input"] == len(rows) - 10
    assert summary["gates"]["passed"], summary["gates"]["failed_critical"]


def _samples(out: str, sets: tuple[str, ...] = ("interleaved", "interleaved_long")) -> list[dict]:
    from trainer import shards

    found = shards.find_kinds(os.path.join(out, "shards"), list(sets))
    return [s for name in sets for s in shards.iter_raw_samples([x.url for x in found[name]])]


def test_documents_over_the_token_bound_go_to_their_own_shard_set(run):
    out, summary, _ = run
    short, long = _samples(out, ("interleaved",)), _samples(out, ("interleaved_long",))
    assert {json.loads(s["json"])["source_key"] for s in long} == {f"en/{PAGE}", f"zh/{PAGE}"} or \
        {json.loads(s["json"])["source_key"] for s in long} == {f"copy/{PAGE}", f"zh/{PAGE}"}
    assert all(json.loads(s["json"])["tokens"] > 1000 and json.loads(s["json"])["long_context"] for s in long)
    assert all(json.loads(s["json"])["tokens"] <= 1000 for s in short) and len(short) == 2
    sets = summary["kinds"]["interleaved"]["shards"]["sets"]
    assert sets == {"interleaved": {"count": 1, "samples": 2}, "interleaved_long": {"count": 1, "samples": 2}}
    # each set is published with its own manifest; the ledger names the long shard of a long document
    for name in sets:
        with open(os.path.join(out, "shards", name, "index.json")) as f:
            index = json.load(f)
        assert [s["url"] for s in index["shardlist"]] == [f"{name}-000000.tar"]
    rows = _ledger(out)
    assert rows[f"zh/{PAGE}"]["shard"] == "interleaved_long-000000.tar"
    assert rows["planted/article.html"]["shard"] == "interleaved-000000.tar"


def test_shards_hold_documents_with_images_in_place(run):
    from schemas.interleaved import contract

    out, _, _ = run
    samples = _samples(out)
    assert len(samples) == 4  # en (or its copy), zh, article, article2
    by_key = {}
    for s in samples:
        assert contract().violations(s) == []
        doc = json.loads(s["json"])
        by_key[doc["source_key"]] = (doc, s)
    doc, s = by_key["planted/article.html"]
    kept = [im["src"][:21] for im in doc["images"] if im]
    assert kept == ["fig1.jpg", "data:image/png;base64", "fig1.jpg"]
    first = next(i for i, im in enumerate(doc["images"]) if im)
    assert doc["texts"][first - 1].endswith(_paragraphs("en-US", "sect.after-first-boot.html", 250)[0][-40:])
    for i, im in enumerate(doc["images"]):
        if im:
            assert im["member"] == f"{i:04d}.jpg" and 0 <= im["knowledge_score"] <= 1
            assert Image.open(io.BytesIO(s[im["member"]])).size == (im["width"], im["height"])
    # the copyright line is in 3 documents of the run: removed from every text
    assert all(COPYRIGHT not in (t or "") for d, _ in by_key.values() for t in d["texts"])
    zh, _ = by_key[f"zh/{PAGE}"]
    assert zh["language"] == "zh" and sum(im is not None for im in zh["images"]) == 3
    assert all(d["tokens"] > d["words"] and d["long_context"] == (d["tokens"] > 1000) for d, _ in by_key.values())


def test_trainer_formatter_reads_the_documents_in_order(run):
    from trainer import formatters
    from trainer.formatters import FormatContext
    from trainer.images import ImageConfig
    from trainer.tokenizer import train_bpe

    out, _, _ = run
    samples = _samples(out)
    fmt = formatters.get("interleaved")
    assert type(formatters.get("interleaved_long")) is type(fmt)  # the long set reads the same way
    tok = train_bpe([t for s in samples for t in fmt.texts(s)] * 3, vocab_size=400, min_frequency=1)
    ctx = FormatContext(tok, ImageConfig(min_pixels=4 * 784, max_pixels=16 * 784), max_len=100_000)
    for s in samples:
        doc = json.loads(s["json"])
        f = fmt.format(s, ctx)
        assert len(f.images) == sum(im is not None for im in doc["images"])
        ids = f.ids
        starts = [i for i, t in enumerate(ids) if t == tok.begin_image_id]
        assert len(starts) == len(f.images)
        # the text before the first image is the document's first text
        first_image = next((i for i, im in enumerate(doc["images"]) if im), None)
        if first_image:
            assert tok.decode(ids[:starts[0]]).strip().startswith(doc["texts"][0][:20])
