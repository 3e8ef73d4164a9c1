"""Grounding on natural images: read -> load / download -> decode -> boxes -> spool -> one row per box |
image rules + box verdicts + the two-box rule -> dedup -> shards + ledger.

Inputs (`--input grounding=URI`): COCO detection JSON with its image folder, RefCOCO refs with their
instances.json, GRIT-style Parquet (0-1 boxes over caption spans; images as bytes or URLs), and caption
Parquet without spans, whose phrases a detector served over HTTP boxes (`grounding.detector.endpoint`). Box
conventions: `schemas/boxes.py`; rows, reasons and the shard contract: `schemas/grounding.py`.
"""
from __future__ import annotations

import dataclasses
import json

from filters.decode import Decode
from filters.dedup import Dedup, find_duplicates_with_stats
from filters.download import DOWNLOAD_STATUS, Download
from filters.grounding_boxes import DrawBoxes, ExplodeBoxes, GroundBoxes, LoadImage
from filters.grounding_detect import Detector
from filters.media import Spool, read_ref, ref_column, size_column
from filters.rules import first_reason, image_checks
from pipelines.checkpoint import fingerprint, own
from pipelines.grounding import read as R
from pipelines.io import readers, storage
from pipelines.kind import Context, Kind, Plan, Step
from schemas import boxes as B
from schemas import grounding as S
from schemas import ledger as L
from schemas.common import SAMPLE_ID

BOXED = "boxed"  # the report's thumbnail: the image with the sample's boxes drawn


@dataclasses.dataclass(frozen=True)
class Grounding:
    """The recipe section `grounding`."""

    image_root: str = ""  # folder COCO / RefCOCO file names are relative to; "" = found beside the JSON
    grit_phrases: str = "noun_chunks"  # GRIT: which span list is grounded: noun_chunks or ref_exps
    refcoco_splits: tuple[str, ...] = ("train",)  # RefCOCO refs of other splits are dropped (eval_split)
    keep_crowd: bool = False  # COCO iscrowd=1 regions are dropped (crowd_box) unless set
    min_boxes: int = 2  # a sample needs at least this many valid boxes (the paper: two)
    min_side: int = 64  # image rules (shared with every kind): shorter side in pixels
    max_aspect_ratio: float = 6.0
    min_pixel_std: float = 2.0
    download: Download = Download()
    decode: Decode = Decode()
    boxes: GroundBoxes = GroundBoxes()
    detector: Detector = Detector()  # boxes the phrases of caption tables without GRIT spans
    dedup: Dedup = Dedup()
    dedup_enabled: bool = True

    def __post_init__(self) -> None:
        if self.grit_phrases not in ("noun_chunks", "ref_exps"):
            raise ValueError(f"grounding.grit_phrases: {self.grit_phrases!r} is not noun_chunks or ref_exps")
        if self.min_boxes < 1:
            raise ValueError("grounding.min_boxes must be at least 1")


