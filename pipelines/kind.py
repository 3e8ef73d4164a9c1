"""A corpus kind is a plug-in; this module is the spine every kind runs on.

A kind declares (`Kind`): its recipe section, its units (the first is the item written as a sample;
the others are sub-items that point at a parent), its reasons, its shard contract and a `plan`
function. The plan (`Plan`), made on the driver after the kind's own checks (models, weights), gives:

- `features()`: the input read and taken through the kind's row-wise stages in one fused pass
  (`filters.base.apply_stages`), media bytes spooled to files (`filters.media.Spool`): a narrow table
  with one row per item and sub-item (`unit`, `parent_id`);
- `steps`: in order, each an optional row-wise stage on the rows still in play (its columns joined
  back) and an optional decision: a function returning a narrow (sample_id, reason, duplicate_of)
  table, or a reason Column of the row alone (rules), which costs no Spark job of its own;
- `to_sample`: a row of the final table -> the webdataset sample its contract describes.

`run_kind` does the rest the same way for every kind: checkpoints, the quarantine of rows that carry
an `error`, sub-items whose parent was removed, shard assignment and writing (each sample checked
against the contract; in a thread of its own, beside the ledger's jobs), the ledger (one row per item
and sub-item, statuses from the declared reasons), and the narrow per-item rows the report draws from.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from filters.base import Stage, StageTimer, apply_stage
from pipelines import codegen, progress
from pipelines.beside import beside
from pipelines.checkpoint import checkpoint, checkpoint_path, fingerprint, truncated
from pipelines.io import shards
from schemas import ledger as L
from schemas.common import ERROR, ERROR_DETAIL, KIND, READ_UNIT, SAMPLE_ID, SOURCE, SOURCE_KEY
from schemas.contract import Contract

log = logging.getLogger(__name__)
DECISIONS = "sample_id string, reason string, duplicate_of string"
READ_COUNTS = "_read_counts.json"  # beside a features checkpoint's parts (Spark skips names starting with _)


class AccountingError(RuntimeError):
    """The ledger does not account for every item exactly once: a bug, never a data problem."""


@dataclasses.dataclass(frozen=True)
class Context:
    """What a kind's plan gets: the run's session, recipe and places."""

    spark: Any
    recipe: Any  # pipelines.recipe.Recipe
    cfg: Any  # the kind's own recipe section
    uris: list[str]
    out: str
    work_dir: str
    timer: StageTimer


@dataclasses.dataclass(frozen=True)
class Step:
    """One decision point, on the rows still in play. `stage` (row-wise) runs first on the columns
    `reads`, and its `adds()` columns are joined back (`store`: "checkpoint" for costly model calls,
    kept across restarts; "cache" for cheap ones). `decide(alive)` then returns the rows removed here:
    sample_id, reason (declared by the kind), and duplicate_of where the reason is a copy of another
    item; its table is materialised (one Spark job). A decision on each row alone (rules on its own
    columns) is `reason(F)` instead: a Column, the row's reason or null. It runs no job of its own:
    the rows in play are filtered by it inside the next query that reads them. The ledger evaluates
    the reasons of the steps that lead the plan (no stage or `decide` before them) in its own scan of
    the features, as it does the quarantine: no second scan, nothing joined on sample_id; a later
    one's drops are joined like a `decide`'s. `depends`: the recipe knobs the decision reads, for the
    checkpoint keys of later stages."""

    name: str
    decide: Callable[[Any], Any] | None = None
    reason: Callable[[Any], Any] | None = None  # F -> Column, the row's reason or null
    stage: Stage | None = None
    reads: tuple[str, ...] = ()
    store: str = "cache"
    depends: Any = None


@dataclasses.dataclass
class Plan:
    features: Callable[[], Any]  # () -> DataFrame, one row per item and sub-item
    key: str  # fingerprint of what the features depend on
    steps: list[Step]
    to_sample: Callable[[dict], dict]  # final row -> {"__key__", ext: bytes}
    sample_size: Callable[[Any], Any]  # F -> Column: about a sample's bytes (for shards.max_bytes)
    error_reason: Callable[[Any], Any] | None = None  # F -> Column: the quarantine reason of a row (default: error)
    samples: Callable[[Any], Any] | None = None  # alive -> the rows written as samples (default: the first unit)
    report: Mapping[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)  # column -> F -> Column
    thumbnail: str = ""  # media column (bytes or its _ref) the report shows
    text: str = ""  # column the report shows on a card
    facts: dict = dataclasses.field(default_factory=dict)  # summary.json and the report show these
    assertions: list[dict] = dataclasses.field(default_factory=list)  # run-level checks -> gates (see gates)
    read_counts: Callable[[], dict[str, int]] | None = None  # after features(): items the reader read per unit
    shard_set: Callable[[Any], Any] | None = None  # F -> Column: a sample's shard set (Kind.shard_sets)


@dataclasses.dataclass
class Result:
    """What a kind's run hands to the spine's ledger, gates and report."""

    ledger: Any  # DataFrame in schemas.ledger.SCHEMA
    written: Callable[[], list[dict]]  # waits for the kind's shard writer: per-shard stats (see `shards`)
    rows: Any  # DataFrame: sample_id + the plan's report columns + thumbnail + text, every ledger row
    facts: dict
    assertions: list[dict]
    thumbnail: str = ""
    text: str = ""
    report_columns: tuple[str, ...] = ()
    stages_run: tuple[str, ...] = ()
    read: dict | None = None  # read units and items counted by the reader, reconciled with the ledger
    read_counts: dict[str, int] | None = None  # items per read unit, as the reader counted them (`reconcile`)

    @property
    def shards(self) -> list[dict]:
        """Per-shard stats (shard, nsamples, bytes) once the kind's shards are written (they are written
        beside the ledger's jobs: this waits for the writer, and raises its error)."""
        return self.written()


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    config: type  # the recipe section (a frozen dataclass of the stages' own configs)
    units: tuple[str, ...]  # units[0]: the input item; the rest: sub-items
    reasons: Mapping[str, L.Reason]
    contract: Callable[[Any, dict], Contract]  # (recipe section, run facts) -> the shard contract, bounds filled in
    plan: Callable[[Context], Plan]
    layouts: tuple[str, ...] = ()  # the input layouts it reads (for --help and the README)
    explain: Callable[[dict, dict, dict], str] | None = None  # (report row, recipe section, facts) -> words
    # the unit written as a sample: units[0] (default), or a sub-item unit (a video's clips); an item
    # whose sub-items are the samples names the first shard holding one of them in the ledger
    sample_unit: str = ""
    # shard sets beside the kind's own (folders under shards/, e.g. interleaved_long); the plan's
    # `shard_set` names each sample's (default: all in the kind's own set, named after it)
    shard_sets: tuple[str, ...] = ()
    # the report's document gallery: (item column: JSON list, in reading order, of {"text": str} and
    # {"image": position}; sub-item column: that position); () for kinds whose items are not documents
    layout: tuple[str, str] = ()

    @property
    def all_shard_sets(self) -> tuple[str, ...]:
        return (self.name, *self.shard_sets)

    @property
    def samples_unit(self) -> str:
        return self.sample_unit or self.units[0]

    def quarantine_codes(self) -> list[str]:
        return sorted(c for c, r in self.reasons.items() if r.status == L.QUARANTINED)

    def fatal_codes(self) -> list[str]:
        return sorted(c for c, r in self.reasons.items() if r.fatal)


