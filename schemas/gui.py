"""GUI grounding: web pages rendered in headless Chromium, every visible DOM element with its box, and
referring-expression question-answer pairs. Box conventions: `schemas/boxes.py`.

An item is a page (unit `page`: an HTML file, a WARC response, a URL of a list); each render of it at
one viewport is a sub-item (unit `render`, `parent_id` = the page) and is what a sample is made of:
`{sample_id}.png` (the screenshot) + `.json` (url, viewport, device scale, elements with their boxes,
QA pairs) + `.txt` (the QA pairs, each box as `<|begin_of_box|>[[x1,y1,x2,y2]]<|end_of_box|>`).
"""
from __future__ import annotations

import pyarrow as pa

from schemas import boxes as B
from schemas import ledger as L
from schemas.common import ERROR_FIELDS, IDENTITY_FIELDS, READ_UNIT, SAMPLE_ID_REGEX
from schemas.contract import Check, Contract, Field, Member

KIND = "gui"
SOURCES = ("html", "warc", "url")

# Common screen sizes (CSS pixels) with their device pixel ratios: desktop, tablet, phone.
VIEWPORTS: tuple[tuple[str, int, int, float], ...] = (
    ("desktop", 1920, 1080, 1.0), ("desktop", 1366, 768, 1.0), ("desktop", 1536, 864, 1.25),
    ("desktop", 1440, 900, 2.0), ("desktop", 1280, 800, 1.0),
    ("tablet", 768, 1024, 2.0), ("tablet", 810, 1080, 2.0), ("tablet", 1024, 1366, 2.0),
    ("phone", 390, 844, 3.0), ("phone", 360, 800, 3.0), ("phone", 412, 915, 2.625), ("phone", 375, 667, 2.0),
)

# --- columns ----------------------------------------------------------------------------------------
URL, PATH, HTML = "url", "path", "html"  # the page: a URL to fetch, a local file, or the body (WARC)
SOURCE_TYPE = "source_type"
DEVICE, VIEW_W, VIEW_H, SCALE = "device", "viewport_width", "viewport_height", "device_scale"
RAW = pa.schema(
    IDENTITY_FIELDS
    + [
        pa.field(L.UNIT, pa.string()), pa.field(L.PARENT_ID, pa.string()), pa.field(SOURCE_TYPE, pa.string()),
        pa.field(URL, pa.string()), pa.field(PATH, pa.string()), pa.field(HTML, pa.binary()),
        pa.field(DEVICE, pa.string()), pa.field(VIEW_W, pa.int32()), pa.field(VIEW_H, pa.int32()),
        pa.field(SCALE, pa.float32()), pa.field(READ_UNIT, pa.string()),
    ]
    + ERROR_FIELDS
)
# Added by filters.gui_render.RenderPage (render rows)
SCREENSHOT = "screenshot"  # PNG bytes (spooled: screenshot_ref / screenshot_size)
ELEMENTS = "elements"  # JSON: [{"tag", "role", "name", "text", "attrs", "html", "box": 0-999}]
QA = "qa"  # JSON: [{"task": "reg"|"rec", "question", "answer"}] with box blocks in the text
ELEMENT_COUNT = "element_count"
FINAL_URL = "final_url"
# Added by filters.gui_render.OcrAgreement
OCR_AGREEMENT = "ocr_agreement"  # mean 1 - CER of PP-OCR inside a sample of text elements vs their DOM text
OCR_CHECKED = "ocr_checked"

