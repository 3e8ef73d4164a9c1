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
- `documents.parquet` and `document-images.parquet`, for a kind that declares a document layout
  (`Kind.layout`): up to `DOC_KEPT` kept documents, `DOC_PER_REASON` per document drop reason and
  `DOC_PER_IMAGE_REASON` kept documents per reason one of their images was removed for, each as the
  head of its layout (`DOC_CHARS` characters of text, `DOC_IMAGES` images, cut in the executors), and
  the images in that head plus up to `DOC_OFF_TEXT` the layout does not place (removed with the
  boilerplate), each with its thumbnail and its own status and reason.
- `material.json`: counts, caps and whether the rows were sampled.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections import Counter
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from filters.base import Stage
from filters.media import column_bytes
from pipelines.checkpoint import cached
from pipelines.io import storage
from schemas import ledger as L
from schemas.common import SAMPLE_ID, SOURCE_KEY

log = logging.getLogger(__name__)

ROW_CAP = 200_000
ROWS_PER_PARTITION = 500_000  # the per-row table the report reads many times: narrow rows, few partitions
GALLERY_KEPT = 24
GALLERY_PER_REASON = 12
DUP_GROUPS = 12
DUP_MEMBERS = 6
BARS_TOP = 100
OVERSAMPLE = 20  # gallery candidates per shown row, drawn by hash before ranking
TEXT_CHARS = 300  # texts in the gallery are cut here
DETAIL_CHARS = 300
DOC_KEPT = 6  # documents shown as their text with their images in place
DOC_PER_REASON = 2
DOC_PER_IMAGE_REASON = 2  # kept documents per reason an image of theirs was removed for
DOC_CHARS = 1500  # text of a document shown, at most
DOC_IMAGES = 12  # images in place per document, at most
DOC_OFF_TEXT = 6  # images per document that its layout does not place (boilerplate), at most
PARENT_REMOVED = "parent_removed"  # the spine's reason for a sub-item of a removed item (pipelines.kind)


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


@dataclasses.dataclass(frozen=True)
class LayoutExcerpt(Stage):
    """Reads a document layout `column` (JSON list, in reading order, of {"text": str} and
    {"image": position}) and replaces it with its head: `layout_excerpt` (the same JSON, at most `chars`
    characters of text, cut at a word where one is near, and `images` images), `layout_shown` (the image
    positions in the head), `layout_placed` (every image position the layout places), `layout_chars` and
    `layout_images` (the whole layout's text characters and images). An unreadable layout gives nulls."""

    name: ClassVar[str] = "layout_excerpt"
    column: str = "segments"
    chars: int = DOC_CHARS
    images: int = DOC_IMAGES

    def adds(self) -> list[pa.Field]:
        return [pa.field("layout_excerpt", pa.string()), pa.field("layout_shown", pa.list_(pa.int32())),
                pa.field("layout_placed", pa.list_(pa.int32())), pa.field("layout_chars", pa.int64()),
                pa.field("layout_images", pa.int32())]

    def drops(self) -> list[str]:
        return [self.column]

    def excerpt(self, value: str | None) -> tuple:
        try:
            segments = json.loads(value) if value else None
        except (TypeError, ValueError):
            segments = None
        if not isinstance(segments, list):
            return None, None, None, None, None
        head, shown, placed = [], [], []
        chars = total = 0
        full = False
        for seg in segments:
            if not isinstance(seg, dict):
                continue
            if isinstance(seg.get("text"), str):
                text = seg["text"]
                total += len(text)
                if full:
                    continue
                if chars + len(text) > self.chars:
                    text, full = _cut(text, self.chars - chars), True
                if text:
                    head.append({"text": text})
                    chars += len(text)
            elif isinstance(seg.get("image"), int) and not isinstance(seg["image"], bool):
                placed.append(seg["image"])
                if full or len(shown) >= self.images:
                    full = True
                    continue
                head.append({"image": seg["image"]})
                shown.append(seg["image"])
        return json.dumps(head, ensure_ascii=False), shown, placed, total, len(placed)

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        names = [f.name for f in self.adds()]
        out = [self.excerpt(v) for v in batch.column(self.column).to_pylist()]
        return {name: [row[i] for row in out] for i, name in enumerate(names)}