def decisions(df, F):
    """A decision table normalised to (sample_id, reason, duplicate_of)."""
    dup = F.col("duplicate_of") if "duplicate_of" in df.columns else F.lit(None).cast("string")
    return df.select(SAMPLE_ID, F.col("reason").cast("string"), dup.cast("string").alias("duplicate_of"))


def _run_step(kind: Kind, ctx: Context, step: Step, keys: dict, alive, added: list, found: list,
              inline: list | None = None):
    """One step on the rows still in play: its stage's columns joined on, its drops taken out. Returns
    the rows still in play; appends the stage's narrow table to `added` and its decisions to `found`,
    or its reason Column to `inline` where given (the ledger evaluates those on the features' rows)."""
    from pyspark.sql import functions as F

    if step.stage is not None:
        cols = [f.name for f in step.stage.adds()]
        out = apply_stage(alive.select(SAMPLE_ID, *step.reads), step.stage, ctx.timer).select(SAMPLE_ID, *cols)
        if step.store == "checkpoint":
            out = checkpoint(out, ctx.work_dir, f"{kind.name}-{step.name}", keys[step.name], ctx.timer)
        else:
            out = truncated(out)
        alive = alive.join(out, SAMPLE_ID, "left")
        added.append(out)
    if step.reason is not None and inline is not None:
        reason = step.reason(F)
        inline.append(reason)
        alive = alive.filter(reason.isNull())
    elif step.reason is not None:
        tagged = alive.withColumn("_reason", step.reason(F))
        found.append(decisions(tagged.filter(F.col("_reason").isNotNull()).withColumnRenamed("_reason", "reason"), F))
        alive = tagged.filter(F.col("_reason").isNull()).drop("_reason")
    if step.decide is not None:
        drops = truncated(decisions(step.decide(alive), F))
        alive = alive.join(drops.select(SAMPLE_ID), SAMPLE_ID, "left_anti")
        found.append(drops)
    return alive


