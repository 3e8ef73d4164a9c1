"""Box conventions (schemas/boxes.py) on known cases, and the grounding stages on Arrow batches."""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from filters.grounding_boxes import VERDICTS, ExplodeBoxes, GroundBoxes, LoadImage, box_id
from schemas import boxes as B
from schemas import grounding as S
from schemas.common import ERROR, ERROR_DETAIL


def test_coco_xywh_to_grid_exact():
    # 200 x 100 image, COCO bbox [x=10, y=20, w=30, h=40] -> corners (10, 20, 40, 60)
    px = B.from_xywh(10, 20, 30, 40)
    assert px == (10.0, 20.0, 40.0, 60.0)
    assert B.to_grid(px, 200, 100) == [50, 200, 200, 600]
    # the right and bottom edges of the image are 999, never 1000
    assert B.to_grid(B.from_xywh(0, 0, 200, 100), 200, 100) == [0, 0, 999, 999]


def test_grit_unit_to_grid_exact():
    # GRIT's own example row: 1024 x 693, [0.0196, 0.3105, 0.9622, 0.9603]
    px = B.from_unit(0.0196, 0.3105, 0.9622, 0.9603, 1024, 693)
    assert px == pytest.approx((20.0704, 215.1765, 985.2928, 665.4879))
    assert B.to_grid(px, 1024, 693) == [19, 310, 962, 960]


def test_playwright_css_pixels_with_device_scale():
    # a 1280 x 800 CSS viewport at device scale 2: the screenshot is 2560 x 1600 pixels
    px = B.from_css(320, 200, 640, 100, device_scale=2.0)
    assert px == (640.0, 400.0, 1920.0, 600.0)
    assert B.to_grid(px, 2560, 1600) == [250, 250, 750, 375]
    # the grid does not depend on the device scale
    assert B.to_grid(B.from_css(320, 200, 640, 100, 1.0), 1280, 800) == [250, 250, 750, 375]


@pytest.mark.parametrize("box,size,want", [
    ((-10, -10, 50, 50), (100, 100), ((0.0, 0.0, 50.0, 50.0), None)),  # clipped
    ((120, 10, 150, 50), (100, 100), (None, B.INVALID)),  # wholly outside
    ((50, 50, 40, 60), (100, 100), (None, B.INVALID)),  # corners swapped
    ((float("nan"), 0, 10, 10), (100, 100), (None, B.INVALID)),
    ((1, 2, 3), (100, 100), (None, B.INVALID)),
    ((10, 10, 11, 40), (100, 100), (None, B.TOO_SMALL)),  # 1 px wide < min_side 2
    ((10, 10, 12.5, 400), (10000, 1000), (None, B.TOO_SMALL)),  # 2.5 px of 10000: under one grid unit
])
def test_check(box, size, want):
    assert B.check(box, *size, min_side=2) == want


def test_merge_keeps_the_better_box():
    boxes = [(0, 0, 100, 100), (1, 1, 100, 100), (200, 200, 300, 300)]
    assert B.merge(boxes, [0.5, 0.9, 0.1], 0.9) == [1, None, None]
    assert B.merge(boxes, [None, None, None], 0.9) == [None, 0, None]


def test_render_phrases_and_several_boxes():
    caption = "a man with a hat and two dogs"
    phrases = [{"text": "two dogs", "span": [21, 29], "boxes": [[1, 2, 3, 4], [5, 6, 7, 8]]},
               {"text": "a man", "span": [0, 5], "boxes": [[10, 20, 30, 40]]},
               {"text": "a man with a hat", "span": [0, 16], "boxes": [[10, 20, 30, 50]]}]
    assert B.render_text(caption, phrases) == (
        "a man<|begin_of_box|>[[10,20,30,40]]<|end_of_box|> with a hat<|begin_of_box|>[[10,20,30,50]]<|end_of_box|>"
        " and two dogs<|begin_of_box|>[[1,2,3,4];[5,6,7,8]]<|end_of_box|>")
    with pytest.raises(ValueError):
        B.box_block([[0, 0, 1000, 5]])
    with pytest.raises(ValueError):
        B.render_text("short", [{"span": [0, 99], "boxes": [[0, 0, 5, 5]]}])


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 60)).save(buf, format="JPEG")
    return buf.getvalue()


def _cand(key, text, box, coords="xywh", span=None, score=None, error=None):
    return {"key": key, "text": text, "span": span, "box": box, "coords": coords, "score": score, "error": error}


def test_ground_boxes_coco_reasons_and_caption():
    cands = [
        _cand("1", "person", [150, 30, 100, 450]),
        _cand("2", "person", [152, 32, 96, 446]),  # IoU > 0.9 with 1: merged
        _cand("3", None, [0, 0, 50, 50], error="unknown_category"),
        _cand("4", "flag", [600, 600, 10, 10]),  # outside a 512 x 512 image
        _cand("5", "flag", [10, 10, 1, 1]),  # too small
        _cand("6", "flag", [20, 300, 100, 100]),
        _cand("7", "person", [400, 30, 100, 450]),
    ]
    g = GroundBoxes(min_box_side=2, merge_iou=0.9).ground(cands, None, 512, 512, (None, None))
    assert g["caption"] == "person, flag"
    assert g["phrases"] == [
        {"text": "person", "span": [0, 6], "boxes": [[292, 58, 488, 937], [781, 58, 976, 937]]},
        {"text": "flag", "span": [8, 12], "boxes": [[39, 585, 234, 781]]},
    ]
    assert g["valid_boxes"] == 3
    reasons = {v["key"]: (v["reason"], v["twin"]) for v in g["verdicts"]}
    assert reasons == {"1": (None, None), "2": ("box_duplicate", "1"), "3": ("unknown_category", None),
                       "4": (B.INVALID, None), "5": (B.TOO_SMALL, None), "6": (None, None), "7": (None, None)}


