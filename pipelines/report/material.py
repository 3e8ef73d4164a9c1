"""Report material, collected with Spark while a run's DataFrames still exist.

Written under OUT/reports/material/<kind>/ so `python -m jobs.report OUT` can render the report
again after the work dir (with the stage checkpoints) is gone. Generic over kinds: what is drawn
comes from the kind's plan (`Plan.report`: a column per value, named like the contract's fields)
and its contract (`Field.plot`).

- `rows.parquet`: one row per ledger row of the kind (unit, status, reason and the plan's scalar
  report columns; list columns as their length `n_<name>`). Above `ROW_CAP` rows it is a uniform
  sample chosen by a hash of sample_id (`material.json` says so); the bar tables below are exact.
- `bars-<field>.parquet`: exact counts per (value, status) of each field the contract plots as
  bars (a list field counts its elements), the `BARS_TOP` most frequent values.
- `gallery.parquet`: a capped sample with 160-px JPEG thumbnails made in the executors (never full
  images on the driver): up to `GALLERY_KEPT` kept rows, up to `GALLERY_PER_REASON` rows per drop or
  quarantine reason, and up to `DUP_GROUPS` duplicate groups (keeper + up to `DUP_MEMBERS` members),
  each duplicate with its keeper's report values (`keeper_<name>`).
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
from filters.media import column_bytes
from pipelines.checkpoint import cached
from pipelines.io import storage
from schemas import ledger as L
from schemas.common import SAMPLE_ID, SOURCE_KEY

log = logging.getLogger(__name__)

ROW_CAP = 200_000
GALLERY_KEPT = 24
GALLERY_PER_REASON = 12
DUP_GROUPS = 12
DUP_MEMBERS = 6
BARS_TOP = 100
OVERSAMPLE = 20  # gallery candidates per shown row, drawn by hash before ranking
TEXT_CHARS = 300  # texts in the gallery are cut here
DETAIL_CHARS = 300
def material_dir(out: str, kind: str) -> str:
    return storage.join(out, "reports", "material", kind)


@dataclasses.dataclass(frozen=True)
class Thumbnail(Stage):
    """Reads the media `column` (bytes or its spooled reference); writes `thumb`: a JPEG no larger than
    size x size (null when undecodable)."""

    name: ClassVar[str] = "thumbnail"
    column: str = "image"
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
        return {"thumb": [self.thumbnail(b) for b in column_bytes(batch, self.column)]}


def _hash_fraction(F):
    return F.xxhash64(F.lit("vlcurate-report"), F.col(SAMPLE_ID)).bitwiseAND((1 << 53) - 1) / float(1 << 53)


def _write_table(table: pa.Table, uri: str) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def _sorted(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in keys])


def collect_material(kind, res, ledger, out: str, timer=None, cfg=None) -> dict:
    """Write OUT/reports/material/<kind>/ from a kind's Result and the run's ledger; returns the
    material.json content. Only capped, small tables come back to the driver."""
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType

    from filters.base import apply_stage
    from filters.media import REF

    name = kind.name
    mdir = material_dir(out, name)
    storage.remove_tree(mdir)  # an earlier run's tables must not mix with this run's
    led = ledger.filter(F.col("kind") == name).select(SAMPLE_ID, L.UNIT, L.STATUS, L.REASON, L.DUPLICATE_OF)
    report = [c for c in res.report_columns]
    rows = led.join(res.rows.select(SAMPLE_ID, *report), SAMPLE_ID, "left")
    rows = rows.persist(StorageLevel.DISK_ONLY)  # small columns, but one row per ledger row
    n = rows.count()
    types = {f.name: f.dataType for f in rows.schema.fields}
    lists = [c for c in report if isinstance(types[c], ArrayType)]
    scalars = [c for c in report if c not in lists]

    # --- per-row values for the distributions: all rows, or a hash sample above ROW_CAP -------------
    sampled = n > ROW_CAP
    dist = rows.filter(_hash_fraction(F) < ROW_CAP / n) if sampled else rows
    dist = dist.select(SAMPLE_ID, L.UNIT, L.STATUS, L.REASON, *scalars,
                       *[F.when(F.col(c).isNotNull(), F.size(c)).alias(f"n_{c}") for c in lists])
    dist_t = _sorted(dist.toArrow(), [SAMPLE_ID])
    _write_table(dist_t, storage.join(mdir, "rows.parquet"))

    # --- exact counts of the fields drawn as bars ---------------------------------------------------
    contract = kind.contract(cfg, res.facts)
    bars = {}
    for f in contract.fields:
        if f.plot != "bars" or f.name not in types:
            continue
        reached = rows.filter(F.col(f.name).isNotNull())
        value = F.explode(f.name) if f.name in lists else F.col(f.name).cast("string")
        per = reached.select(value.alias("value"), L.STATUS).groupBy("value", L.STATUS).agg(F.count("*").alias("n"))
        totals = per.groupBy("value").agg(F.sum("n").alias("total"))
        top = totals.orderBy(F.desc("total"), "value").limit(BARS_TOP).select("value")
        table = per.join(top, "value", "left_semi")
        _write_table(_sorted(table.toArrow(), ["value", L.STATUS]), storage.join(mdir, f"bars-{f.name}.parquet"))
        agg = reached.agg(F.count("*").alias("rows"),
                          (F.sum((F.size(f.name) > 0).cast("long")) if f.name in lists else F.count("*")).alias("with"))
        t = agg.first()
        bars[f.name] = {"rows": int(t["rows"]), "with_values": int(t["with"] or 0),
                        "distinct": int(totals.count()), "list": f.name in lists}

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
    for section, count in sorted(sizes_by_section.items(), key=lambda x: str(x[0])):
        want = OVERSAMPLE * (GALLERY_KEPT if section == "kept" else GALLERY_PER_REASON)
        if section is not None and count > want:
            keep = F.when(F.col("section") == section, F.lit(want / count)).otherwise(keep)
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


    extra = led.select(SAMPLE_ID).join(ids, SAMPLE_ID, "left_semi")
    info_cols = ledger.filter(F.col("kind") == name).select(SAMPLE_ID, SOURCE_KEY, F.substring(L.DETAIL, 1, DETAIL_CHARS)
                                                            .alias(L.DETAIL))
    extra = extra.join(info_cols, SAMPLE_ID, "left")
    chosen = res.rows.join(ids, SAMPLE_ID, "left_semi")
    if res.thumbnail:
        base = res.thumbnail.removesuffix(REF)
        thumbs = apply_stage(chosen.select(SAMPLE_ID, res.thumbnail), Thumbnail(column=base), timer)
        extra = extra.join(thumbs.select(SAMPLE_ID, "thumb"), SAMPLE_ID, "left")
    else:
        extra = extra.withColumn("thumb", F.lit(None).cast("binary"))
    text = F.substring(res.text, 1, TEXT_CHARS) if res.text else F.lit(None).cast("string")
    extra = extra.join(chosen.select(SAMPLE_ID, text.alias("text")), SAMPLE_ID, "left")
    keeper = rows.select(F.col(SAMPLE_ID).alias("_k"), *[F.col(c).alias(f"keeper_{c}") for c in scalars])
    gallery = (picks.join(rows, SAMPLE_ID, "left").join(extra, SAMPLE_ID, "left")
               .join(keeper, F.col(L.DUPLICATE_OF) == F.col("_k"), "left").drop("_k"))
    gallery_t = _sorted(gallery.toArrow(), ["section", SAMPLE_ID])
    _write_table(gallery_t, storage.join(mdir, "gallery.parquet"))

    meta = {
        "kind": name, "rows": n, "rows_in_material": dist_t.num_rows, "sampled": sampled, "row_cap": ROW_CAP,
        "gallery": {"kept": GALLERY_KEPT, "per_reason": GALLERY_PER_REASON, "dup_groups": DUP_GROUPS,
                    "dup_members": DUP_MEMBERS, "thumb_px": Thumbnail.size, "text_chars": TEXT_CHARS},
        "duplicates": {"groups": sum(sizes.values()), "dropped": int(dups.count()),
                       "sizes": {str(k): sizes[k] for k in sorted(sizes)}},
        "bars": bars,
        "columns": report,
        "unit": kind.samples_unit,  # the unit the contract's plotted fields describe
        "plots": [{"name": f.name, "plot": f.plot, "description": f.description,
                   "marks": [[float(v), str(label)] for v, label in f.marks]}
                  for f in contract.fields if f.plot and f.name in report],
    }
    rows.unpersist()
    storage.write_bytes(storage.join(mdir, "material.json"), json.dumps(meta, indent=1, sort_keys=True).encode())
    return meta