def _cut(text: str, room: int) -> str:
    """The first `room` characters of `text`, ended at a space when one is in the last 60, with an ellipsis."""
    if room <= 0:
        return ""
    head = text[:room]
    space = head.rfind(" ", max(0, room - 60))
    return (head[:space] if space > 0 else head).rstrip() + "…"


def _partitions(n: int) -> int:
    """Partitions for n narrow report rows: about ROWS_PER_PARTITION each (one for a small run, whose
    every job would otherwise run a task per shuffle partition)."""
    import math

    return max(1, math.ceil(n / ROWS_PER_PARTITION))


def _hash_fraction(F):
    return F.xxhash64(F.lit("vlcurate-report"), F.col(SAMPLE_ID)).bitwiseAND((1 << 53) - 1) / float(1 << 53)


def _sorted(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in keys])


def _sectioned(df):
    """`section`: "kept" for a kept row, else its reason."""
    from pyspark.sql import functions as F

    return df.withColumn("section", F.when(F.col(L.STATUS) == L.KEPT, F.lit("kept")).otherwise(F.col(L.REASON)))


def _section_sizes(sectioned) -> dict:
    from pyspark.sql import functions as F

    return {r["section"]: int(r["n"]) for r in sectioned.groupBy("section").agg(F.count("*").alias("n")).collect()}


def _thin(sectioned, kept: int, per_reason: int, sizes: dict | None = None):
    """Each section thinned by a hash of sample_id to about OVERSAMPLE times the rows it shows, so a big
    section (millions kept) is never ranked by one task. `sizes`: rows per section, when already counted."""
    from pyspark.sql import functions as F

    sizes = _section_sizes(sectioned) if sizes is None else sizes
    keep = F.lit(1.0)
    for section, count in sorted(sizes.items(), key=lambda x: str(x[0])):
        want = OVERSAMPLE * (kept if section == "kept" else per_reason)
        if section is not None and count > want:
            keep = F.when(F.col("section") == section, F.lit(want / count)).otherwise(keep)
    return sectioned.filter(_hash_fraction(F) < keep)