def test_ground_boxes_scales_declared_size():
    # annotations made on a 1280 x 854 copy, the image found is 640 x 427
    g = GroundBoxes().ground([_cand("a", "x", [640, 427, 320, 200]), _cand("b", "y", [0, 0, 640, 427])],
                             None, 640, 427, (1280, 854))
    assert [p["boxes"] for p in g["phrases"]] == [[[500, 500, 750, 734]], [[0, 0, 500, 500]]]


def test_ground_boxes_grit_spans_and_scores():
    caption = "a cat sitting on a wooden table"
    cands = [_cand("n:0", "a cat", [0.1, 0.1, 0.6, 0.9], "unit", [0, 5], 0.9),
             _cand("n:1", "a wooden table", [0.0, 0.5, 1.0, 1.0], "unit", [17, 31], 0.8),
             _cand("n:2", "a cat", [0.5, 0.5, 0.52, 0.52], "unit", [0, 5], 0.1),
             _cand("n:3", "x", [0.1, 0.1, 0.6, 0.9], "unit", [30, 60], 0.9)]
    g = GroundBoxes(min_score=0.3).ground(cands, caption, 400, 300, (None, None))
    assert g["caption"] == caption
    assert [(p["text"], p["span"]) for p in g["phrases"]] == [("a cat", [0, 5]), ("a wooden table", [17, 31])]
    assert [v["reason"] for v in g["verdicts"]] == [None, None, "box_low_score", "unlinked_phrase"]
    assert B.render_text(caption, g["phrases"]) == (
        "a cat<|begin_of_box|>[[100,100,600,900]]<|end_of_box|> sitting on "
        "a wooden table<|begin_of_box|>[[0,500,999,999]]<|end_of_box|>")


def _raw_batch(rows: list[dict]) -> pa.RecordBatch:
    full = [{f.name: None for f in S.RAW} | {"width": None, "height": None} | r for r in rows]
    schema = S.RAW.append(pa.field("width", pa.int32())).append(pa.field("height", pa.int32()))
    return pa.RecordBatch.from_pylist(full, schema=schema)


def test_load_image_missing_file_has_its_own_reason(tmp_path):
    good = tmp_path / "a.jpg"
    good.write_bytes(_jpeg(8, 8))
    batch = _raw_batch([
        {"sample_id": "a", "kind": "grounding", "source": "s", "source_key": "a", "path": str(good)},
        {"sample_id": "b", "kind": "grounding", "source": "s", "source_key": "b", "path": str(tmp_path / "no.jpg")},
    ])
    out = LoadImage().apply(batch).to_pylist()
    assert out[0]["image"] == good.read_bytes() and out[0][ERROR] is None
    assert out[1][ERROR] == "image_missing" and "no.jpg" in out[1][ERROR_DETAIL]


def test_explode_gives_every_box_a_row():
    cands = [_cand("1", "a", [0, 0, 10, 10]), _cand("2", "a", [0, 0, 10, 10]), _cand("3", "b", [20, 20, 10, 10])]
    batch = _raw_batch([{"sample_id": "img", "kind": "grounding", "source": "s", "source_key": "k", "unit": "image",
                         "candidates": json.dumps(cands), "width": 40, "height": 40}])
    grounded = GroundBoxes().apply(batch)
    assert grounded.column(S.VALID_BOXES).to_pylist() == [2]
    out = ExplodeBoxes().apply(grounded).to_pylist()
    assert S.CANDIDATES not in out[0] and VERDICTS not in out[0]
    assert [(r["unit"], r["parent_id"], r[S.BOX_REASON]) for r in out] == [
        ("image", None, None), ("box", "img", None), ("box", "img", "box_duplicate"), ("box", "img", None)]
    assert out[2][S.BOX_DUPLICATE_OF] == out[1]["sample_id"] == box_id("img", "1")
    assert [r["source_key"] for r in out[1:]] == ["k#box:1", "k#box:2", "k#box:3"]
    assert len({r["sample_id"] for r in out}) == 4


def test_draw_boxes_thumbnail():
    from filters.grounding_boxes import DrawBoxes

    phrases = json.dumps([{"text": "a", "span": [0, 1], "boxes": [[0, 0, 499, 499]]}])
    batch = pa.RecordBatch.from_pylist([{"image": _jpeg(640, 480), "phrases": phrases},
                                        {"image": None, "phrases": None}])
    out = DrawBoxes(size=160).apply(batch).to_pylist()
    img = Image.open(io.BytesIO(out[0]["boxed"]))
    assert img.size == (160, 120) and out[1]["boxed"] is None
    r, g, _ = img.getpixel((40, 0))  # on the box's top edge: the first colour, not the image's
    assert r > 150 and g < 90
