"""OCR: an image and the text to read out of it, with every line's box (GLM-4.1V's three OCR branches).

Branches: `synthetic` (text rendered onto a background: the ground truth is exact), `scene` (natural
images read by PP-OCR; kept only with a valid detection) and `academic` (PDF pages with their text
layer in reading order as light markup; pages without one are read by PP-OCR, `text_source: ocr`).

Rows carry the image (spooled), the decode features (filters/decode.py), and the columns below.
Boxes are integers 0-999, [x1, y1, x2, y2], x / width * 1000 and y / height * 1000 (the model's box
format), so they hold at any resize of the image.
"""
from __future__ import annotations

import json

import pyarrow as pa

from schemas import ledger as L
from schemas.common import ERROR_FIELDS, IDENTITY_FIELDS, READ_UNIT, SAMPLE_ID_REGEX
from schemas.contract import Check, Contract, Field, Member

KIND = "ocr"
BRANCHES = ("synthetic", "scene", "academic")
TEXT_SOURCES = ("render", "ocr", "text_layer")  # where the .txt came from

IMAGE = "image"  # encoded bytes; JPEG after filters.decode
BRANCH = "branch"
TEXT = "text"  # the text to read out, in reading order (lines joined by newlines)
LINES = "lines"  # JSON text: [{"text", "score", "box": [x1, y1, x2, y2]}] in reading order, boxes 0-999
MARKUP = "markup"  # academic pages: light markup (markdown headings, lists, paragraphs); else null
MARKUP_SOURCE = "markup_source"  # "latex" (pandoc on the .tex beside the PDF, split at pages) | "text_layer"
MARKUP_SOURCES = ("latex", "text_layer")
TEXT_SOURCE = "text_source"
RENDER = "render"  # JSON text: how a synthetic sample was drawn (seed, font, size, layout, ...); else null
AUGMENTATION = "augmentation"  # JSON text: {"seed", "ops": [...]}; null when none was applied
PAGE = "page"  # academic: 1-based page number; else null
TEXT_KEY = "text_key"  # synthetic: sha1 of the source text (whitespace-free), for text dedup; else null
# filters/ocr.py: the PP-OCR read of a rendered image, against its ground truth
OCR_TEXT, CER = "ocr_text", "cer"
BOXED = "boxed"  # a small JPEG with the lines' boxes drawn: the report's thumbnail

RAW = pa.schema(
    IDENTITY_FIELDS
    + [
        pa.field(BRANCH, pa.string()),
        pa.field(IMAGE, pa.binary()),
        pa.field(TEXT, pa.string()),
        pa.field(LINES, pa.string()),
        pa.field(MARKUP, pa.string()),
        pa.field(MARKUP_SOURCE, pa.string()),
        pa.field(TEXT_SOURCE, pa.string()),
        pa.field(RENDER, pa.string()),
        pa.field(AUGMENTATION, pa.string()),
        pa.field(PAGE, pa.int32()),
        pa.field(TEXT_KEY, pa.string()),
        pa.field(READ_UNIT, pa.string()),
    ]
    + ERROR_FIELDS
)

# --- ledger: units and reasons ---------------------------------------------------------------------
UNITS = ("image",)
REASONS = L.reasons(
    L.READ, L.IMAGE,
    (
        L.Reason("text_missing", L.QUARANTINED, "read", "a synthetic text item is empty after normalisation"),
        L.Reason("pdf_unreadable", L.QUARANTINED, "read", "pypdfium2 cannot open the PDF or render the page"),
        L.Reason("no_text_detected", L.DROPPED, "ocr",
                 "PP-OCR found no line with score >= ocr.min_score and height >= ocr.min_box_px "
                 "(the paper's rule for scene text; also a page without a text layer that OCR cannot read)",
                 shows=("line_count",)),
    ),
    L.DEDUP,
    (
        L.Reason("duplicate_text", L.DROPPED, "dedup",
                 "the same text as another item, whitespace ignored (synthetic: the same source text, however "
                 "it was rendered), at least text_dedup.min_chars long (duplicate_of names it)"),
        L.Reason("illegible_render", L.DROPPED, "legibility",
                 "character error rate of a PP-OCR read against the ground truth above legibility.max_cer",
                 shows=("cer",)),
    ),
)