def _first(df, kept: int, per_reason: int):
    """The first rows of each section in sample_id order (a hash: a fixed random sample)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ranked = df.withColumn("_rn", F.row_number().over(Window.partitionBy("section").orderBy(SAMPLE_ID)))
    return ranked.filter(F.col("_rn") <= F.when(F.col("section") == "kept", kept).otherwise(per_reason)).drop("_rn")


def collect_documents(kind, res, ledger, rows, scalars: list[str], mdir: str, timer=None) -> dict | None:
    """documents.parquet and document-images.parquet (see the module docstring) for a kind that declares
    a document layout; returns their part of material.json, or None for a kind without one."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from filters.base import apply_stage
    from filters.media import REF

    declared = getattr(kind, "layout", ())  # Kind.layout: the item's layout column and the sub-item's position
    if not declared or declared[0] not in res.rows.columns:
        return None
    layout, position = declared
    led = ledger.filter(F.col("kind") == kind.name)
    items = _sectioned(led.filter(F.col(L.UNIT) == kind.units[0]))
    docs = _first(_thin(items, DOC_KEPT, DOC_PER_REASON), DOC_KEPT, DOC_PER_REASON).select(SAMPLE_ID, "section")
    # kept documents that lost an image, per the image's reason (what became of each <img> is visible there)
    subs = _sectioned(led.filter((F.col(L.UNIT) != kind.units[0]) & F.col(L.REASON).isNotNull()
                                 & (F.col(L.REASON) != PARENT_REMOVED)))
    subs = cached(_thin(subs, 0, DOC_PER_IMAGE_REASON).select(F.col(L.PARENT_ID).alias("_parent"),
                                                                    F.col("section").alias("_why")))
    lost = (items.filter(F.col(L.STATUS) == L.KEPT).join(F.broadcast(subs), F.col(SAMPLE_ID) == F.col("_parent"))
            .select(SAMPLE_ID, F.concat(F.lit("image:"), F.col("_why")).alias("section")).distinct())
    docs = cached(docs.unionByName(_first(lost, 0, DOC_PER_IMAGE_REASON)))  # tens of ids
    subs.unpersist()
    ids = docs.groupBy(SAMPLE_ID).agg(F.sort_array(F.collect_list("section")).alias("sections"))

    # one pass over the rows for the documents and all their images (every join below has a small side:
    # tens of documents, or tens times the images a document names); the media column is a spooled
    # reference (a path), so caching the images' rows holds no image bytes
    info = led.select(SAMPLE_ID, SOURCE_KEY, L.UNIT, L.PARENT_ID, L.STATUS, L.REASON, L.DUPLICATE_OF,
                      F.substring(L.DETAIL, 1, DETAIL_CHARS).alias(L.DETAIL))
    named = cached(info.join(F.broadcast(ids.select(F.col(SAMPLE_ID).alias("_doc"))),
                             F.col(L.PARENT_ID) == F.col("_doc")).drop("_doc", L.UNIT))
    wanted = ids.select(SAMPLE_ID).unionByName(named.select(SAMPLE_ID))
    text = F.substring(res.text, 1, TEXT_CHARS) if res.text else F.lit(None).cast("string")
    media = F.col(res.thumbnail) if res.thumbnail else F.lit(None).cast("binary")
    found = cached(res.rows.join(F.broadcast(wanted), SAMPLE_ID, "left_semi").select(
        SAMPLE_ID, layout, text.alias("text"), F.col(position).cast("int").alias("position"), media.alias("_media")))

    # the documents: the head of each layout, cut in the executors; their fate and report values
    heads = cached(apply_stage(found.join(F.broadcast(ids.select(SAMPLE_ID)), SAMPLE_ID, "left_semi")
                               .select(SAMPLE_ID, layout, "text"), LayoutExcerpt(column=layout), timer))
    documents = (info.join(F.broadcast(ids), SAMPLE_ID).join(heads, SAMPLE_ID, "left")
                 .join(rows.select(SAMPLE_ID, *scalars).join(F.broadcast(ids.select(SAMPLE_ID)), SAMPLE_ID,
                                                             "left_semi"), SAMPLE_ID, "left"))
    docs_t = _sorted(documents.toArrow(), [SAMPLE_ID])
    storage.write_table(storage.join(mdir, "documents.parquet"), docs_t)

    # their images: those in each head, in place, and up to DOC_OFF_TEXT the layout does not place
    places = heads.select(F.col(SAMPLE_ID).alias("_doc"), "layout_shown", "layout_placed")
    images = (named.join(found.select(SAMPLE_ID, "position", "_media"), SAMPLE_ID, "left")
              .join(F.broadcast(places), F.col(L.PARENT_ID) == F.col("_doc")).drop("_doc"))
    shown = F.coalesce(F.array_contains("layout_shown", F.col("position")), F.lit(False))
    placed = F.coalesce(F.array_contains("layout_placed", F.col("position")), F.lit(False))
    images = images.withColumn("in_text", shown).filter(shown | ~placed)
    images = images.withColumn("_rn", F.row_number().over(
        Window.partitionBy(L.PARENT_ID, "in_text").orderBy(F.col("position").asc_nulls_last(), SAMPLE_ID)))
    images = images.filter(F.col("in_text") | (F.col("_rn") <= DOC_OFF_TEXT)).drop(
        "_rn", "layout_shown", "layout_placed")
    if res.thumbnail:
        thumbs = apply_stage(images.select(SAMPLE_ID, F.col("_media").alias(res.thumbnail)),
                             Thumbnail(column=res.thumbnail.removesuffix(REF)), timer)
        images = images.join(thumbs.select(SAMPLE_ID, "thumb"), SAMPLE_ID, "left")
    else:
        images = images.withColumn("thumb", F.lit(None).cast("binary"))
    images = cached(images.drop("_media"))
    values = rows.select(SAMPLE_ID, *scalars).join(F.broadcast(images.select(SAMPLE_ID)), SAMPLE_ID, "left_semi")
    images_t = _sorted(images.join(values, SAMPLE_ID, "left").toArrow(), [L.PARENT_ID, "position", SAMPLE_ID])
    storage.write_table(storage.join(mdir, "document-images.parquet"), images_t)
    for df in (docs, named, found, heads, images):
        df.unpersist()
    return {"documents": docs_t.num_rows, "images": images_t.num_rows, "kept": DOC_KEPT, "per_reason": DOC_PER_REASON,
            "per_image_reason": DOC_PER_IMAGE_REASON, "chars": DOC_CHARS, "images_in_text": DOC_IMAGES,
            "off_text": DOC_OFF_TEXT, "layout": list(declared)}