# --- ledger: units and reasons ----------------------------------------------------------------------
UNITS = ("page", "render")
REASONS = L.reasons(
    L.READ, L.DOWNLOAD,
    (
        L.Reason("not_html", L.QUARANTINED, "read", "the file or WARC record is not an HTML page"),
        L.Reason("render_timeout", L.QUARANTINED, "render", "the page did not load within gui.render.load_timeout_s"),
        L.Reason("render_failed", L.QUARANTINED, "render", "the browser could not load or screenshot the page"),
        L.Reason("too_few_elements", L.DROPPED, "rules", "fewer than gui.min_elements visible elements with a box",
                 shows=("element_count",)),
        L.Reason("solid_color", L.DROPPED, "rules", "the screenshot is one flat colour (pixel std below "
                 "gui.min_pixel_std)", shows=("pixel_std",)),
        L.Reason("ocr_mismatch", L.DROPPED, "ocr", "PP-OCR inside the text elements' boxes disagrees with their DOM "
                 "text (mean 1 - CER below gui.ocr.min_agreement)", shows=("ocr_agreement",)),
    ),
    L.DEDUP,
    (L.Reason("no_render_kept", L.DROPPED, "structure", "every render of the page was dropped or quarantined"),),
    L.STRUCTURE,
)


# --- the shard contract -------------------------------------------------------------------------------
def _boxes_on_grid(doc: dict) -> bool:
    return all(B.valid_grid_box(e["box"]) for e in doc["elements"])


def _qa_boxes_on_grid(doc: dict) -> bool:
    for qa in doc["qa"]:
        for part in (qa["question"], qa["answer"]):
            B.pieces(part)  # raises on a malformed or off-grid box block
    return True


def _txt_is_qa(members: dict, doc: dict) -> bool:
    return members["txt"].decode("utf-8") == qa_text(doc["qa"])


def qa_text(qa: list[dict]) -> str:
    """The `.txt`: one question and its answer per line pair."""
    return "\n".join(f"{q['question']}\n{q['answer']}" for q in qa)


def contract(cfg=None, facts: dict | None = None) -> Contract:
    min_elements = getattr(cfg, "min_elements", 2)
    return Contract(
        kind=KIND,
        members=(
            Member("png", "png", thumbnail=True, description="the screenshot (viewport x device scale pixels)"),
            Member("txt", "text", description="question-answer pairs; boxes as <|begin_of_box|>[[...]]<|end_of_box|>"),
            Member("json", "json", description="the fields below"),
        ),
        fields=(
            Field("sample_id", "str", False, regex=SAMPLE_ID_REGEX),
            Field("page_id", "str", False, regex=SAMPLE_ID_REGEX),
            Field("source", "str", False), Field("source_key", "str", False),
            Field("source_type", "str", False, values=SOURCES, plot="bars", description="page source"),
            Field("url", "str", False),
            Field("device", "str", False, values=("desktop", "tablet", "phone"), plot="bars",
                  description="device class of the viewport"),
            Field("viewport", "list", False, items=Field("css_px", "int", False, 1, 10000)),
            Field("device_scale", "float", False, 0.5, 4.0),
            Field("width", "int", False, 1, 40000), Field("height", "int", False, 1, 40000),
            Field("elements", "list", False, items=Field("element", "dict", False)),
            Field("qa", "list", False, items=Field("pair", "dict", False)),
            Field("ocr_agreement", "float", True, 0.0, 1.0, plot="hist", description="OCR vs DOM text (1 - CER)"),
            Field("element_count", "int", True, min_elements, None, derive=lambda d: len(d["elements"]),
                  plot="loghist", marks=((min_elements, f"min_elements {min_elements}"),),
                  description="visible elements per render"),
            Field("boxes_on_grid", "bool", True, values=(True,), derive=_boxes_on_grid,
                  description="every element box four integers 0-999 with x1<x2, y1<y2"),
            Field("qa_boxes_on_grid", "bool", True, values=(True,), derive=_qa_boxes_on_grid,
                  description="every box in a QA pair on the 0-999 grid"),
        ),
        checks=(Check("txt_is_qa", "the .txt member is the json's QA pairs", _txt_is_qa),
                Check("size_is_viewport_times_scale", "the screenshot is viewport x device scale pixels",
                      lambda m, d: abs(d["width"] - d["viewport"][0] * d["device_scale"]) <= 1
                      and abs(d["height"] - d["viewport"][1] * d["device_scale"]) <= 1)),
        text_field="url",
    )
