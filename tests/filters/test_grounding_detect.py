"""The detector-over-HTTP path on Arrow batches: a local test server stands in for a served open-vocabulary
detector (it boxes the words 'cat' and 'table' of the caption at fixed places of the image it is sent)."""
from __future__ import annotations

import base64
import http.server
import io
import json
from typing import ClassVar

import pyarrow as pa
import pytest
from PIL import Image

from filters.grounding_boxes import GroundBoxes
from filters.grounding_detect import FAILED, Detector
from schemas import boxes as B
from schemas import grounding as S
from tests.util import serving


class FakeDetector(http.server.BaseHTTPRequestHandler):
    calls: ClassVar[list[dict]] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeDetector.calls.append({k: body[k] for k in ("caption", "width", "height")})
        if "broken" in body["caption"]:
            self.send_response(500)
            self.end_headers()
            return
        img = Image.open(io.BytesIO(base64.b64decode(body["image"])))
        assert img.size == (body["width"], body["height"])
        w, h = img.size
        dets = []
        for word, box in (("cat", [0.1, 0.1, 0.5, 0.9]), ("table", [0.0, 0.6, 1.0, 1.0])):
            at = body["caption"].find(word)
            if at >= 0:
                dets.append({"span": [at, at + len(word)], "box": [box[0] * w, box[1] * h, box[2] * w, box[3] * h],
                             "score": 0.8})
        data = json.dumps({"detections": dets}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def endpoint():
    with serving(FakeDetector) as url:
        yield f"{url}/detect"


def _jpeg(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 140, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _batch(rows):
    schema = pa.schema([(S.IMAGE, pa.binary()), (S.CAPTION, pa.string()), (S.CANDIDATES, pa.string()),
                        ("error", pa.string()), ("error_detail", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32()), (S.DECLARED_W, pa.int32()), (S.DECLARED_H, pa.int32())])
    full = [{"error": None, "error_detail": None, S.CANDIDATES: None, S.DECLARED_W: None, S.DECLARED_H: None, **r}
            for r in rows]
    return pa.RecordBatch.from_pylist(full, schema=schema)


def test_detector_boxes_caption_phrases(endpoint):
    FakeDetector.calls.clear()
    caption = "a cat on a table"
    batch = _batch([
        {S.IMAGE: _jpeg(2000, 1000), S.CAPTION: caption, "width": 2000, "height": 1000},
        {S.IMAGE: _jpeg(100, 100), S.CAPTION: "a broken request", "width": 100, "height": 100},
        {S.IMAGE: _jpeg(100, 100), S.CAPTION: "has spans", S.CANDIDATES: "[]", "width": 100, "height": 100},
    ])
    det = Detector(endpoint=endpoint, max_side=1000, retries=1)
    out = det.apply(batch)
    rows = out.to_pylist()
    assert rows[1]["error"] == FAILED and "HTTP 500" in rows[1]["error_detail"]
    assert rows[2][S.CANDIDATES] == "[]"  # rows with spans of their own are not sent
    assert sorted(c["caption"] for c in FakeDetector.calls) == ["a broken request", "a broken request", caption]
    (sent,) = [c for c in FakeDetector.calls if c["caption"] == caption]
    assert (sent["width"], sent["height"]) == (1000, 500)  # sent at max_side, boxes scaled back to the full image
    cands = json.loads(rows[0][S.CANDIDATES])
    assert [(c["text"], c["span"]) for c in cands] == [("cat", [2, 5]), ("table", [11, 16])]
    g = GroundBoxes().ground(cands, caption, 2000, 1000, (None, None))
    assert B.render_text(g["caption"], g["phrases"]) == (
        "a cat<|begin_of_box|>[[100,100,500,900]]<|end_of_box|> on a "
        "table<|begin_of_box|>[[0,600,999,999]]<|end_of_box|>")


def test_no_endpoint_sends_nothing():
    batch = _batch([{S.IMAGE: _jpeg(10, 10), S.CAPTION: "a cat", "width": 10, "height": 10}])
    assert Detector().apply(batch).to_pylist()[0][S.CANDIDATES] is None