def _ledger_stats(led) -> tuple[dict, int, dict[int, int], list[str]]:
    """Of a kind's sectioned ledger rows, in one query: rows per section, duplicates dropped, duplicate
    groups per size, and the first DUP_GROUPS keepers in sample_id order."""
    from pyspark.sql import functions as F

    def part(name, key, n, dups):
        return [F.lit(name).alias("part"), key.cast("string").alias("key"), n.cast("long").alias("n"),
                dups.cast("long").alias("dups")]

    none = F.lit(None)
    sections = led.groupBy("section").agg(F.count("*").alias("n"), F.count(L.DUPLICATE_OF).alias("dups")).select(
        *part("section", F.col("section"), F.col("n"), F.col("dups")))
    groups = led.filter(F.col(L.DUPLICATE_OF).isNotNull()).groupBy(L.DUPLICATE_OF).agg(F.count("*").alias("members"))
    sizes = groups.groupBy((F.col("members") + 1).alias("size")).agg(F.count("*").alias("n")).select(
        *part("size", F.col("size"), F.col("n"), none))
    keepers = groups.select(L.DUPLICATE_OF).orderBy(L.DUPLICATE_OF).limit(DUP_GROUPS).select(
        *part("keeper", F.col(L.DUPLICATE_OF), none, none))
    got = sections.unionByName(sizes).unionByName(keepers).collect()
    per_section = {r["key"]: int(r["n"]) for r in got if r["part"] == "section"}
    dropped = sum(int(r["dups"]) for r in got if r["part"] == "section")
    dup_sizes = {int(r["key"]): int(r["n"]) for r in got if r["part"] == "size"}
    return per_section, dropped, dup_sizes, sorted(r["key"] for r in got if r["part"] == "keeper")


