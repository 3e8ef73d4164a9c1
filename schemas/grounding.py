"""Grounding on natural images: the rows the grounding pipeline moves, its ledger units and reasons, and
its shard contract. Box conventions live in `schemas/boxes.py`.

An item is an image (unit `image`) with its candidate boxes; every candidate box is a sub-item (unit
`box`, `parent_id` = its image), so each box's fate is in the ledger with its own reason. A sample is
`{sample_id}.jpg` + `.txt` (the caption, each grounded phrase followed by its box block) + `.json`
(caption, phrases with their 0-999 boxes and caption spans, source format, image size).
"""
from __future__ import annotations

import json

import pyarrow as pa

from schemas import boxes as B
from schemas import ledger as L
from schemas.common import ERROR_FIELDS, IDENTITY_FIELDS, READ_UNIT, SAMPLE_ID_REGEX
from schemas.contract import Check, Contract, Field, Member

KIND = "grounding"
FORMATS = ("coco", "refcoco", "grit", "captions")  # captions: boxed by the served detector

# --- columns ----------------------------------------------------------------------------------------
URL, IMAGE, PATH = "url", "image", "path"  # the image: by URL (filters.download), bytes, or a file path
CAPTION = "caption"  # null for COCO: built from the category names of the boxes kept
FORMAT = "source_format"
SPLIT = "split"  # RefCOCO's split of the image's refs (train, val, testA, ...); null elsewhere
# JSON list, one entry per candidate box, as the reader found it:
# {"key", "text", "span": [start, end] | null, "box": [...], "coords": "xywh" | "unit", "score", "error"}
# ("error": a reason the reader already knows, e.g. unknown_category; "key": unique within the image)
CANDIDATES = "candidates"
DECLARED_W, DECLARED_H = "declared_width", "declared_height"  # the size the annotations were made on

RAW = pa.schema(
    IDENTITY_FIELDS
    + [
        pa.field(L.UNIT, pa.string()), pa.field(L.PARENT_ID, pa.string()),
        pa.field(FORMAT, pa.string()), pa.field(URL, pa.string()), pa.field(PATH, pa.string()),
        pa.field(IMAGE, pa.binary()), pa.field(CAPTION, pa.string()), pa.field(SPLIT, pa.string()),
        pa.field(CANDIDATES, pa.string()), pa.field(DECLARED_W, pa.int32()), pa.field(DECLARED_H, pa.int32()),
        pa.field(READ_UNIT, pa.string()),
    ]
    + ERROR_FIELDS
)

# Added by filters.grounding_boxes.GroundBoxes (image rows)
PHRASES = "phrases"  # JSON: [{"text", "span": [start, end], "boxes": [[x1,y1,x2,y2] 0-999, ...]}] of the sample
VALID_BOXES = "valid_boxes"  # boxes kept after checks and merging
# Added by filters.grounding_boxes.ExplodeBoxes (box rows)
BOX_REASON, BOX_DUPLICATE_OF, BOX_SCORE = "box_reason", "box_duplicate_of", "box_score"

# --- ledger: units and reasons ----------------------------------------------------------------------
UNITS = ("image", "box")
BOX_REASONS = (
    L.Reason(B.INVALID, L.DROPPED, "boxes", "box not four finite numbers, corners in the wrong order, or wholly "
             "outside the image"),
    L.Reason(B.TOO_SMALL, L.DROPPED, "boxes", "box side under grounding.min_box_side pixels (after clipping to the "
             "image) or under one unit of the 0-999 grid"),
    L.Reason("box_low_score", L.DROPPED, "boxes", "detector confidence below grounding.min_score",
             shows=("box_score",)),
    L.Reason("box_duplicate", L.DROPPED, "boxes", "IoU >= grounding.merge_iou with a better box of the same phrase "
             "(merged into it: duplicate_of names it)"),
    L.Reason("crowd_box", L.DROPPED, "boxes", "a COCO iscrowd=1 region (a crowd of objects in one box), unless "
             "grounding.keep_crowd"),
    L.Reason("unknown_category", L.DROPPED, "boxes", "the annotation's category_id is not among the file's "
             "categories"),
    L.Reason("unlinked_phrase", L.DROPPED, "boxes", "the phrase's caption span is outside the caption"),
    L.Reason("eval_split", L.DROPPED, "boxes", "a RefCOCO ref whose split is not in grounding.refcoco_splits "
             "(evaluation data stays out of training)"),
)
REASONS = L.reasons(
    L.READ, L.DOWNLOAD, L.IMAGE,
    (L.Reason("detector_failed", L.QUARANTINED, "detect", "the detector at grounding.detector.endpoint did not "
              "answer (after retries) or answered something malformed"),),
    BOX_REASONS,
    (L.Reason("too_few_boxes", L.DROPPED, "boxes", "fewer than grounding.min_boxes valid boxes (the paper keeps "
              "samples with at least two)", shows=("valid_boxes",)),),
    L.DEDUP, L.STRUCTURE,
)


