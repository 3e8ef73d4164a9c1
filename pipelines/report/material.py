"""Report material, collected with Spark while a run's DataFrames still exist.

Written under OUT/reports/material/<kind>/ so `python -m jobs.report OUT` can render the report
again after the work dir (with the stage checkpoints) is gone:

- `rows.parquet`: one row per input item (status, reason and the features the distributions are
  drawn from: width, height, caption length, language, CLIP score, concepts matched). Above
  `ROW_CAP` items it is a uniform sample chosen by a hash of sample_id (`material.json` says so);
  the language and concept tables below are always exact.
- `languages.parquet`: exact counts per (language, status).
- `concepts.parquet`: exact counts per concept among the rows that reached balancing ("before")
  and among the kept rows ("after"); the `CONCEPTS_TOP` most frequent before balancing.
- `gallery.parquet`: a capped sample with 160-px JPEG thumbnails made in the executors (never full
  images on the driver): up to `GALLERY_KEPT` kept rows, up to `GALLERY_PER_REASON` rows per drop or
  quarantine reason, and up to `DUP_GROUPS` duplicate groups (keeper + up to `DUP_MEMBERS` members).
  Rows are picked by sample_id order, a hash: a fixed random sample.
- `material.json`: counts, caps and whether the rows were sampled.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
from typing import Any, ClassVar

import pyarrow as pa

from filters.base import Stage
from pipelines.checkpoint import cached
from pipelines.io import storage
from schemas import image_text as S
from schemas import ledger as L
from schemas.common import SAMPLE_ID, SOURCE_KEY

log = logging.getLogger(__name__)

ROW_CAP = 200_000
GALLERY_KEPT = 24
GALLERY_PER_REASON = 12
DUP_GROUPS = 12
DUP_MEMBERS = 6
CONCEPTS_TOP = 100
OVERSAMPLE = 20  # gallery candidates per shown row, drawn by hash before ranking
CAPTION_CHARS = 300  # captions in the gallery are cut here
DETAIL_CHARS = 300
# features drawn in the report, when the kind's feature table has them
FEATURES = {S.WIDTH: "int", S.HEIGHT: "int", S.CAPTION_CHARS: "int", S.CAPTION_WORDS: "int", S.LANGUAGE: "string",
            S.LANGUAGE_SCORE: "float", S.PIXEL_STD: "float", S.PHASH: "long"}


def material_dir(out: str, kind: str) -> str:
    return storage.join(out, "reports", "material", kind)


@dataclasses.dataclass(frozen=True)
class Thumbnail(Stage):
    """Reads `image`; writes `thumb`: a JPEG no larger than size x size (null when undecodable)."""

    name: ClassVar[str] = "thumbnail"
    size: int = 160
    quality: int = 80
    max_pixels: int = 178_956_970  # like decode: never decode a bomb, even for a thumbnail

    def adds(self) -> list[pa.Field]:
        return [pa.field("thumb", pa.binary())]

    def thumbnail(self, data: bytes | None) -> bytes | None:
        from PIL import Image, ImageOps

        from filters.decode import to_rgb

        if not data:
            return None
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > self.max_pixels:
                    return None
                img.draft("RGB", (self.size * 2, self.size * 2))  # JPEG: decode at a reduced scale
                img = to_rgb(ImageOps.exif_transpose(img))
                img.thumbnail((self.size, self.size))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=self.quality)
                return buf.getvalue()
        except Exception:  # noqa: BLE001 - quarantined items are often not images at all
            return None

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        return {"thumb": [self.thumbnail(b) for b in batch.column(S.IMAGE).to_pylist()]}


def _hash_fraction(F):
    return F.xxhash64(F.lit("vlcurate-report"), F.col(SAMPLE_ID)).bitwiseAND((1 << 53) - 1) / float(1 << 53)


def _write_table(table: pa.Table, uri: str) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def _sorted(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in keys])


def collect_material(kind: str, res, ledger, out: str, timer=None) -> dict:
    """Write OUT/reports/material/<kind>/ from a pipeline Result and the run's ledger; returns the
    material.json content. Only capped, small tables come back to the driver."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    mdir = material_dir(out, kind)
    storage.remove_tree(mdir)  # an earlier run's tables must not mix with this run's
    led = ledger.filter(F.col("kind") == kind).select(SAMPLE_ID, L.STATUS, L.REASON, L.DUPLICATE_OF)
    feats = res.features
    present = [c for c in FEATURES if feats is not None and c in feats.columns]
    rows = led.join(feats.select(SAMPLE_ID, *present), SAMPLE_ID, "left") if present else led
    for c, t in FEATURES.items():
        if c not in present:
            rows = rows.withColumn(c, F.lit(None).cast(t))
    if res.scores is not None:
        rows = rows.join(res.scores.select(SAMPLE_ID, S.CLIP_SCORE), SAMPLE_ID, "left")
    else:
        rows = rows.withColumn(S.CLIP_SCORE, F.lit(None).cast("float"))
    has_concepts = res.concepts is not None
    if has_concepts:
        rows = rows.join(res.concepts.select(SAMPLE_ID, S.CONCEPTS), SAMPLE_ID, "left")
    else:
        rows = rows.withColumn(S.CONCEPTS, F.lit(None).cast("array<string>"))
    from pyspark import StorageLevel

    rows = rows.localCheckpoint(storageLevel=StorageLevel.DISK_ONLY)  # small columns, but one row per input item
    n = rows.count()

    # --- per-row features for the distributions: all rows, or a hash sample above ROW_CAP ---------
    sampled = n > ROW_CAP
    dist = rows.filter(_hash_fraction(F) < ROW_CAP / n) if sampled else rows
    dist = dist.select(SAMPLE_ID, L.STATUS, L.REASON, *FEATURES, S.CLIP_SCORE,
                       F.when(F.col(S.CONCEPTS).isNotNull(), F.size(S.CONCEPTS)).alias("n_concepts"))
    dist_t = _sorted(dist.toArrow(), [SAMPLE_ID])
    _write_table(dist_t, storage.join(mdir, "rows.parquet"))

    # --- exact small aggregates ---------------------------------------------------------------------
    langs = rows.groupBy(S.LANGUAGE, L.STATUS).agg(F.count("*").alias("n"))
    _write_table(_sorted(langs.toArrow(), [S.LANGUAGE, L.STATUS]), storage.join(mdir, "languages.parquet"))

    concept_info: dict = {"enabled": has_concepts}
    if has_concepts:
        reached = rows.filter(F.col(S.CONCEPTS).isNotNull())
        pairs = reached.select(F.explode(S.CONCEPTS).alias("concept"), L.STATUS)
        per = pairs.groupBy("concept").agg(F.count("*").alias("before"),
                                           F.sum((F.col(L.STATUS) == L.KEPT).cast("long")).alias("after"))
        top = per.orderBy(F.desc("before"), "concept").limit(CONCEPTS_TOP)
        _write_table(_sorted(top.toArrow(), ["concept"]), storage.join(mdir, "concepts.parquet"))
        t = reached.agg(F.count("*").alias("rows"), F.sum((F.size(S.CONCEPTS) > 0).cast("long")).alias("matched"),
                        F.sum((F.col(L.STATUS) == L.KEPT).cast("long")).alias("kept")).first()
        p = per.agg(F.count("*").alias("distinct"), F.sum("before").alias("before"), F.sum("after").alias("after")).first()
        concept_info.update(reached_balance=int(t["rows"]), matched=int(t["matched"] or 0), kept=int(t["kept"] or 0),
                            distinct=int(p["distinct"]), pairs_before=int(p["before"] or 0),
                            pairs_after=int(p["after"] or 0))

    # --- duplicate groups ---------------------------------------------------------------------------
    dups = rows.filter(F.col(L.DUPLICATE_OF).isNotNull())
    groups = dups.groupBy(L.DUPLICATE_OF).agg(F.count("*").alias("members"))
    sizes = {int(r["size"]): int(r["n"]) for r in
             groups.groupBy((F.col("members") + 1).alias("size")).agg(F.count("*").alias("n")).collect()}
    keepers = [r[0] for r in groups.select(L.DUPLICATE_OF).orderBy(L.DUPLICATE_OF).limit(DUP_GROUPS).collect()]

    # --- gallery picks: a fixed random sample (sample_id order) per section -------------------------
    # A big section (millions kept) must not be sorted by one task: first thin each section by a hash
    # to ~OVERSAMPLE times what it shows, then rank what is left.
    sectioned = rows.withColumn("section", F.when(F.col(L.STATUS) == L.KEPT, F.lit("kept")).otherwise(F.col(L.REASON)))
    sizes_by_section = {r["section"]: r["n"] for r in sectioned.groupBy("section").agg(F.count("*").alias("n")).collect()}
    keep = F.lit(1.0)
    for name, count in sorted(sizes_by_section.items(), key=lambda x: str(x[0])):
        want = OVERSAMPLE * (GALLERY_KEPT if name == "kept" else GALLERY_PER_REASON)
        if name is not None and count > want:
            keep = F.when(F.col("section") == name, F.lit(want / count)).otherwise(keep)
    ranked = sectioned.filter(_hash_fraction(F) < keep).withColumn(
        "rn", F.row_number().over(Window.partitionBy("section").orderBy(SAMPLE_ID)))
    picks = ranked.filter(F.col("rn") <= F.when(F.col("section") == "kept", GALLERY_KEPT).otherwise(GALLERY_PER_REASON))
    picks = picks.select(SAMPLE_ID, "section")
    if keepers:
        members = dups.filter(F.col(L.DUPLICATE_OF).isin(keepers)).withColumn(
            "rn", F.row_number().over(Window.partitionBy(L.DUPLICATE_OF).orderBy(SAMPLE_ID)))
        members = members.filter(F.col("rn") <= DUP_MEMBERS).select(
            SAMPLE_ID, F.concat(F.lit("dup:"), F.col(L.DUPLICATE_OF)).alias("section"))
        heads = rows.filter(F.col(SAMPLE_ID).isin(keepers)).select(
            SAMPLE_ID, F.concat(F.lit("dup:"), F.col(SAMPLE_ID)).alias("section"))
        picks = picks.unionByName(members).unionByName(heads)
    picks = cached(picks)  # a few hundred ids: broadcast into the joins with the image rows
    ids = picks.select(SAMPLE_ID).distinct()

    from filters.base import apply_stage

    extra = led.select(SAMPLE_ID).join(ids, SAMPLE_ID, "left_semi")
    info_cols = ledger.filter(F.col("kind") == kind).select(SAMPLE_ID, SOURCE_KEY, F.substring(L.DETAIL, 1, DETAIL_CHARS)
                                                            .alias(L.DETAIL))
    extra = extra.join(info_cols, SAMPLE_ID, "left")
    if feats is not None and S.IMAGE in feats.columns:
        chosen = feats.join(ids, SAMPLE_ID, "left_semi")
        thumbs = apply_stage(chosen.select(SAMPLE_ID, S.IMAGE), Thumbnail(), timer).select(SAMPLE_ID, "thumb")
        extra = extra.join(thumbs, SAMPLE_ID, "left")
    else:
        extra = extra.withColumn("thumb", F.lit(None).cast("binary"))
    if feats is not None and S.CAPTION in feats.columns:
        extra = extra.join(feats.join(ids, SAMPLE_ID, "left_semi").select(
            SAMPLE_ID, F.substring(S.CAPTION, 1, CAPTION_CHARS).alias(S.CAPTION)), SAMPLE_ID, "left")
    else:
        extra = extra.withColumn(S.CAPTION, F.lit(None).cast("string"))
    keeper_hash = rows.select(F.col(SAMPLE_ID).alias("_k"), F.col(S.PHASH).alias("keeper_phash"))
    gallery = (picks.join(rows, SAMPLE_ID, "left").join(extra, SAMPLE_ID, "left")
               .join(keeper_hash, F.col(L.DUPLICATE_OF) == F.col("_k"), "left").drop("_k"))
    gallery_t = _sorted(gallery.toArrow(), ["section", SAMPLE_ID])
    _write_table(gallery_t, storage.join(mdir, "gallery.parquet"))

    meta = {
        "kind": kind, "rows": n, "rows_in_material": dist_t.num_rows, "sampled": sampled, "row_cap": ROW_CAP,
        "gallery": {"kept": GALLERY_KEPT, "per_reason": GALLERY_PER_REASON, "dup_groups": DUP_GROUPS,
                    "dup_members": DUP_MEMBERS, "thumb_px": Thumbnail.size, "caption_chars": CAPTION_CHARS},
        "duplicates": {"groups": sum(sizes.values()), "dropped": int(dups.count()),
                       "sizes": {str(k): sizes[k] for k in sorted(sizes)}},
        "concepts": concept_info,
        "features": present,
    }
    storage.write_bytes(storage.join(mdir, "material.json"), json.dumps(meta, indent=1, sort_keys=True).encode())
    return meta