def _gallery_picks(led, sizes: dict, keepers: list[str]) -> list[tuple[str, str, str | None]]:
    """(sample_id, section, duplicate_of) of every gallery card: a fixed random sample (sample_id order) per
    section, and the duplicate groups of `keepers` (keeper + up to DUP_MEMBERS members). A big section
    (millions kept) is not sorted by one task: each is first thinned by a hash to ~OVERSAMPLE times what
    it shows, then what is left is ranked."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    picks = _first(_thin(led, GALLERY_KEPT, GALLERY_PER_REASON, sizes), GALLERY_KEPT, GALLERY_PER_REASON)
    picks = picks.select(SAMPLE_ID, "section", L.DUPLICATE_OF)
    if keepers:
        members = led.filter(F.col(L.DUPLICATE_OF).isin(keepers)).withColumn(
            "rn", F.row_number().over(Window.partitionBy(L.DUPLICATE_OF).orderBy(SAMPLE_ID)))
        members = members.filter(F.col("rn") <= DUP_MEMBERS).select(
            SAMPLE_ID, F.concat(F.lit("dup:"), F.col(L.DUPLICATE_OF)).alias("section"), L.DUPLICATE_OF)
        heads = led.filter(F.col(SAMPLE_ID).isin(keepers)).select(
            SAMPLE_ID, F.concat(F.lit("dup:"), F.col(SAMPLE_ID)).alias("section"), L.DUPLICATE_OF)
        picks = picks.unionByName(members).unionByName(heads)
    return [(r[0], r[1], r[2]) for r in picks.collect()]  # a few hundred rows at most


def _tagged(name: str):
    """x -> (field name, x as text), for F.transform (whose lambdas take one argument, or two with the index)."""
    from pyspark.sql import functions as F

    return lambda x: F.struct(F.lit(name).alias("field"), x.cast("string").alias("value"))


def _bars(rows, fields: list[str], lists: list[str]) -> dict[str, dict]:
    """Per field drawn as bars, all fields in one query: `table`, the exact counts per (value, status) of
    its BARS_TOP most frequent values; `distinct`, its number of distinct values; `rows`, the rows where
    it is not null; `with_values`, those with a value (a list field counts its elements, and a row with an
    empty list has none)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    entry = "array<struct<field:string,value:string>>"
    parts = []
    for name in fields:  # every row's (field, value) pairs, exploded once for all fields
        if name in lists:
            part = F.transform(name, _tagged(name))
        else:
            part = F.when(F.col(name).isNotNull(), F.array(F.struct(F.lit(name).alias("field"),
                                                                    F.col(name).cast("string").alias("value"))))
        parts.append(F.coalesce(part, F.array().cast(entry)))
    values = rows.select(L.STATUS, F.explode(F.concat(*parts)).alias("_e")).select("_e.field", "_e.value", L.STATUS)
    per = values.groupBy("field", "value", L.STATUS).agg(F.count("*").alias("n"))
    totals = per.groupBy("field", "value").agg(F.sum("n").alias("total"))
    top = (totals.withColumn("_rn", F.row_number().over(Window.partitionBy("field").orderBy(F.desc("total"), "value")))
           .filter(F.col("_rn") <= BARS_TOP).select("field", "value"))
    none = {"value": F.lit(None).cast("string"), L.STATUS: F.lit(None).cast("string"), "n": F.lit(None).cast("long"),
            "distinct": F.lit(None).cast("long"), "rows": F.lit(None).cast("long"), "with_values": F.lit(None).cast("long")}

    def shaped(df, **have):
        return df.select("field", *[(have[c] if c in have else none[c]).alias(c) for c in none])

    counts = shaped(per.join(top, ["field", "value"], "left_semi"), value=F.col("value"), **{L.STATUS: F.col(L.STATUS)},
                    n=F.col("n"))
    distinct = shaped(totals.groupBy("field").agg(F.count("*").alias("distinct")), distinct=F.col("distinct"))
    reached = rows.agg(F.array(*[F.struct(F.lit(f).alias("field"), F.count(f).alias("rows"),
                                          (F.count(F.when(F.size(f) > 0, 1)) if f in lists else F.count(f)).alias("with"))
                                 for f in fields]).alias("_r")).select(F.explode("_r").alias("_r"))
    reached = shaped(reached.select("_r.*"), rows=F.col("rows"), with_values=F.col("with"))
    table = counts.unionByName(distinct).unionByName(reached).toArrow()
    out = {}
    for name in fields:
        mine = table.filter(pc.equal(table.column("field"), name))
        is_count = pc.is_valid(mine.column("n"))
        out[name] = {"table": _sorted(mine.filter(is_count).select(["value", L.STATUS, "n"]), ["value", L.STATUS]),
                     "distinct": pc.max(mine.column("distinct")).as_py() or 0,
                     "rows": pc.max(mine.column("rows")).as_py() or 0,
                     "with_values": pc.max(mine.column("with_values")).as_py() or 0}
    return out


