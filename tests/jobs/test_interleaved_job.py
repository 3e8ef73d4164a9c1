"""The job end to end (spark-submit) on a mixed folder: real debian-handbook pages (one copied: an exact
duplicate), a planted page with a QR code, a missing image and an image in the navigation, a WARC crawled
with wget from a local server, and an OBELICS-style Parquet table; CLIP with random weights (scored,
threshold not applied). The ledger accounts for both units, the gates pass, the report has the kind's
funnel, and the shards hold the kept documents."""
from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.filters.test_interleaved_stages import (
    PAGE,
    copy_page,
    make_warc,
    noise_image,
    print_pdf,
    read_text,
)
from tests.jobs.test_build_pretrain import submit
from tests.pipelines.test_interleaved_kind import _page, _paragraphs, _qr_jpeg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interleaved_job")
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
    out = str(tmp / "out")
    proc = submit("--input", f"interleaved={corpus}", "--output", out, "--set", "interleaved.clip.pretrained=",
                  "--set", "shards.max_samples=1")
    return out, proc


def test_job_accounts_for_documents_and_images(job):
    out, _ = job
    rows = pq.read_table(os.path.join(out, "ledger")).to_pylist()
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
    summary = json.loads(read_text(os.path.join(out, "reports", "summary.json")))
    k = summary["kinds"]["interleaved"]
    assert k["units"]["document"]["input"] == 7 and k["units"]["image"]["input"] == 20 + len(pdf) - 1
    assert k["kept"] == 5
    assert k["facts"]["clip"]["real_weights"] is False and k["facts"]["clip"]["threshold_applied"] is False
    assert summary["gates"]["passed"], summary["gates"]["failed_critical"]
    page = read_text(os.path.join(out, "reports", "index.html"))
    assert "id='kind-interleaved'" in page and "image_boilerplate" in page


def test_job_shards_follow_the_contract(job):
    from schemas.interleaved import contract
    from trainer import shards

    out, _ = job
    found = shards.find_kinds(os.path.join(out, "shards"), ["interleaved"])["interleaved"]
    samples = list(shards.iter_raw_samples([s.url for s in found]))
    assert len(found) == 5 and len(samples) == 5
    for s in samples:
        assert contract().violations(s) == []
        doc = json.loads(s["json"])
        scores = [im["clip_score"] for im in doc["images"] if im]
        assert scores and all(-1 <= c <= 1 for c in scores)  # scored (random weights), none removed for it
        assert all(0 <= im["knowledge_score"] <= 1 for im in doc["images"] if im)
