"""The gui kind on the spark fixture: HTML pages (debian-handbook and hand-made ones), a URL list served by a
local http.server and a WARC file, each page rendered at two viewports; the ledger names every page and
render, duplicate screenshots are removed, gates pass, and the trainer's formatter reads the shards."""
from __future__ import annotations

import functools
import http.server
import json
import os
import threading
import uuid

import pyarrow.parquet as pq
import pytest

from pipelines import gui, kinds
from pipelines.build import run_build
from pipelines.recipe import load
from schemas import boxes as B

HANDBOOK = "/usr/share/doc/debian-handbook/html/en-US/sect.apt-get.html"
FORM = """<!doctype html><html><head><title>Sign in</title><style>body{font:18px sans-serif;margin:30px}
label,input,button{display:block;margin:8px 0}</style></head><body><h1>Sign in to the archive</h1>
<form><label for="u">User name</label><input id="u" name="user" placeholder="your name">
<label for="p">Password</label><input id="p" type="password" name="pw">
<button type="submit">Sign in</button></form><p>Forgot your password? <a href="/reset">Reset it</a></p>
<nav><a href="/">Home</a> <a href="/help">Help</a></nav></body></html>"""
OTHER = """<!doctype html><html><body style="font:20px serif;margin:40px"><h2>Release notes</h2>
<ul><li>Faster package index</li><li>New mirror list</li><li>Smaller images</li></ul>
<button>Download</button> <a href="/old">Older releases</a></body></html>"""
SHOP = """<!doctype html><html><body style="font:22px sans-serif;margin:20px;background:#eef">
<h1>Garden tools</h1><p>Spades and rakes for every season</p><button>Add spade to cart</button>
<button>Add rake to cart</button><a href="/cart">View cart</a></body></html>"""
# one viewport keeps this test short (two device sizes: tests/filters/test_gui_render.py and the job test)
VIEWPORTS = ["gui.viewports=['desktop:1024x768@1']", "gui.renders_per_page=1"]


def warc_record(url: str, ctype: str, body: bytes) -> bytes:
    http_block = f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, url)}>\r\n"
            f"WARC-Date: 2024-01-01T00:00:00Z\r\nWARC-Target-URI: {url}\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http_block)}\r\n\r\n").encode()
    return head + http_block + b"\r\n\r\n"


def make_corpus(root: str, port: int) -> dict[str, str]:
    pages = os.path.join(root, "pages")
    os.makedirs(pages)
    files = {"form.html": FORM, "form_copy.html": FORM, "blank.html": "<html><body></body></html>",
             "loop.html": "<html><body><p>spin</p><script>while (true) {}</script></body></html>"}
    for name, text in files.items():
        with open(os.path.join(pages, name), "w") as f:
            f.write(text)
    with open(os.path.join(pages, "binary.html"), "wb") as f:
        f.write(bytes(range(128, 256)) * 8)  # no '<' anywhere
    served = os.path.join(root, "served")
    os.makedirs(served)
    with open(os.path.join(served, "other.html"), "w") as f:
        f.write(OTHER)
    lists = os.path.join(root, "lists")
    os.makedirs(lists)
    with open(os.path.join(lists, "pages.urls"), "w") as f:
        f.write(f"# pages to render\nhttp://127.0.0.1:{port}/other.html\nhttp://127.0.0.1:{port}/missing.html\n"
                "ftp://127.0.0.1/x.html\n")
    warcs = os.path.join(root, "warc")
    os.makedirs(warcs)
    with open(os.path.join(warcs, "crawl.warc"), "wb") as f:
        f.write(warc_record("http://shop.example/tools", "text/html; charset=utf-8", SHOP.encode()))
        f.write(warc_record("http://shop.example/logo.png", "image/png", b"\x89PNG\r\n\x1a\nnot really"))
    return {"pages": pages, "served": served, "lists": lists, "warc": warcs}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("www")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield str(folder), httpd.server_address[1]
    httpd.shutdown()


@pytest.fixture(scope="module")
def gui_run(spark, tmp_path_factory, server):
    kinds.register(gui.KIND)
    folder, port = server
    tmp = tmp_path_factory.mktemp("gui")
    corpus = make_corpus(str(tmp / "in"), port)
    os.replace(os.path.join(corpus["served"], "other.html"), os.path.join(folder, "other.html"))
    out = str(tmp / "out")
    settings = [*VIEWPORTS, "shards.max_samples=3", "gui.render.load_timeout_s=3", "gui.render.settle_s=0.5",
                "gui.ocr.elements=1", "gui.render.allow_loopback=true"]  # the local server
    inputs = [f"gui={HANDBOOK}", f"gui={corpus['pages']}", f"gui={corpus['lists']}", f"gui={corpus['warc']}"]
    recipe = load(None, settings, inputs, out)
    summary = run_build(spark, recipe, dict(recipe.inputs), out)
    return out, summary


def _ledger(out):
    return pq.read_table(os.path.join(out, "ledger")).to_pylist()