# --- the shard contract ------------------------------------------------------------------------------
def _lines(doc: dict) -> list[dict]:
    return doc.get("lines") or []


def box_ok(box) -> bool:
    return (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 999 for v in box)
            and box[0] < box[2] and box[1] < box[3])


def _boxes_ok(members: dict, doc: dict) -> bool:
    return all(box_ok(line.get("box")) and str(line.get("text") or "").strip() for line in _lines(doc))


def _txt_is_text(members: dict, doc: dict) -> bool:
    return members["txt"].decode("utf-8") == doc["text"] and doc["text"].strip() != ""


def _markup_only_academic(members: dict, doc: dict) -> bool:
    with_markup = doc["branch"] == "academic" and doc["text_source"] == "text_layer"
    return (doc.get("markup") is not None) == with_markup == (doc.get("markup_source") is not None)


def contract(cfg=None, facts: dict | None = None) -> Contract:
    """`{sample_id}.jpg` + `.txt` (the text in reading order) + `.json`. `cfg`: the recipe's ocr section
    (its legibility threshold bounds `cer`); None: the layout only."""
    legibility = getattr(cfg, "legibility", None)
    max_cer = legibility.max_cer if legibility is not None and legibility.enabled else None
    line = Field("line", "dict", False)
    return Contract(
        kind=KIND,
        members=(
            Member("jpg", "jpeg", thumbnail=True, description="the image (a render, a photo or a PDF page)"),
            Member("txt", "text", description="the text to read out, in reading order"),
            Member("json", "json", description="the fields below"),
        ),
        fields=(
            Field("sample_id", "str", False, regex=SAMPLE_ID_REGEX),
            Field("source", "str", False), Field("source_key", "str", False),
            Field("branch", "str", False, values=BRANCHES, plot="bars", description="OCR branch"),
            Field("text_source", "str", False, values=TEXT_SOURCES, plot="bars",
                  description="where the text comes from"),
            Field("width", "int", False, 1, 65535), Field("height", "int", False, 1, 65535),
            Field("text", "str", False),
            Field("lines", "list", False, items=line),
            Field("markup", "str"),
            Field("markup_source", "str", True, values=MARKUP_SOURCES, plot="bars",
                  description="academic pages: where the markup comes from"),
            Field("page", "int", True, 1, None),
            Field("render", "dict"),
            Field("augmentation", "dict"),
            Field("ocr_text", "str"),
            Field("cer", "float", True, 0.0, max_cer, plot="hist",
                  marks=(() if max_cer is None else ((max_cer, "max_cer"),)),
                  description="character error rate of a PP-OCR read vs the ground truth"),
            Field("phash", "str", False, regex=r"[0-9a-f]{16}"),
            Field("line_count", "int", True, 1, None, derive=lambda d: len(_lines(d)), plot="loghist",
                  description="lines with a box"),
            Field("text_chars", "int", True, 1, None, derive=lambda d: len(d["text"]), plot="loghist",
                  description="characters of text"),
            Field("box_min", "int", True, 0, 999, derive=lambda d: min(v for x in _lines(d) for v in x["box"])),
            Field("box_max", "int", True, 0, 999, derive=lambda d: max(v for x in _lines(d) for v in x["box"])),
        ),
        checks=(
            Check("boxes_well_formed", "every line has non-empty text and a box of 4 integers 0-999 with x1<x2, y1<y2",
                  _boxes_ok),
            Check("txt_is_text", "the .txt member is the json's non-empty text", _txt_is_text),
            Check("markup_for_text_layer_pages", "markup exactly on academic pages read from their text layer",
                  _markup_only_academic),
        ),
        text_field="text",
    )


def lines_json(lines: list[dict]) -> str:
    return json.dumps(lines, ensure_ascii=False, separators=(",", ":"))
