"""The gui render stages on Arrow batches with Debian's Chromium: real HTML pages (debian-handbook) at two
device sizes, hidden / zero-size / off-screen / covered elements left out, OCR agreement inside element
boxes, QA pairs in the box format, the origin rule and the load timeout."""
from __future__ import annotations

import glob
import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from filters.gui_render import OcrAgreement, RenderPage, allowed, qa_pairs
from schemas import boxes as B
from schemas import gui as S

HANDBOOK = sorted(glob.glob("/usr/share/doc/debian-handbook/html/en-US/sect.apt-get.html"))
PROBE = """<!doctype html><html><head><style>body{margin:0;font:20px sans-serif}
#overlay{position:fixed;left:0;top:300px;width:400px;height:100px;background:#fff}</style></head><body>
<h1 id="title">Visible heading</h1>
<button id="go" style="position:absolute;left:20px;top:100px;width:160px;height:40px">Go now</button>
<div style="display:none">Display none text</div>
<p style="visibility:hidden">Hidden paragraph</p>
<p style="opacity:0">Transparent paragraph</p>
<span style="display:inline-block;width:0;height:0;overflow:hidden">Zero size</span>
<p style="position:absolute;left:-3000px;top:10px">Off screen text</p>
<p style="position:absolute;left:20px;top:320px;margin:0">Covered paragraph</p>
<div id="overlay">Overlay on top</div>
<img alt="A remote picture" src="http://example.invalid/x.png" style="position:absolute;left:300px;top:100px;width:50px;height:50px">
</body></html>"""


def _rows(pages: list[dict]) -> pa.RecordBatch:
    rows = []
    for i, p in enumerate(pages):
        row = {f.name: None for f in S.RAW}
        row.update({"sample_id": f"{i:032x}", "kind": "gui", "source": "t", "source_key": str(i), "unit": "render",
                    "source_type": "html", **p})
        rows.append(row)
    return pa.RecordBatch.from_pylist(rows, schema=S.RAW)


@pytest.fixture(scope="module")
def stage():
    return RenderPage(load_timeout_s=10, settle_s=0.5, qa_per_render=6)


def test_handbook_page_at_two_device_sizes(stage):
    assert HANDBOOK, "debian-handbook is a Debian package of the Makefile's system target"
    path = HANDBOOK[0]
    batch = _rows([{"path": path, "device": "desktop", "viewport_width": 1280, "viewport_height": 800,
                    "device_scale": 1.0},
                   {"path": path, "device": "phone", "viewport_width": 390, "viewport_height": 844,
                    "device_scale": 3.0}])
    out = stage.apply(batch, stage.state()).to_pylist()
    assert [r["error"] for r in out] == [None, None], [r["error_detail"] for r in out]
    desk, phone = out
    assert Image.open(io.BytesIO(desk[S.SCREENSHOT])).size == (1280, 800) == (desk["width"], desk["height"])
    assert Image.open(io.BytesIO(phone[S.SCREENSHOT])).size == (1170, 2532)
    for r in out:
        els = json.loads(r[S.ELEMENTS])
        assert r[S.ELEMENT_COUNT] == len(els) >= 10
        assert all(B.valid_grid_box(e["box"]) for e in els)
        assert any(e["role"] == "heading" for e in els)
        assert all("class" not in e["attrs"] and "style" not in e["attrs"] for e in els)
        qa = json.loads(r[S.QA])
        assert len(qa) == 6 and {q["task"] for q in qa} == {"reg", "rec"}
        for q in qa:
            assert any(k == "box" for k, _ in B.pieces(q["question"] + q["answer"]))
    # the same page lays out differently on a phone: narrower boxes for the same heading text
    assert desk[S.ELEMENTS] != phone[S.ELEMENTS]


def test_hidden_zero_size_off_screen_and_covered_elements_are_left_out(stage, tmp_path):
    page = tmp_path / "probe.html"
    page.write_text(PROBE)
    out = stage.apply(_rows([{"path": str(page), "device": "desktop", "viewport_width": 800,
                              "viewport_height": 600, "device_scale": 2.0}]), stage.state()).to_pylist()[0]
    assert out["error"] is None, out["error_detail"]
    els = {e["text"] or e["name"]: e for e in json.loads(out[S.ELEMENTS])}
    assert {"Visible heading", "Go now", "Overlay on top", "A remote picture"} <= set(els)
    for gone in ("Display none text", "Hidden paragraph", "Transparent paragraph", "Zero size", "Off screen text",
                 "Covered paragraph"):
        assert gone not in els
    go = els["Go now"]
    assert go["role"] == "button" and go["attrs"] == {} and go["html"] == "<button>Go now</button>"
    # CSS (20, 100, 180, 140) on an 800 x 600 viewport at scale 2 -> a 1600 x 1200 screenshot
    assert go["box"] == [25, 166, 225, 233]