def test_every_page_and_render_has_its_reason(gui_run):
    out, _ = gui_run
    rows = _ledger(out)
    pages = {os.path.basename(r["source"]) + ("" if r["source_key"] == "page" else "/" + r["source_key"]): r
             for r in rows if r["unit"] == "page"}
    renders = [r for r in rows if r["unit"] == "render"]
    assert len(renders) == len(pages)
    status = {k: (r["status"], r["reason"]) for k, r in pages.items()}
    assert status["sect.apt-get.html"] == ("kept", None)
    assert status["blank.html"] == ("dropped", "no_render_kept")
    assert status["loop.html"] == ("dropped", "no_render_kept")
    assert status["binary.html"] == ("quarantined", "not_html")
    assert status["pages.urls/line2"] == ("kept", None)
    assert status["pages.urls/line3"] == ("dropped", "no_render_kept")
    assert status["pages.urls/line4"] == ("quarantined", "download_bad_url")
    (shop,) = [k for k in pages if k.startswith("crawl.warc/")]  # the PNG record is no page
    assert status[shop] == ("kept", None)
    by_page = {}
    for r in renders:
        by_page.setdefault(r["parent_id"], []).append((r["status"], r["reason"]))
    assert by_page[pages["blank.html"]["sample_id"]] == [("dropped", "too_few_elements")]
    assert by_page[pages["loop.html"]["sample_id"]] == [("quarantined", "render_timeout")]
    assert by_page[pages["pages.urls/line3"]["sample_id"]] == [("quarantined", "download_http_error")]
    assert by_page[pages["binary.html"]["sample_id"]] == [("quarantined", "not_html")]
    # form.html and form_copy.html render the same screenshot: one is kept, the other names it
    both = by_page[pages["form.html"]["sample_id"]] + by_page[pages["form_copy.html"]["sample_id"]]
    assert sorted(s for s, _ in both) == ["dropped", "kept"]
    assert {status["form.html"], status["form_copy.html"]} == {("kept", None), ("dropped", "no_render_kept")}
    assert {r for _, r in both} <= {None, "exact_duplicate", "near_duplicate"}
    kept_ids = {r["sample_id"] for r in renders if r["status"] == "kept"}
    assert all(r["duplicate_of"] in kept_ids for r in renders if r["reason"] and r["reason"].endswith("duplicate"))
    for r in renders:
        if r["status"] == "kept":
            assert r["shard"] is not None
    assert pages["sect.apt-get.html"]["shard"] is not None  # a kept page names a shard holding its render


def test_accounting_and_gates(gui_run):
    _, summary = gui_run
    k = summary["kinds"]["gui"]
    assert k["units"]["page"]["input"] == 10 and k["read"]["items"] == 10
    assert k["units"]["render"]["input"] == 10
    g = summary["gates"]
    assert g["passed"], g["failed_critical"]
    names = {c["name"] for s in g["suites"].values() for c in s["expectations"]}
    assert {"gui.shards.contract", "gui.shards.boxes_on_grid_values", "gui.shards.qa_boxes_on_grid_values",
            "gui.shards.element_count_range"} <= names, sorted(names)


def test_shards_and_the_formatter(gui_run):
    from trainer import formatters
    from trainer.shards import find_kinds, iter_raw_samples

    out, _ = gui_run
    found = find_kinds(os.path.join(out, "shards"), ["gui"])["gui"]
    samples = list(iter_raw_samples([f.url for f in found]))
    contract = gui.KIND.contract(None, {})
    assert len(samples) == 4  # handbook, form (one of the two copies), other, shop
    for s in samples:
        assert contract.violations(s) == []
        doc = json.loads(s["json"])
        assert doc["device"] == "desktop" and doc["viewport"] == [1024, 768] and doc["ocr_agreement"] is not None
        assert doc["ocr_agreement"] >= 0.5
        assert any(k == "box" for k, _ in B.pieces(s["txt"].decode()))
        assert formatters.get("gui").texts(s) == [s["txt"].decode()]
    urls = {json.loads(s["json"])["url"] for s in samples}
    assert "http://shop.example/tools" in urls and any(u.endswith("/other.html") for u in urls)


def test_planning_and_viewport_draws(tmp_path):
    from pipelines.gui.read import draw_viewports, parse_viewport, plan_units

    (tmp_path / "README.txt").write_text("These pages are fixtures\n")
    (tmp_path / "list.txt").write_text("# seeds\nhttps://a.example/\n")
    (tmp_path / "a.html").write_text("<p>a</p>")
    (tmp_path / "style.css").write_text("p{}")
    units = plan_units([str(tmp_path)], 8)
    assert sorted((u["format"], os.path.basename(u["files"][0])) for u in units) == [("html", "a.html"),
                                                                                    ("urls", "list.txt")]
    assert parse_viewport("phone:412x915@2.625") == ("phone", 412, 915, 2.625)
    with pytest.raises(ValueError):
        parse_viewport("watch:10x10@1")
    vps = [parse_viewport(v) for v in gui.DEFAULT_VIEWPORTS]
    a = draw_viewports("p1", vps, 2, 0)
    assert a == draw_viewports("p1", vps, 2, 0) and len(set(a)) == 2  # fixed per page and seed
    assert {d for d, *_ in vps} == {"desktop", "tablet", "phone"}