def to_sample(row: dict) -> dict:
    doc = S.sample_json(row)
    return {"__key__": row[SAMPLE_ID], "jpg": read_ref(row[ref_column(S.IMAGE)]),
            "txt": B.render_text(doc["caption"], doc["phrases"]).encode("utf-8"),
            "json": json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8")}


def plan(ctx: Context) -> Plan:
    cfg: Grounding = ctx.cfg
    recipe = ctx.recipe
    inputs = [storage.normalize(u) for u in ctx.uris]
    units = R.plan_units(inputs)
    if not units:
        raise FileNotFoundError(f"grounding: no COCO/RefCOCO JSON or GRIT Parquet under {inputs}")
    if not cfg.detector.endpoint:  # a caption table without spans cannot be grounded without a detector
        bare = [u["uri"] for u in units if u["format"] == "grit" and cfg.grit_phrases not in R.span_columns(u["uri"])]
        if bare:
            raise ValueError(f"grounding: {bare[0]} has captions but no {cfg.grit_phrases} column; set "
                             "grounding.detector.endpoint to a served open-vocabulary detector to box its phrases")
    key = fingerprint("grounding", inputs, recipe.read, cfg.image_root, cfg.grit_phrases, cfg.refcoco_splits, cfg.keep_crowd,
                      cfg.download, cfg.decode, cfg.detector.cache_key(), cfg.boxes)
    spool = Spool(directory=own(f"{ctx.work_dir.rstrip('/')}/media/{S.KIND}-{key}"), columns=(S.IMAGE, BOXED))
    counter = ctx.spark.sparkContext.accumulator({}, readers.ReadCounts())

    def features():
        from filters.base import apply_stages

        plan_df = readers.task_table(ctx.spark, [[(u["format"], u["uri"], u["instances"], u["root"])] for u in units],
                                     _unit_schema())
        raw = apply_stages(plan_df, [R.ReadGrounding(recipe.read.dataset, counter, cfg)], ctx.timer)
        parts = max(len(units), ctx.spark.sparkContext.defaultParallelism)
        return apply_stages(raw.repartition(parts, SAMPLE_ID),
                            [LoadImage(recipe.read.max_member_bytes), cfg.download, cfg.decode, cfg.detector,
                             cfg.boxes, DrawBoxes(S.IMAGE, S.PHRASES, BOXED), spool, ExplodeBoxes()], ctx.timer)

    def boxes(alive):
        from pyspark.sql import functions as F

        image = F.col(L.UNIT) == "image"
        checks = [(image & c, code) for c, code in image_checks(cfg.min_side, cfg.max_aspect_ratio, cfg.min_pixel_std)]
        checks.append((image & (F.col(S.VALID_BOXES) < cfg.min_boxes), F.lit("too_few_boxes")))
        checks.append((F.col(S.BOX_REASON).isNotNull(), F.col(S.BOX_REASON)))
        reason = first_reason(checks)
        return (alive.select(SAMPLE_ID, reason.alias("reason"),
                             F.when(F.col(S.BOX_REASON) == "box_duplicate", F.col(S.BOX_DUPLICATE_OF))
                             .alias("duplicate_of"))
                .filter("reason IS NOT NULL"))

    dedup_facts = {"skipped": 0, "edges": 0, "rounds": 0}

    def dedup(alive):
        from pyspark.sql import functions as F

        drops, stats = find_duplicates_with_stats(alive.filter(F.col(L.UNIT) == "image"), cfg.dedup)
        dedup_facts.update(skipped=stats.skipped, edges=stats.edges, rounds=stats.rounds)
        return drops

    steps = [Step("boxes", decide=boxes, depends=(cfg.min_boxes, cfg.min_side, cfg.max_aspect_ratio,
                                                   cfg.min_pixel_std))]
    if cfg.dedup_enabled:
        steps.append(Step("dedup", decide=dedup, depends=cfg.dedup))

    def sample_size(F):
        return F.col(size_column(S.IMAGE)) + F.length(S.PHRASES) + F.length(S.CAPTION) + 600

    report = {
        "source_format": lambda F: F.col(S.FORMAT),
        "box_count": lambda F: F.col(S.VALID_BOXES),
        "valid_boxes": lambda F: F.col(S.VALID_BOXES),
        "box_score": lambda F: F.col(S.BOX_SCORE),
        "width": lambda F: F.col("width"), "height": lambda F: F.col("height"),
        "short_side": lambda F: F.least("width", "height"),
        "aspect_ratio": lambda F: F.greatest("width", "height") / F.least("width", "height"),
        "pixel_std": lambda F: F.col("pixel_std"),
        "phash": lambda F: F.col("phash"),
    }
    def opted_out_first(F):
        # an opted-out URL has no image (so decode reports one missing): the opt-out is the reason
        return F.when(F.col(DOWNLOAD_STATUS) == "opted_out", F.lit("opted_out")).otherwise(F.col("error"))

    return Plan(
        features=features, key=key, steps=steps, to_sample=to_sample, sample_size=sample_size,
        error_reason=opted_out_first, report=report, thumbnail=BOXED, text=S.CAPTION,
        facts={"grounding": {"units": len(units), "formats": sorted({u["format"] for u in units}),
                             "min_boxes": cfg.min_boxes}, "dedup": dedup_facts},
        read_counts=lambda: readers.per_unit(counter.value),
    )


def _unit_schema():
    import pyarrow as pa

    return pa.schema([pa.field("format", pa.string()), pa.field("uri", pa.string()),
                      pa.field("instances", pa.string()), pa.field("root", pa.string())])


def explain(row: dict, section: dict, facts: dict) -> str:
    reason = row.get("reason")
    if row.get("status") == "kept":
        return f"{row.get('valid_boxes')} boxes" if row.get("valid_boxes") is not None else ""
    if reason == "too_few_boxes":
        return f"{row.get('valid_boxes')} valid boxes < {section.get('min_boxes')}"
    if reason == "box_low_score" and row.get("box_score") is not None:
        return f"score {row['box_score']:.3f} < {section.get('boxes', {}).get('min_score')}"
    if reason == "image_too_small" and row.get("short_side") is not None:
        return f"shorter side {row['short_side']} < {section.get('min_side')}"
    return row.get("detail") or reason or ""


KIND = Kind(
    name=S.KIND, config=Grounding, units=S.UNITS, reasons=S.REASONS, contract=S.contract, plan=plan,
    layouts=("COCO detection JSON + image folder", "RefCOCO refs(<by>).p|refs*.json + instances.json",
             "GRIT-style Parquet (caption, noun_chunks/ref_exps in 0-1, image bytes or url)"),
    explain=explain,
)