def test_ocr_reads_the_dom_text_inside_element_boxes(stage, tmp_path):
    page = tmp_path / "words.html"
    page.write_text("<html><body style='font:32px sans-serif;margin:40px'><p>Grounding screenshots</p>"
                    "<p>Referring expressions</p><button style='font:28px sans-serif'>Submit order</button></body></html>")
    out = stage.apply(_rows([{"path": str(page), "device": "desktop", "viewport_width": 800, "viewport_height": 400,
                              "device_scale": 1.0}]), stage.state())
    ocr = OcrAgreement(elements=3).apply(out).to_pylist()[0]
    assert ocr[S.OCR_CHECKED] == 3 and ocr[S.OCR_AGREEMENT] > 0.8
    # a DOM text that is not what the pixels show disagrees
    els = json.loads(ocr[S.ELEMENTS])
    for e in els:
        e["text"] = "zzzz qqqq xxxx"
    score, n = OcrAgreement(elements=3).agreement(ocr[S.SCREENSHOT], els, "k")
    assert n == 3 and score < 0.3


def test_a_page_that_never_loads_times_out(tmp_path):
    page = tmp_path / "loop.html"
    page.write_text("<html><body><p>spin</p><script>while (true) {}</script></body></html>")
    stage = RenderPage(load_timeout_s=2, settle_s=0.5)
    out = stage.apply(_rows([{"path": str(page), "device": "desktop", "viewport_width": 800, "viewport_height": 600,
                              "device_scale": 1.0}]), stage.state()).to_pylist()[0]
    assert out["error"] == "render_timeout" and out[S.SCREENSHOT] is None


def test_origin_rule():
    assert allowed("file:///site/a/img.png", "file:///site/a/index.html", False)
    assert not allowed("file:///etc/passwd", "file:///site/a/index.html", False)
    assert not allowed("http://example.invalid/x.png", "file:///site/a/index.html", False)
    assert allowed("http://h:8000/s.css", "http://h:8000/p.html", False)
    assert not allowed("http://other/s.css", "http://h:8000/p.html", False)
    assert allowed("http://other/s.css", "http://h:8000/p.html", True)


def test_qa_pairs_use_unique_descriptions():
    els = [{"tag": "button", "role": "button", "name": "OK", "text": "OK", "attrs": {}, "box": [1, 2, 3, 4]},
           {"tag": "a", "role": "link", "name": "More", "text": "More", "attrs": {"href": "/m"}, "box": [5, 6, 7, 8]},
           {"tag": "a", "role": "link", "name": "More", "text": "More", "attrs": {"href": "/n"}, "box": [9, 9, 19, 19]}]
    qa = qa_pairs(els, 5, "seed")
    assert len(qa) == 1 and qa[0]["task"] == "reg"
    assert qa[0] == {"task": "reg", "question": "What element is at <|begin_of_box|>[[1,2,3,4]]<|end_of_box|>?",
                     "answer": 'the button "OK": <button>OK</button>'}


def test_private_addresses_are_refused_unless_allowed(tmp_path):
    import functools
    import http.server
    import threading

    (tmp_path / "p.html").write_text("<html><body><h1>Served page</h1><button>Press</button></body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/p.html"
        row = {"url": url, "source_type": "url", "device": "desktop", "viewport_width": 640, "viewport_height": 480,
               "device_scale": 1.0}
        blocked = RenderPage(settle_s=0.2).apply(_rows([row]), RenderPage(settle_s=0.2).state()).to_pylist()[0]
        assert blocked["error"] == "download_blocked_address" and "loopback" in blocked["error_detail"]
        ok_stage = RenderPage(settle_s=0.2, allow_loopback=True)
        ok = ok_stage.apply(_rows([row]), ok_stage.state()).to_pylist()[0]
        assert ok["error"] is None and ok[S.FINAL_URL] == url and ok[S.ELEMENT_COUNT] == 2
    finally:
        httpd.shutdown()