# --- the shard contract -------------------------------------------------------------------------------
def _all_boxes(doc: dict) -> list:
    return [b for p in doc["phrases"] for b in p["boxes"]]


def _boxes_on_grid(doc: dict) -> bool:
    return all(B.valid_grid_box(b) for b in _all_boxes(doc)) and all(p["boxes"] for p in doc["phrases"])


def _spans_in_caption(doc: dict) -> bool:
    cap = doc["caption"]
    return all(0 <= p["span"][0] < p["span"][1] <= len(cap) and cap[p["span"][0]:p["span"][1]] == p["text"]
               for p in doc["phrases"])


def _txt_is_rendered(members: dict, doc: dict) -> bool:
    return members["txt"].decode("utf-8") == B.render_text(doc["caption"], doc["phrases"])


def phrase_field() -> Field:
    return Field("phrase", "dict", False)


def contract(cfg=None, facts: dict | None = None) -> Contract:
    """`{sample_id}.jpg` + `.txt` + `.json`. `cfg`: the recipe's grounding section (min_boxes bounds the
    box count); None: the layout only (what the trainer reads)."""
    min_boxes = getattr(cfg, "min_boxes", 2)
    return Contract(
        kind=KIND,
        members=(
            Member("jpg", "jpeg", thumbnail=True, description="the image"),
            Member("txt", "text", description="the caption, each grounded phrase followed by "
                   "<|begin_of_box|>[[x1,y1,x2,y2];...]<|end_of_box|> (0-999)"),
            Member("json", "json", description="the fields below"),
        ),
        fields=(
            Field("sample_id", "str", False, regex=SAMPLE_ID_REGEX),
            Field("source", "str", False), Field("source_key", "str", False), Field("url", "str"),
            Field("source_format", "str", False, values=FORMATS, plot="bars", description="input format"),
            Field("split", "str"),
            Field("width", "int", False, 1, 65535), Field("height", "int", False, 1, 65535),
            Field("caption", "str", False),
            Field("phrases", "list", False, items=phrase_field(),
                  description="[{text, span: [start, end] into caption, boxes: [[x1,y1,x2,y2] 0-999]}]"),
            Field("box_count", "int", True, min_boxes, None, derive=lambda d: len(_all_boxes(d)), plot="loghist",
                  marks=((min_boxes, f"min_boxes {min_boxes}"),), description="valid boxes per sample"),
            Field("boxes_on_grid", "bool", True, values=(True,), derive=_boxes_on_grid,
                  description="every box four integers 0-999 with x1<x2, y1<y2"),
            Field("spans_in_caption", "bool", True, values=(True,), derive=_spans_in_caption,
                  description="every phrase is caption[start:end]"),
        ),
        checks=(Check("txt_is_rendered", "the .txt member is the caption with each phrase's box block",
                      _txt_is_rendered),),
        text_field="caption",
    )


def sample_json(row: dict) -> dict:
    """The sample's json from a final row."""
    return {
        "sample_id": row["sample_id"], "source": row["source"], "source_key": row["source_key"],
        "url": row.get(URL), "source_format": row[FORMAT], "split": row.get(SPLIT),
        "width": row["width"], "height": row["height"], "caption": row[CAPTION],
        "phrases": json.loads(row[PHRASES]),
    }
