"""The grounding kind on the spark fixture: COCO, RefCOCO and GRIT inputs made here from scikit-image
photos with hand-made boxes; the ledger names each problem (invalid box, missing image, unknown
category, too few boxes, ...), the gates pass, and the trainer's formatter reads the shards written."""
from __future__ import annotations

import io
import json
import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import grounding, kinds
from pipelines.build import run_build
from pipelines.recipe import load
from schemas import boxes as B


def _photo(name: str) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    img = Image.fromarray(arr)
    return img.convert("RGB")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_corpus(root: str) -> dict[str, str]:
    """Three inputs under root: coco/ (annotations + val2017/), refcoco/ (refs(unc).p + instances.json
    + images/), grit/ (one Parquet). Returns their folders."""
    coco = os.path.join(root, "coco")
    os.makedirs(os.path.join(coco, "annotations"))
    os.makedirs(os.path.join(coco, "val2017"))
    photos = {"astronaut.jpg": _photo("astronaut"),  # 512 x 512
              "coffee.jpg": _photo("coffee"),  # 600 x 400
              "camera.jpg": _photo("camera"),  # 512 x 512 grey
              "rocket.jpg": _photo("rocket")}  # 640 x 427
    for name, img in photos.items():
        img.save(os.path.join(coco, "val2017", name), quality=85)
    images = [
        {"id": 1, "file_name": "astronaut.jpg", "width": 512, "height": 512},
        {"id": 2, "file_name": "coffee.jpg", "width": 600, "height": 400},
        {"id": 3, "file_name": "chelsea.jpg", "width": 451, "height": 300},  # not in the folder
        {"id": 4, "file_name": "camera.jpg", "width": 512, "height": 512},
        {"id": 5, "file_name": "rocket.jpg", "width": 1280, "height": 854},  # annotated on a 2x copy
    ]
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [150, 30, 100, 450]},
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [152, 32, 96, 446]},  # merged into 11
        {"id": 13, "image_id": 1, "category_id": 99, "bbox": [0, 0, 50, 50]},  # unknown category
        {"id": 14, "image_id": 1, "category_id": 2, "bbox": [600, 600, 10, 10]},  # outside the image
        {"id": 15, "image_id": 1, "category_id": 2, "bbox": [10, 10, 1, 1]},  # too small
        {"id": 16, "image_id": 1, "category_id": 2, "bbox": [20, 300, 100, 100]},
        {"id": 21, "image_id": 2, "category_id": 3, "bbox": [200, 100, 200, 200]},  # the only box: too few
        {"id": 31, "image_id": 3, "category_id": 3, "bbox": [10, 10, 100, 100]},
        {"id": 32, "image_id": 3, "category_id": 3, "bbox": [200, 10, 100, 100]},
        {"id": 41, "image_id": 4, "category_id": 1, "bbox": [180, 60, 180, 380]},
        {"id": 42, "image_id": 4, "category_id": 4, "bbox": [300, 300, 150, 150]},
        {"id": 43, "image_id": 4, "category_id": 4, "bbox": [0, 0, 80, 80]},
        {"id": 44, "image_id": 4, "category_id": 1, "bbox": [0, 300, 200, 200], "iscrowd": 1},  # dropped
        {"id": 51, "image_id": 5, "category_id": 4, "bbox": [640, 427, 320, 200]},
        {"id": 52, "image_id": 5, "category_id": 2, "bbox": [0, 0, 640, 427]},
        {"id": 99, "image_id": 77, "category_id": 1, "bbox": [0, 0, 5, 5]},  # names no listed image
    ]
    cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "flag"}, {"id": 3, "name": "cup"},
            {"id": 4, "name": "camera"}]
    with open(os.path.join(coco, "annotations", "instances_val2017.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)

    ref = os.path.join(root, "refcoco")
    os.makedirs(os.path.join(ref, "images"))
    _photo("chelsea").save(os.path.join(ref, "images", "COCO_train2014_000000000007.jpg"), quality=85)  # 451x300
    _photo("coffee").save(os.path.join(ref, "images", "COCO_train2014_000000000008.jpg"), quality=85)
    inst = {"images": [{"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "width": 451, "height": 300},
                       {"id": 8, "file_name": "COCO_train2014_000000000008.jpg", "width": 600, "height": 400}],
            "annotations": [{"id": 70, "image_id": 7, "category_id": 17, "bbox": [120, 20, 250, 270]},
                            {"id": 71, "image_id": 7, "category_id": 62, "bbox": [0, 150, 120, 150]},
                            {"id": 80, "image_id": 8, "category_id": 47, "bbox": [200, 100, 200, 200]},
                            {"id": 81, "image_id": 8, "category_id": 47, "bbox": [0, 0, 100, 100]}],
            "categories": [{"id": 17, "name": "cat"}, {"id": 47, "name": "cup"}, {"id": 62, "name": "chair"}]}
    refs = [
        {"ref_id": 1, "ann_id": 70, "image_id": 7, "split": "train", "category_id": 17,
         "sentences": [{"sent_id": 1, "sent": "cat in the middle", "raw": "Cat in the middle"}]},
        {"ref_id": 2, "ann_id": 71, "image_id": 7, "split": "train", "category_id": 62,
         "sentences": [{"sent_id": 2, "sent": "left chair", "raw": "left chair"},
                       {"sent_id": 3, "sent": "seat on the left", "raw": "seat on the left"}]},
        {"ref_id": 3, "ann_id": 80, "image_id": 8, "split": "testA", "category_id": 47,
         "sentences": [{"sent_id": 4, "sent": "the cup", "raw": "the cup"}]},
        {"ref_id": 4, "ann_id": 81, "image_id": 8, "split": "testA", "category_id": 47,
         "sentences": [{"sent_id": 5, "sent": "top left cup", "raw": "top left cup"}]},
    ]
    with open(os.path.join(ref, "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f)
    with open(os.path.join(ref, "instances.json"), "w") as f:
        json.dump(inst, f)

    grit = os.path.join(root, "grit")
    os.makedirs(grit)
    cat = _jpeg(_photo("chelsea"))  # the same bytes as RefCOCO's image 7: an exact duplicate
    caption = "a cat sitting on a wooden table"
    rows = [
        {"key": "g0", "caption": caption, "width": 384, "height": 303, "jpg": _jpeg(_photo("coins")), "url": None,
         "noun_chunks": [[0, 5, 0.25, 0.05, 0.8, 0.95, 0.9], [17, 31, 0.0, 0.5, 1.0, 1.0, 0.8]]},
        {"key": "g1", "caption": caption, "width": 451, "height": 300, "jpg": None, "url": "ftp://example.invalid/x.jpg",
         "noun_chunks": [[0, 5, 0.25, 0.05, 0.8, 0.95, 0.9], [17, 31, 0.0, 0.5, 1.0, 1.0, 0.8]]},
        {"key": "g2", "caption": caption, "width": 451, "height": 300, "jpg": _jpeg(_photo("astronaut")), "url": None,
         "noun_chunks": [[0, 5, 0.25, 0.05, 0.8, 0.95, 0.9], [17, 31, 0.0, 0.5, 1.0, 1.0, 0.1]]},  # low score
        {"key": "g3", "caption": caption, "width": 451, "height": 300, "jpg": _jpeg(_photo("coffee")), "url": None,
         "noun_chunks": [[0, 5, 0.25, 0.05, 0.8, 0.95], [17, 31, 0.0, 0.5, 1.0, 1.0, 0.8]]},  # 6 numbers
        {"key": "g4", "caption": caption, "width": 451, "height": 300, "jpg": cat, "url": None,
         "noun_chunks": [[0, 5, 0.25, 0.05, 0.8, 0.95, 0.9], [17, 31, 0.0, 0.5, 1.0, 1.0, 0.8]]},
    ]
    schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("width", pa.int64()),
                        ("height", pa.int64()), ("jpg", pa.binary()), ("url", pa.string()),
                        ("noun_chunks", pa.list_(pa.list_(pa.float64())))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(grit, "part-0.parquet"))
    return {"coco": coco, "refcoco": ref, "grit": grit}


SETTINGS = ["shards.max_samples=2", "grounding.boxes.min_score=0.3"]


@pytest.fixture(scope="module")
def grounding_run(spark, tmp_path_factory):
    kinds.register(grounding.KIND)
    tmp = tmp_path_factory.mktemp("grounding")
    corpus = make_corpus(str(tmp / "in"))
    out = str(tmp / "out")
    recipe = load(None, SETTINGS, [f"grounding={corpus[k]}" for k in ("coco", "refcoco", "grit")], out)
    summary = run_build(spark, recipe, dict(recipe.inputs), out)
    return out, summary


def _ledger(out):
    return {r["source_key"]: r for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()}


def test_every_image_and_box_has_its_reason(grounding_run):
    out, _ = grounding_run
    led = _ledger(out)
    got = {k: (r["unit"], r["status"], r["reason"]) for k, r in led.items()}
    want = {
        "1": ("image", "kept", None),
        "1#box:11": ("box", "kept", None), "1#box:12": ("box", "dropped", "box_duplicate"),
        "1#box:13": ("box", "dropped", "unknown_category"), "1#box:14": ("box", "dropped", "box_invalid"),
        "1#box:15": ("box", "dropped", "box_too_small"), "1#box:16": ("box", "kept", None),
        "2": ("image", "dropped", "too_few_boxes"), "2#box:21": ("box", "dropped", "parent_removed"),
        "3": ("image", "quarantined", "image_missing"),
        "3#box:31": ("box", "dropped", "parent_removed"), "3#box:32": ("box", "dropped", "parent_removed"),
        "4": ("image", "kept", None), "4#box:44": ("box", "dropped", "crowd_box"), "5": ("image", "kept", None),
        "@orphan:99": ("image", "quarantined", "read_error"),
        # RefCOCO: image 7 (train) kept with three sentences; image 8's refs are testA
        "7#box:1:1": ("box", "kept" if got["7"][1] == "kept" else "dropped", None if got["7"][1] == "kept"
                      else "parent_removed"),
        "8": ("image", "dropped", "too_few_boxes"), "8#box:3:4": ("box", "dropped", "eval_split"),
        # GRIT
        "g0": ("image", "kept", None), "g1": ("image", "quarantined", "download_bad_url"),
        "g2": ("image", "dropped", "too_few_boxes"), "g2#box:noun_chunks:1": ("box", "dropped", "box_low_score"),
        "g3#box:noun_chunks:0": ("box", "dropped", "box_invalid"),
    }
    assert {k: got[k] for k in want} == want
    # RefCOCO's image 7 and GRIT's g4 are the same JPEG: one is kept, the other names it
    pair = sorted([got["7"], got["g4"]], key=lambda t: t[1])
    assert [p[1:] for p in pair] == [("dropped", "exact_duplicate"), ("kept", None)]
    (copy,) = [led[k] for k in ("7", "g4") if led[k]["reason"] == "exact_duplicate"]
    (keeper,) = [led[k] for k in ("7", "g4") if led[k]["reason"] is None]
    assert copy["duplicate_of"] == keeper["sample_id"]
    assert led["1#box:12"]["duplicate_of"] == led["1#box:11"]["sample_id"]
    assert led["1#box:11"]["parent_id"] == led["1"]["sample_id"]
    assert led["1#box:11"]["shard"] == led["1"]["shard"] is not None
    assert "chelsea.jpg" in led["3"]["detail"]
    assert len({r["sample_id"] for r in led.values()}) == len(led)


def test_accounting_and_gates(grounding_run):
    _, summary = grounding_run
    k = summary["kinds"]["grounding"]
    assert k["unit"] == "image"
    assert k["units"]["image"]["input"] == 5 + 1 + 2 + 5 and k["units"]["image"]["kept"] == 5
    assert k["units"]["box"]["input"] == 15 + 5 + 10
    assert k["read"] == {"units": 3, "items": 13}
    g = summary["gates"]
    assert g["passed"], g["failed_critical"]
    names = {c["name"] for s in g["suites"].values() for c in s["expectations"]}
    assert {"grounding.shards.contract", "grounding.shards.box_count_range", "grounding.shards.boxes_on_grid_values",
            "grounding.ledger.sub_items_have_a_parent"} <= names, sorted(names)


def test_shards_hold_the_box_text_and_the_formatter_reads_them(grounding_run):
    from trainer import formatters
    from trainer.shards import find_kinds, iter_raw_samples

    out, _ = grounding_run
    found = find_kinds(os.path.join(out, "shards"), ["grounding"])["grounding"]
    samples = {json.loads(s["json"])["source_key"]: s for s in iter_raw_samples([f.url for f in found])}
    assert sorted(samples) in (["1", "4", "5", "7", "g0"], ["1", "4", "5", "g0", "g4"])
    contract = grounding.KIND.contract(None, {})
    for s in samples.values():
        assert contract.violations(s) == []
    doc = json.loads(samples["1"]["json"])
    assert doc["caption"] == "person, flag" and doc["source_format"] == "coco"
    assert samples["1"]["txt"].decode() == (
        "person<|begin_of_box|>[[292,58,488,937]]<|end_of_box|>, flag<|begin_of_box|>[[39,585,234,781]]<|end_of_box|>")
    assert json.loads(samples["5"]["json"])["phrases"][0]["boxes"] == [[500, 500, 750, 734]]
    cam = json.loads(samples["4"]["json"])
    assert [len(p["boxes"]) for p in cam["phrases"]] == [1, 2] and ";" in samples["4"]["txt"].decode()
    if "7" in samples:
        ref = json.loads(samples["7"]["json"])
        assert ref["caption"] == "cat in the middle. left chair. seat on the left" and ref["split"] == "train"
    assert samples["g0"]["txt"].decode().startswith("a cat<|begin_of_box|>[[250,50,800,950]]<|end_of_box|>")
    assert json.loads(samples["g0"]["json"])["source_format"] == "grit"
    # the trainer's grounding formatter: box blocks between the box tokens, the rest as text
    texts = formatters.get("grounding").texts(samples["1"])
    assert texts == [samples["1"]["txt"].decode()]
    assert B.BEGIN_BOX in texts[0]


def test_caption_table_without_spans_needs_a_detector(spark, tmp_path):
    kinds.register(grounding.KIND)
    folder = tmp_path / "captions"
    folder.mkdir()
    pq.write_table(pa.table({"caption": ["a cat on a table"], "url": ["http://example.invalid/a.jpg"]}),
                   str(folder / "c.parquet"))
    recipe = load(None, [], [f"grounding={folder}"], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="grounding.detector.endpoint"):
        run_build(spark, recipe, dict(recipe.inputs), str(tmp_path / "out"))