def run_kind(kind: Kind, ctx: Context, plan: Plan | None = None) -> Result:
    """Run a kind's plan (made here when not given; pipelines.build makes every kind's plan first, so
    all driver-side checks pass before any Spark work)."""
    from pyspark.sql import functions as F

    codegen.features_pass(ctx.spark)  # its task table and features pass (an earlier kind may have changed it)
    plan = plan or kind.plan(ctx)
    feats = plan.features()
    for col, default in ((L.UNIT, F.lit(kind.units[0])), (L.PARENT_ID, F.lit(None).cast("string"))):
        if col not in feats.columns:
            feats = feats.withColumn(col, default)
    if plan.read_counts is not None:
        _forget_features_without_counts(kind, ctx, plan)
    with progress.phase(ctx.spark, f"{kind.name} features"):
        feats = checkpoint(feats, ctx.work_dir, f"{kind.name}-features", plan.key, ctx.timer)
    counts = _read_counts(kind, ctx, plan)
    read = None if counts is None else {"units": len(counts), "items": sum(counts.values())}
    codegen.choose(ctx.spark, None if read is None else read["items"])

    # --- decisions, in order, on the rows still in play -------------------------------------------
    # a row's own reasons, in order (the quarantine, then the leading `reason` steps): the ledger
    # evaluates them on the features' rows; every later decision is a narrow table joined on sample_id
    inline = [plan.error_reason(F) if plan.error_reason else F.col(ERROR)]
    found = []
    alive = feats.filter(inline[0].isNull())
    added = []  # narrow tables the stages produced (sample_id + columns), for the report
    keys = stage_keys(plan)
    leading = True
    for step in plan.steps:
        runs_jobs = step.stage is not None or step.decide is not None  # a `reason` alone runs none
        leading = leading and not runs_jobs
        with progress.phase(ctx.spark, f"{kind.name} {step.name}") if runs_jobs else contextlib.nullcontext():
            alive = _run_step(kind, ctx, step, keys, alive, added, found, inline if leading else None)
    # a sub-item goes with its parent
    if len(kind.units) > 1:
        parents = alive.select(F.col(SAMPLE_ID).alias("_parent"))
        orphans = (alive.filter(F.col(L.PARENT_ID).isNotNull())
                   .join(parents, F.col(L.PARENT_ID) == F.col("_parent"), "left_anti")
                   .select(SAMPLE_ID, F.lit("parent_removed").alias("reason")))
        orphans = truncated(decisions(orphans, F))
        alive = alive.join(orphans.select(SAMPLE_ID), SAMPLE_ID, "left_anti")
        found.append(orphans)

    # --- shards -----------------------------------------------------------------------------------
    samples = plan.samples(alive) if plan.samples else alive.filter(F.col(L.UNIT) == kind.samples_unit)
    index, written = _write_sets(kind, ctx, plan, samples)

    # --- ledger: every item and sub-item exactly once ----------------------------------------------
    parent_shard = index.select(F.col(SAMPLE_ID).alias("_p"), F.col("shard").alias("_parent_shard"))
    quarantine = kind.quarantine_codes()
    read_unit = F.col(READ_UNIT) if READ_UNIT in feats.columns else F.lit(None).cast("string")
    rows = feats.select(SAMPLE_ID, KIND, L.UNIT, L.PARENT_ID, SOURCE, SOURCE_KEY, ERROR, ERROR_DETAIL,
                        read_unit.alias(READ_UNIT), F.coalesce(*inline).cast("string").alias("_own_reason"))
    if found:
        decided = found[0]
        for d in found[1:]:
            decided = decided.unionByName(d)
        rows = rows.join(decided, SAMPLE_ID, "left")
    else:
        rows = rows.select("*", *(F.lit(None).cast("string").alias(c) for c in ("reason", "duplicate_of")))
    # a row decided by a later step passed its own reasons: at most one of the two is set
    rows = (rows.withColumn("reason", F.coalesce(F.col("_own_reason"), F.col("reason")))
            .join(index, SAMPLE_ID, "left")
            .join(parent_shard, F.col(L.PARENT_ID) == F.col("_p"), "left"))
    if kind.samples_unit != kind.units[0]:  # the samples are sub-items: an item names the first shard holding one
        child_shard = (index.join(feats.select(SAMPLE_ID, F.col(L.PARENT_ID).alias("_c")), SAMPLE_ID)
                       .groupBy("_c").agg(F.min("shard").alias("_child_shard")))
        rows = rows.join(child_shard, F.col(SAMPLE_ID) == F.col("_c"), "left")
    else:
        rows = rows.withColumn("_child_shard", F.lit(None).cast("string"))
    ledger = (
        rows.select(
            SAMPLE_ID, KIND, SOURCE, SOURCE_KEY, L.UNIT, L.PARENT_ID,
            F.when(F.col("reason").isin(quarantine), L.QUARANTINED)
            .when(F.col("reason").isNotNull(), L.DROPPED).otherwise(L.KEPT).alias(L.STATUS),
            F.col("reason").alias(L.REASON),
            F.when(F.col("reason") == F.col(ERROR), F.col(ERROR_DETAIL)).alias(L.DETAIL),
            F.col("duplicate_of").alias(L.DUPLICATE_OF),
            F.when(F.col("reason").isNull(),
                   F.coalesce(F.col("shard"), F.col("_parent_shard"), F.col("_child_shard"))).alias(L.SHARD),
            READ_UNIT,  # not written (schemas.ledger.SCHEMA): the accounting reconciles read units with it
        )
    )

    # --- narrow rows for the report ----------------------------------------------------------------
    everything = feats
    for out in added:
        everything = everything.join(out, SAMPLE_ID, "left")
    report_cols = [fn(F).alias(name) for name, fn in plan.report.items()]
    thumbnail = plan.thumbnail and _media(plan.thumbnail, everything.columns)
    shown = [c for c in dict.fromkeys((thumbnail, plan.text, *kind.layout)) if c]
    rows = everything.select(SAMPLE_ID, *report_cols, *shown)
    return Result(ledger=ledger, written=written, rows=rows, facts=plan.facts, assertions=plan.assertions, read=read,
                  read_counts=counts, thumbnail=thumbnail, text=plan.text,
                  report_columns=tuple(plan.report), stages_run=tuple(s.name for s in plan.steps))