def collect_material(kind, res, ledger, out: str, timer=None, cfg=None, whole=None) -> dict:
    """Write OUT/reports/material/<kind>/ from a kind's Result and the run's ledger; returns the
    material.json content. Only capped, small tables come back to the driver.

    `whole`: the run's ledger on the driver as Arrow, where the run holds it there (build.materialise).
    A kind of at most ROW_CAP rows in it has every row in rows.parquet anyway: one query of the kind's
    report values (no join in Spark), joined on the driver with its ledger rows, is all the driver
    needs, and the sections, duplicate groups, gallery picks and bar counts are computed from that in
    Arrow (`_on_driver`): two Spark queries in all, the gallery's included. Otherwise (a big run, or no
    ledger on the driver) the same figures come from Spark: a handful of jobs over one persisted table
    of about ROWS_PER_PARTITION rows a partition, from which the rows sample and the bar counts are read
    (`_in_spark`). Both give the same tables (tests/pipelines/test_report.py). The gallery's rows (text,
    media reference, source key and detail of a few hundred picked rows, thumbnails made in the
    executors) are one more query."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType

    name = kind.name
    mdir = material_dir(out, name)
    storage.remove_tree(mdir)  # an earlier run's tables must not mix with this run's
    of_kind = ledger.filter(F.col("kind") == name)
    report = list(res.report_columns)
    info = of_kind.select(SAMPLE_ID, L.UNIT, L.STATUS, L.REASON, L.DUPLICATE_OF, _hash_fraction(F).alias("_h"))
    types = {f.name: f.dataType for f in res.rows.select(*report).schema.fields}
    lists = [c for c in report if isinstance(types[c], ArrayType)]
    scalars = [c for c in report if c not in lists]
    contract = kind.contract(cfg, res.facts)
    drawn = [f.name for f in contract.fields if f.plot == "bars" and f.name in types]

    led = _sectioned(info)
    rows = led.join(res.rows.select(SAMPLE_ID, *report), SAMPLE_ID, "left")
    mine = None if whole is None else whole.filter(pc.equal(whole["kind"], name))
    on_driver = mine is not None and mine.num_rows <= ROW_CAP
    if on_driver:
        stats, picks, dist_t, bars_t = _on_driver(_joined(mine, res, report), scalars, lists, drawn)
    else:  # the ledger alone first (rows per section, duplicate groups, picks), then one persisted table
        stats = _ledger_stats(led)
        parts = _partitions(sum(stats[0].values()))
        picks = _gallery_picks(led.coalesce(parts), stats[0], stats[3])
        rows = rows.coalesce(parts).persist(StorageLevel.DISK_ONLY)
    sizes, dropped_dups, dup_sizes, _ = stats
    n = sum(sizes.values())
    try:
        if not on_driver:
            dist_t, bars_t = _in_spark(rows, n, scalars, lists, drawn)
        storage.write_table(storage.join(mdir, "rows.parquet"), dist_t)
        bars = {}
        for f, got in bars_t.items():
            storage.write_table(storage.join(mdir, f"bars-{f}.parquet"), got["table"])
            bars[f] = {"rows": int(got["rows"]), "distinct": int(got["distinct"]), "list": f in lists,
                       "with_values": int(got["with_values"])}
        gallery_t = _gallery(_chosen(of_kind, res, picks, report, timer).toArrow(), picks, scalars)
        storage.write_table(storage.join(mdir, "gallery.parquet"), gallery_t)
        documents = collect_documents(kind, res, ledger, rows, scalars, mdir, timer)
    finally:
        if not on_driver:
            rows.unpersist()

    sampled = n > ROW_CAP
    meta = {
        "kind": name, "rows": n, "rows_in_material": dist_t.num_rows, "sampled": sampled, "row_cap": ROW_CAP,
        "gallery": {"kept": GALLERY_KEPT, "per_reason": GALLERY_PER_REASON, "dup_groups": DUP_GROUPS,
                    "dup_members": DUP_MEMBERS, "thumb_px": Thumbnail.size, "text_chars": TEXT_CHARS},
        "duplicates": {"groups": sum(dup_sizes.values()), "dropped": dropped_dups,
                       "sizes": {str(k): dup_sizes[k] for k in sorted(dup_sizes)}},
        "bars": bars,
        "documents": documents,
        "columns": report,
        "unit": kind.samples_unit,  # the unit the contract's plotted fields describe
        "plots": [{"name": f.name, "plot": f.plot, "description": f.description,
                   "marks": [[float(v), str(label)] for v, label in f.marks]}
                  for f in contract.fields if f.plot and f.name in report],
    }
    storage.write_bytes(storage.join(mdir, "material.json"), json.dumps(meta, indent=1, sort_keys=True).encode())
    return meta


def _in_spark(rows, n: int, scalars: list[str], lists: list[str], drawn: list[str]):
    """rows.parquet's table (all rows, or a hash sample above ROW_CAP) and the bar tables, from the
    persisted `rows` in Spark."""
    from pyspark.sql import functions as F

    dist = rows.filter(F.col("_h") < ROW_CAP / n) if n > ROW_CAP else rows
    dist = dist.select(SAMPLE_ID, L.UNIT, L.STATUS, L.REASON, *scalars,
                       *[F.when(F.col(c).isNotNull(), F.size(c)).alias(f"n_{c}") for c in lists])
    return _sorted(dist.toArrow(), [SAMPLE_ID]), (_bars(rows, drawn, lists) if drawn else {})


def _joined(mine: pa.Table, res, report: list[str]) -> pa.Table:
    """The Spark path's `rows` (a kind's ledger rows with their section, hash fraction and report values)
    made on the driver: `mine`, the kind's rows of the run's ledger there, and one query of the kind's
    report values and hash fraction, put in the ledger's order by id. (The join in Spark shuffled both
    sides: the ledger, a local checkpoint, has no size the planner can see.)"""
    from pyspark.sql import functions as F

    got = res.rows.select(SAMPLE_ID, _hash_fraction(F).alias("_h"), *report).toArrow()
    got = got.take(pc.index_in(mine.column(SAMPLE_ID), value_set=got.column(SAMPLE_ID)))
    t = mine.select([SAMPLE_ID, L.UNIT, L.STATUS, L.REASON, L.DUPLICATE_OF])
    section = pc.if_else(pc.equal(t.column(L.STATUS), L.KEPT), pa.scalar("kept"), t.column(L.REASON))
    t = t.append_column("_h", got.column("_h")).append_column("section", section)
    for c in report:
        t = t.append_column(c, got.column(c))
    return t


def _on_driver(t: pa.Table, scalars: list[str], lists: list[str], drawn: list[str]):
    """(ledger stats as `_ledger_stats` gives them, gallery picks as `_gallery_picks`, rows.parquet's
    table, bar tables as `_bars`) from the whole of `rows` fetched as one Arrow table (at most ROW_CAP
    rows): the same sections, thinning by the same hash, ranking and caps."""
    sections = t.column("section").to_pylist()
    dups = t.column(L.DUPLICATE_OF).to_pylist()
    ids = t.column(SAMPLE_ID).to_pylist()
    per_section = Counter(sections)
    members = Counter(d for d in dups if d is not None)
    keepers = sorted(members)[:DUP_GROUPS]
    stats = (dict(per_section), len(dups) - dups.count(None), dict(Counter(m + 1 for m in members.values())), keepers)

    # the gallery's picks: each section thinned by the hash as _thin does, then its first rows by sample_id
    keep = {s: OVERSAMPLE * (GALLERY_KEPT if s == "kept" else GALLERY_PER_REASON) for s in per_section}
    keep = {s: (w / per_section[s] if s is not None and per_section[s] > w else 1.0) for s, w in keep.items()}
    by_section: dict = {}
    for sid, s, h, d in zip(ids, sections, t.column("_h").to_pylist(), dups):
        if h < keep[s]:
            by_section.setdefault(s, []).append((sid, d))
    picks = []
    for s, got in by_section.items():
        first = sorted(got, key=lambda x: x[0])[:GALLERY_KEPT if s == "kept" else GALLERY_PER_REASON]
        picks += [(sid, s, d) for sid, d in first]
    chosen = set(keepers)
    group: dict = {}
    for sid, d in sorted(zip(ids, dups)):
        if d in chosen and len(group.setdefault(d, [])) < DUP_MEMBERS:
            group[d].append(sid)
            picks.append((sid, f"dup:{d}", d))
        if sid in chosen:
            picks.append((sid, f"dup:{sid}", d))

    dist_t = t.select([SAMPLE_ID, L.UNIT, L.STATUS, L.REASON, *scalars])
    for c in lists:
        dist_t = dist_t.append_column(f"n_{c}", pc.list_value_length(t.column(c)).cast(pa.int32()))
    dist_t = _sorted(dist_t, [SAMPLE_ID])
    return stats, picks, dist_t, {f: _arrow_bars(t, f, f in lists) for f in drawn}


def _arrow_bars(t: pa.Table, name: str, is_list: bool) -> dict:
    """One field's `_bars` entry from the fetched rows: counts per (value, status) of its BARS_TOP most
    frequent values (by count, then value), its distinct values, rows with it and rows with a value."""
    col = t.column(name)
    if is_list:
        flat = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        values = pc.list_flatten(flat)
        status = pc.take(t.column(L.STATUS), pc.list_parent_indices(flat))
        with_values = pc.sum(pc.greater(pc.list_value_length(col), 0)).as_py() or 0
    else:
        valid = pc.is_valid(col)
        values, status = pc.filter(col, valid), pc.filter(t.column(L.STATUS), valid)
        with_values = len(col) - col.null_count
    pairs = pa.table({"value": pc.cast(values, pa.string()), L.STATUS: status})
    per = pairs.group_by(["value", L.STATUS]).aggregate([([], "count_all")]).rename_columns(["value", L.STATUS, "n"])
    totals = per.group_by("value").aggregate([("n", "sum")])
    ranked = totals.take(pc.sort_indices(totals, [("n_sum", "descending", "at_end"),
                                                  ("value", "ascending", "at_start")]))  # Spark: nulls first
    top = pc.drop_null(ranked.column("value").slice(0, BARS_TOP))
    counts = per.filter(pc.is_in(per.column("value"), value_set=top))
    return {"table": _sorted(counts, ["value", L.STATUS]), "distinct": totals.num_rows,
            "rows": len(col) - col.null_count, "with_values": with_values}


def _chosen(of_kind, res, picks: list[tuple[str, str, str | None]], report: list[str], timer):
    """The gallery's rows: every pick and the keeper of each picked duplicate, with their ledger facts,
    report values, text and thumbnail (made in the executors: never full images on the driver). Both
    sides are filtered by sample_id before the join: a few hundred rows."""
    from pyspark.sql import functions as F

    from filters.base import apply_stage
    from filters.media import REF

    wanted = sorted({sid for sid, _, _ in picks} | {d for _, _, d in picks if d is not None})
    pick = F.col(SAMPLE_ID).isin(wanted)
    text = F.substring(res.text, 1, TEXT_CHARS) if res.text else F.lit(None).cast("string")
    media = F.col(res.thumbnail) if res.thumbnail else F.lit(None).cast("binary")
    info = of_kind.filter(pick).select(SAMPLE_ID, L.UNIT, L.STATUS, L.REASON, L.DUPLICATE_OF, SOURCE_KEY,
                                       F.substring(L.DETAIL, 1, DETAIL_CHARS).alias(L.DETAIL))
    values = res.rows.filter(pick).select(SAMPLE_ID, *report, text.alias("text"), media.alias("_media"))
    chosen = info.join(F.broadcast(values), SAMPLE_ID, "left")
    if not res.thumbnail:
        return chosen.drop("_media").withColumn("thumb", F.lit(None).cast("binary"))
    return apply_stage(chosen.withColumnRenamed("_media", res.thumbnail),
                       Thumbnail(column=res.thumbnail.removesuffix(REF)), timer).drop(res.thumbnail)


def _gallery(chosen: pa.Table, picks: list[tuple[str, str, str | None]], scalars: list[str]) -> pa.Table:
    """gallery.parquet: a row per pick (sample_id, section), the picked row's columns, and the report
    values of the row it duplicates (`keeper_<name>`). Joined here: both sides are a few hundred rows."""
    found = {r[SAMPLE_ID]: r for r in chosen.to_pylist()}
    cols = [f for f in chosen.schema if f.name != SAMPLE_ID]
    keeper = [pa.field(f"keeper_{c}", chosen.schema.field(c).type) for c in scalars]
    schema = pa.schema([chosen.schema.field(SAMPLE_ID), pa.field("section", pa.string()), *cols, *keeper])
    out = []
    for sid, section, dup in picks:
        row = found.get(sid, {})
        k = found.get(dup, {}) if dup is not None else {}
        out.append({SAMPLE_ID: sid, "section": section, **{f.name: row.get(f.name) for f in cols},
                    **{f"keeper_{c}": k.get(c) for c in scalars}})
    return _sorted(pa.Table.from_pylist(out, schema=schema), ["section", SAMPLE_ID])
