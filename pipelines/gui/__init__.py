"""GUI grounding: read pages -> a render per drawn viewport (Chromium via Playwright) -> spool the
screenshots -> OCR agreement | rules (too few elements, solid screenshot, OCR mismatch) -> screenshot
dedup (pHash, across renders and pages) -> pages with no render left -> shards + ledger.

Inputs (`--input gui=URI`): folders of HTML pages, WARC files (HTML responses), URL lists. Rows,
reasons and the shard contract: `schemas/gui.py`; rendering: `filters/gui_render.py`; boxes:
`schemas/boxes.py`. A sample is a render (`sample_unit`), its page the item.
"""
from __future__ import annotations

import dataclasses
import json

from filters.dedup import Dedup, find_duplicates_with_stats
from filters.grounding_boxes import DrawBoxes
from filters.gui_render import OcrAgreement, RenderPage
from filters.media import Spool, read_ref, ref_column, size_column
from filters.rules import first_reason
from pipelines.checkpoint import fingerprint, own
from pipelines.gui import read as R
from pipelines.io import readers, storage
from pipelines.kind import Context, Kind, Plan, Step
from schemas import gui as S
from schemas import ledger as L
from schemas.common import SAMPLE_ID

BOXED = "boxed"  # the report's thumbnail: the screenshot with the element boxes drawn
DEFAULT_VIEWPORTS = tuple(f"{d}:{w}x{h}@{s:g}" for d, w, h, s in S.VIEWPORTS)


@dataclasses.dataclass(frozen=True)
class Ocr:
    enabled: bool = True
    elements: int = 4  # text elements read per render
    min_agreement: float = 0.5  # mean 1 - CER below this drops the render (ocr_mismatch)


@dataclasses.dataclass(frozen=True)
class Gui:
    """The recipe section `gui`."""

    viewports: tuple[str, ...] = DEFAULT_VIEWPORTS  # DEVICE:WIDTHxHEIGHT@SCALE, CSS pixels
    renders_per_page: int = 2  # viewports drawn per page (a fixed draw per page)
    files_per_task: int = 32  # HTML files per read unit
    min_elements: int = 4  # visible elements a render needs (and at least one QA pair)
    min_pixel_std: float = 2.0  # a flat screenshot (blank page) is dropped
    render: RenderPage = RenderPage()
    ocr: Ocr = Ocr()
    # Screenshot pHash is coarse for text pages: distinct debian-handbook pages measured 6-10 of 64 bits
    # (dHash 47-61 of 256), inside the photo radii (10 / 64); a near-identical state (one banner text
    # changed) measured 0 / 0. Tight radii keep distinct pages and still remove repeated UI states.
    dedup: Dedup = Dedup(hamming_radius=2, second_radius=8)
    dedup_enabled: bool = True

    def __post_init__(self) -> None:
        for v in self.viewports:
            R.parse_viewport(v)
        if self.renders_per_page < 1:
            raise ValueError("gui.renders_per_page must be at least 1")