def _write_sets(kind: Kind, ctx: Context, plan: Plan, samples):
    """Assign the samples' shards, then write them in a thread of their own (`beside`), each shard set on
    its own (`OUT/shards/<set>/<set>-NNNNNN.tar`): the ledger needs only the assignment, so its jobs run
    while the tars are written. Returns (index: sample_id -> shard, a callable that waits for the
    writer and returns the per-shard stats of every set)."""
    from pyspark.sql import functions as F

    contract = kind.contract(ctx.cfg, plan.facts)
    max_samples, max_bytes = ctx.recipe.shards.max_samples, ctx.recipe.shards.max_bytes
    if plan.shard_set is None:
        parts = [(kind.name, samples)]
    else:  # which set each sample goes to: a narrow table computed once, then one pass per set
        where = truncated(samples.select(SAMPLE_ID, plan.shard_set(F).alias("_set")))
        unknown = where.filter(~F.col("_set").isin(*kind.all_shard_sets)).select("_set").limit(1).collect()
        if unknown:
            raise ValueError(f"{kind.name}: shard set {unknown[0][0]!r} is not declared in Kind.shard_sets")
        parts = [(name, samples.join(where.filter(F.col("_set") == name).select(SAMPLE_ID), SAMPLE_ID))
                 for name in kind.all_shard_sets]
    with progress.phase(ctx.spark, f"{kind.name} shard index", items=False):
        assigned = [(name, part, shards.assign_shards(part, name, max_samples, max_bytes, plan.sample_size(F)))
                    for name, part in parts]

    def write() -> list[dict]:
        with progress.phase(ctx.spark, f"{kind.name} shards", items=False):
            return [s for name, part, a in assigned
                    for s in shards.write_shards(part, a, shards.staging_dir(ctx.out, name), plan.to_sample, contract)]

    index = assigned[0][2].index
    for *_, more in assigned[1:]:
        index = index.unionByName(more.index)
    return index, beside(write, f"vlcurate-{kind.name}-shards")