def to_sample(row: dict) -> dict:
    qa = json.loads(row[S.QA])
    doc = {"sample_id": row[SAMPLE_ID], "page_id": row[L.PARENT_ID], "source": row["source"],
           "source_key": row["source_key"], "source_type": row[S.SOURCE_TYPE],
           "url": row[S.FINAL_URL] or row[S.URL] or "", "device": row[S.DEVICE],
           "viewport": [row[S.VIEW_W], row[S.VIEW_H]], "device_scale": float(row[S.SCALE]),
           "width": row["width"], "height": row["height"], "elements": json.loads(row[S.ELEMENTS]), "qa": qa,
           "ocr_agreement": None if row.get(S.OCR_AGREEMENT) is None else round(float(row[S.OCR_AGREEMENT]), 4)}
    return {"__key__": row[SAMPLE_ID], "png": read_ref(row[ref_column(S.SCREENSHOT)]),
            "txt": S.qa_text(qa).encode("utf-8"),
            "json": json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8")}


def plan(ctx: Context) -> Plan:
    cfg: Gui = ctx.cfg
    recipe = ctx.recipe
    import os

    if not os.path.exists("/usr/bin/chromium"):
        raise RuntimeError("gui: Debian's chromium (/usr/bin/chromium) is missing: `make system` installs it")
    inputs = [storage.normalize(u) for u in ctx.uris]
    units = R.plan_units(inputs, cfg.files_per_task)
    if not units:
        raise FileNotFoundError(f"gui: no HTML pages, WARC files or URL lists under {inputs}")
    viewports = tuple(R.parse_viewport(v) for v in cfg.viewports)
    render = dataclasses.replace(cfg.render, seed=recipe.seed)
    key = fingerprint("gui", inputs, recipe.read, cfg.viewports, cfg.renders_per_page, cfg.files_per_task,
                      render.cache_key(), cfg.ocr, recipe.seed)
    spool = Spool(directory=own(f"{ctx.work_dir.rstrip('/')}/media/{S.KIND}-{key}"), columns=(S.SCREENSHOT, BOXED))
    counter = ctx.spark.sparkContext.accumulator({}, readers.ReadCounts())

    def features():
        import pyarrow as pa

        from filters.base import apply_stages

        sc = ctx.spark.sparkContext
        plan_df = readers.task_table(ctx.spark, [[(u["format"], u["uri"], u["files"], u["root"])] for u in units],
                                     pa.schema([("format", pa.string()), ("uri", pa.string()),
                                                ("files", pa.list_(pa.string())), ("root", pa.string())]))
        reader = R.ReadGui(recipe.read.dataset, counter, viewports, cfg.renders_per_page, recipe.seed,
                           recipe.read.max_member_bytes)
        raw = apply_stages(plan_df, [reader], ctx.timer)
        parts = max(len(units), sc.defaultParallelism)
        stages = [render, DrawBoxes(S.SCREENSHOT, S.ELEMENTS, BOXED), spool]
        if cfg.ocr.enabled:
            stages.append(OcrAgreement(elements=cfg.ocr.elements, seed=recipe.seed))
        return apply_stages(raw.repartition(parts, SAMPLE_ID), stages, ctx.timer)

    def rules(F):
        render_row = F.col(L.UNIT) == "render"
        checks = [
            (render_row & ((F.col(S.ELEMENT_COUNT) < cfg.min_elements) | (F.col(S.QA) == "[]")),
             F.lit("too_few_elements")),
            (render_row & (F.col("pixel_std") < cfg.min_pixel_std), F.lit("solid_color")),
        ]
        if cfg.ocr.enabled:
            checks.append((render_row & (F.col(S.OCR_AGREEMENT) < cfg.ocr.min_agreement), F.lit("ocr_mismatch")))
        return first_reason(checks)

    dedup_facts = {"skipped": 0, "edges": 0, "rounds": 0}

    def dedup(alive):
        from pyspark.sql import functions as F

        drops, stats = find_duplicates_with_stats(alive.filter(F.col(L.UNIT) == "render"), cfg.dedup)
        dedup_facts.update(skipped=stats.skipped, edges=stats.edges, rounds=stats.rounds)
        return drops

    def pages(alive):
        from pyspark.sql import functions as F

        renders = alive.filter(F.col(L.UNIT) == "render").select(F.col(L.PARENT_ID).alias("_page")).distinct()
        return (alive.filter(F.col(L.UNIT) == "page").join(renders, F.col(SAMPLE_ID) == F.col("_page"), "left_anti")
                .select(SAMPLE_ID, F.lit("no_render_kept").alias("reason")))

    steps = [Step("rules", reason=rules, depends=(cfg.min_elements, cfg.min_pixel_std, cfg.ocr))]
    if cfg.dedup_enabled:
        steps.append(Step("dedup", decide=dedup, depends=cfg.dedup))
    steps.append(Step("pages", decide=pages))

    report = {
        "source_type": lambda F: F.col(S.SOURCE_TYPE), "device": lambda F: F.col(S.DEVICE),
        "element_count": lambda F: F.col(S.ELEMENT_COUNT), "pixel_std": lambda F: F.col("pixel_std"),
        "ocr_agreement": (lambda F: F.col(S.OCR_AGREEMENT)) if cfg.ocr.enabled
        else (lambda F: F.lit(None).cast("float")),
        "width": lambda F: F.col("width"), "height": lambda F: F.col("height"), "phash": lambda F: F.col("phash"),
    }
    return Plan(
        features=features, key=key, steps=steps, to_sample=to_sample,
        sample_size=lambda F: F.col(size_column(S.SCREENSHOT)) + F.length(S.ELEMENTS) + F.length(S.QA) * 2 + 800,
        report=report, thumbnail=BOXED, text=S.URL,
        facts={"gui": {"units": len(units), "viewports": list(cfg.viewports), "renders_per_page": cfg.renders_per_page,
                       "ocr": dataclasses.asdict(cfg.ocr)}, "dedup": dedup_facts},
        read_counts=lambda: readers.per_unit(counter.value),
    )


def explain(row: dict, section: dict, facts: dict) -> str:
    reason = row.get("reason")
    if reason == "too_few_elements":
        return f"{row.get('element_count')} elements < {section.get('min_elements')}"
    if reason == "ocr_mismatch" and row.get("ocr_agreement") is not None:
        return f"OCR agreement {row['ocr_agreement']:.2f} < {section.get('ocr', {}).get('min_agreement')}"
    if row.get("status") == "kept" and row.get("element_count") is not None:
        return f"{row.get('device')}: {row['element_count']} elements"
    return row.get("detail") or reason or ""


KIND = Kind(name=S.KIND, config=Gui, units=S.UNITS, reasons=S.REASONS, contract=S.contract, plan=plan,
            layouts=("folders of .html pages", "WARC files (HTML responses)", "URL lists (.urls / .txt)"),
            explain=explain, sample_unit="render")