def stage_keys(plan: Plan) -> dict[str, str]:
    """The checkpoint key of every checkpointed stage: exactly what its output depends on: the
    features, what every decision before it reads (so it never reuses results computed for another
    set of rows), and the stage's own `cache_key()` (not knobs applied later, such as a threshold)."""
    keys, depends = {}, []
    for step in plan.steps:
        if step.stage is not None and step.store == "checkpoint":
            keys[step.name] = fingerprint(plan.key, depends, step.stage.cache_key())
        if step.decide is not None or step.reason is not None:
            depends.append(step.depends)
    return keys


def _features_dir(kind: Kind, ctx: Context, plan: Plan) -> str:
    return checkpoint_path(ctx.work_dir, f"{kind.name}-features", plan.key)


def _forget_features_without_counts(kind: Kind, ctx: Context, plan: Plan) -> None:
    """A finished features checkpoint whose read counts were never saved (the run was killed in
    between) cannot be reconciled: mark it unfinished, so it is recomputed rather than trusted."""
    import os

    folder = _features_dir(kind, ctx, plan)
    if os.path.exists(os.path.join(folder, "_SUCCESS")) and not os.path.exists(os.path.join(folder, READ_COUNTS)):
        log.warning("%s has no read counts (a run was killed before saving them): recomputing it", folder)
        os.remove(os.path.join(folder, "_SUCCESS"))


def _read_counts(kind: Kind, ctx: Context, plan: Plan) -> dict[str, int] | None:
    """Items per read unit as the reader counted them; kept beside the features checkpoint, so a
    rerun that reuses the checkpoint (and reads nothing) still reconciles."""
    import json
    import os

    if plan.read_counts is None:
        return None
    path = os.path.join(_features_dir(kind, ctx, plan), READ_COUNTS)
    if ctx.timer.reused.get(f"{kind.name}-features") and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    counts = plan.read_counts()
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(counts, f, sort_keys=True)
    os.replace(path + ".tmp", path)  # whole or absent
    return counts


def reconcile(kind: str, found: dict[str, int], counts: dict[str, int]) -> None:
    """Every read unit's items, as the reader counted them, are in the ledger exactly once (`found`: the
    ledger's items per read unit, counted in Spark): an item lost on the way (a stage, a join) fails the
    run naming its unit, before anything is published."""
    bad = sorted((u, n, found.get(u, 0)) for u, n in counts.items() if found.get(u, 0) != n)
    bad += sorted((u, 0, n) for u, n in found.items() if u not in counts)
    if bad:
        shown = "; ".join(f"read unit {u!r}: the reader read {n} items, the ledger holds {m}" for u, n, m in bad[:5])
        raise AccountingError(f"{kind}: {len(bad)} read unit(s) do not reconcile with the ledger: {shown}")


def _media(column: str, columns: list[str]) -> str:
    from filters.media import ref_column

    return column if column in columns else ref_column(column)
