"""One run: every kind's pipeline, then the ledger, the summary, the all-or-nothing publish and the clean-up of
what the run left in its work dir."""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from importlib import metadata

from filters.base import StageTimer, arrow_only
from pipelines import checkpoint, codegen, gates, kinds, progress
from pipelines.beside import beside
from pipelines.io import runs, storage
from pipelines.io import shards as shard_io
from pipelines.kind import AccountingError, Context, reconcile, run_kind
from pipelines.recipe import Recipe
from schemas import ledger as L
from schemas.common import READ_UNIT, SAMPLE_ID

log = logging.getLogger(__name__)
VERSIONED = ["pyspark", "pyarrow", "pillow", "imagehash", "open-clip-torch", "torch", "fasttext-numpy2",
             "webdataset", "pyahocorasick", "numpy", "boto3"]
_preloading: threading.Thread | None = None


def preload() -> None:
    """Start importing what the end of a run needs in a background thread: great_expectations for the
    gates (~2.6 CPU s: pandas, its registry of expectations; gates.import_gx) and matplotlib for the report's charts
    (~0.3 s, then ~0.5 s for its first chart, drawn and thrown away: plots.warm). The run's curation
    hides it instead of the end of the run waiting for it; importing either later simply waits for the
    import in progress, and the report waits for the whole (`preloaded`). Once per process."""
    global _preloading
    if _preloading is not None:
        return

    def load() -> None:
        try:
            gates.import_gx()
            from pipelines.report import plots

            plots.pyplot()
            plots.warm()
        except Exception:  # the gates and the report import them again and report the error there
            log.debug("preload failed", exc_info=True)

    _preloading = threading.Thread(target=load, name="vlcurate-preload", daemon=True)
    _preloading.start()


def preloaded() -> None:
    """Wait for `preload` (matplotlib may not draw in two threads at once)."""
    if _preloading is not None:
        _preloading.join()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_ledger(ledger, whole, uri: str) -> None:
    """OUT/ledger in sample_id order. A ledger held on the driver (`materialise`: at most
    gates.LEDGER_CAP rows) is sorted and written there, one file; a larger one by a global sort in Spark,
    into as many files as its shuffle makes. The same columns either way (schemas.ledger.SCHEMA's
    types; tests/pipelines/test_ledger_write.py)."""
    if whole is None:
        write_parquet(ledger.select(L.SCHEMA.names).orderBy(SAMPLE_ID), uri)
        return
    import pyarrow as pa

    # nullable as Spark writes them: a broken row is the gates' to report, not the writer's to refuse
    schema = pa.schema([f.with_nullable(True) for f in L.SCHEMA])
    table = whole.select(L.SCHEMA.names).cast(schema).sort_by(SAMPLE_ID)
    storage.remove_tree(uri)
    storage.write_table(storage.join(uri, "part-00000.parquet"), table)
    storage.write_bytes(storage.join(uri, "_SUCCESS"), b"")


def write_parquet(df, uri: str) -> None:
    """Spark's writer for paths it can reach; for s3://, each task writes its part with boto3."""
    if not storage.is_s3(uri):
        df.write.mode("overwrite").parquet(uri)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark import TaskContext
    from pyspark.sql.pandas.types import to_arrow_schema

    schema = to_arrow_schema(df.schema)
    storage.remove_tree(uri)

    def write(batches):
        import tempfile

        arrow_only()
        part = TaskContext.get().partitionId()
        fd, tmp = tempfile.mkstemp(suffix=".parquet")
        os.close(fd)
        n = 0
        with pq.ParquetWriter(tmp, schema) as w:
            for b in batches:
                w.write_batch(b)
                n += b.num_rows
        storage.publish_file(tmp, storage.join(uri, f"part-{part:05d}.parquet"))
        yield pa.RecordBatch.from_pylist([{"n": n}], schema=pa.schema([("n", pa.int64())]))

    df.mapInArrow(write, "n long").collect()
    storage.write_bytes(storage.join(uri, "_SUCCESS"), b"")


def _counts() -> dict:
    return {"input": 0, "kept": 0, "dropped": {}, "quarantined": {}}


LEDGER_FETCHED = [*L.SCHEMA.names, READ_UNIT]  # what the driver holds of a small ledger (`materialise`)


def materialise(ledger, results: dict):
    """(the run's ledger computed once, as a local checkpoint that later queries read; its LEDGER_FETCHED
    columns on the driver as Arrow when it holds at most gates.LEDGER_CAP rows, else None). A small
    ledger is fetched by the very job that computes it, and its counts, accounting, the gates' ledger
    suites and OUT/ledger are then made on the driver, with no Spark query of their own (at 2,000 URLs
    the counts' job took 0.8-1.1 s of the run's critical path, its 4 stages planned and scheduled after
    the checkpoint's; at 20,000 the ledger's sorted write took 1.5 s of a busy run's end). Its rows are
    known before it is computed where every kind has one unit (a row per item its reader counted);
    otherwise the checkpoint is counted first."""
    reads = [r.read["items"] if r.read else None for r in results.values()]
    single = all(len(kinds.get(kind).units) == 1 for kind in results)
    n = sum(reads) if single and None not in reads else None
    if n is not None and n <= gates.LEDGER_CAP:
        ledger = ledger.localCheckpoint(eager=False)  # its blocks are kept by the job that fetches them
    else:
        ledger = ledger.localCheckpoint()
        n = ledger.count() if n is None else n
    return ledger, ledger.select(LEDGER_FETCHED).toArrow() if n <= gates.LEDGER_CAP else None


def ledger_counts(ledger, whole=None) -> tuple[list, dict]:
    """The ledger's rows counted by (kind, unit, status, reason, read unit of the items), and each
    kind's rows, distinct sample ids, kept rows and rows naming a shard; the run's rows and distinct ids
    are the sums over its kinds (`{"n", "ids", "kinds": {kind: {"n", "ids", "kept", "with_shard"}}}`):
    the counts feed the accounting, the reconciliation of read units and summary.json, the totals the
    gates' totals table. A sample id hashes its kind (`make_sample_id`), so ids of two kinds never
    coincide and one distinct count per kind is all the run needs. `whole`: the ledger on the driver
    (`materialise`), counted there with Arrow; else one Spark job counts it (at a billion rows, one
    shuffle of the ids rather than two). Both give the same counts (tests/pipelines/test_ledger_write.py)."""
    rows, kinds_n = (_counts_arrow if whole is not None else _counts_spark)(whole if whole is not None else ledger)
    return rows, {"n": sum(k["n"] for k in kinds_n.values()), "ids": sum(k["ids"] for k in kinds_n.values()),
                  "kinds": kinds_n}


COUNTED = ["kind", L.UNIT, L.STATUS, L.REASON, READ_UNIT]  # the keys of ledger_counts' rows, then "n"
PER_KIND = ("n", "ids", "kept", "with_shard")


def _counts_spark(ledger) -> tuple[list, dict]:
    from pyspark.sql import functions as F

    unit = F.when(F.col(L.PARENT_ID).isNull(), F.col(READ_UNIT)).alias(READ_UNIT)  # items only: sub-items are not read
    none = F.lit(None).cast("long")
    counts = ledger.groupBy(*COUNTED[:-1], unit).agg(
        F.count("*").alias("n"), none.alias("ids"), none.alias("kept"), none.alias("with_shard"))
    # each kind's totals as more rows, `ids` set: one job instead of two
    per_kind = ledger.groupBy("kind").agg(
        *[F.lit(None).cast("string").alias(k) for k in COUNTED[1:]], F.count("*").alias("n"),
        F.countDistinct(SAMPLE_ID).alias("ids"), F.sum((F.col(L.STATUS) == L.KEPT).cast("long")).alias("kept"),
        F.sum(F.col(L.SHARD).isNotNull().cast("long")).alias("with_shard"))
    rows = counts.unionByName(per_kind).collect()
    return ([{k: r[k] for k in (*COUNTED, "n")} for r in rows if r["ids"] is None],
            {r["kind"]: {k: int(r[k] or 0) for k in PER_KIND} for r in rows if r["ids"] is not None})


def _counts_arrow(whole) -> tuple[list, dict]:
    import pyarrow as pa
    import pyarrow.compute as pc

    items = pc.is_null(whole[L.PARENT_ID])
    keyed = pa.table({**{k: whole[k] for k in COUNTED[:-1]},
                      READ_UNIT: pc.if_else(items, whole[READ_UNIT], pa.scalar(None, whole.schema.field(READ_UNIT).type))})
    counts = keyed.group_by(COUNTED, use_threads=False).aggregate([([], "count_all")])
    per_kind = pa.table({"kind": whole["kind"], SAMPLE_ID: whole[SAMPLE_ID],
                         "kept": pc.equal(whole[L.STATUS], L.KEPT).cast(pa.int64()),
                         "with_shard": pc.is_valid(whole[L.SHARD]).cast(pa.int64())})
    per_kind = per_kind.group_by("kind", use_threads=False).aggregate(
        [([], "count_all"), (SAMPLE_ID, "count_distinct"), ("kept", "sum"), ("with_shard", "sum")])
    named = {"count_all": "n", f"{SAMPLE_ID}_count_distinct": "ids", "kept_sum": "kept", "with_shard_sum": "with_shard"}
    rows = counts.rename_columns([named.get(c, c) for c in counts.column_names]).to_pylist()
    per_kind = per_kind.rename_columns([named.get(c, c) for c in per_kind.column_names])
    return rows, {r["kind"]: {k: int(r[k] or 0) for k in PER_KIND} for r in per_kind.to_pylist()}


def summarize(counts: list, results: dict, recipe: Recipe, timer: StageTimer, started: float, out: str) -> dict:
    """summary.json: per kind, the counts of its sample unit at the top (input, kept, dropped and
    quarantined by reason) and every unit's under `units`; the shards; the kind's facts.
    `counts`: `ledger_counts(ledger)[0]`."""
    per: dict = {}
    for r in counts:
        u = per.setdefault(r["kind"], {}).setdefault(r[L.UNIT], _counts())
        u["input"] += r["n"]
        if r[L.STATUS] == L.KEPT:
            u["kept"] += r["n"]
        else:
            u[r[L.STATUS]][r[L.REASON]] = u[r[L.STATUS]].get(r[L.REASON], 0) + r["n"]
    kinds_out: dict = {}
    for kind, res in results.items():
        units = per.get(kind, {})
        for name in kinds.get(kind).units:
            units.setdefault(name, _counts())
        for u in units.values():
            for section in ("dropped", "quarantined"):
                u[section] = dict(sorted(u[section].items()))
        first = kinds.get(kind).units[0]
        k = dict(units[first])
        k["unit"] = first
        k["units"] = {name: units[name] for name in kinds.get(kind).units} | {
            n: v for n, v in sorted(units.items()) if n not in kinds.get(kind).units}
        k["shards"] = {"count": len(res.shards), "samples": sum(s["nsamples"] for s in res.shards),
                       "bytes": sum(s["bytes"] for s in res.shards), "files": res.shards,
                       "sets": {name: {"count": len(part), "samples": sum(s["nsamples"] for s in part)}
                                for name, part in shard_io.by_set(kind, res.shards).items()}}
        decl = kinds.get(kind)
        k["facts"] = res.facts
        k["assertions"] = res.assertions
        k["stages_run"] = list(res.stages_run)
        k["read"] = res.read  # read units and items counted by the reader (reconciled with the ledger)
        k["reasons"] = {c: {"status": r.status, "stage": r.stage, "text": r.text, "fatal": r.fatal,
                            "shows": list(r.shows)} for c, r in decl.reasons.items()}
        kinds_out[kind] = k
    return {
        "kinds": kinds_out,
        "output": out,
        "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "elapsed_seconds": round(time.time() - started, 2),
        "stages": timer.report(),
        "versions": versions(),
        "recipe": recipe.to_dict(),
    }


def check_accounting(ledger, results: dict, counts: list, total: dict, whole=None) -> None:
    """One ledger row per id; per kind, kept sample-unit rows = samples in its shards; every read unit's
    items, as its reader counted them, in the ledger (`reconcile`); every sub-item points at an item of its
    kind that is in the ledger. `counts, total`: `ledger_counts(ledger)`; `whole`: the ledger on the
    driver (`materialise`), where the sub-items are looked up instead of in Spark."""
    from pyspark.sql import functions as F

    if total["n"] != total["ids"]:
        raise AccountingError(f"ledger has {total['n']} rows but {total['ids']} distinct sample ids")
    kept: dict = {}
    read: dict = {}
    for r in counts:
        if r[L.STATUS] == L.KEPT:
            kept[(r["kind"], r[L.UNIT])] = kept.get((r["kind"], r[L.UNIT]), 0) + r["n"]
        if r[READ_UNIT] is not None:
            units = read.setdefault(r["kind"], {})
            units[r[READ_UNIT]] = units.get(r[READ_UNIT], 0) + r["n"]
    for kind, res in results.items():
        in_shards = sum(s["nsamples"] for s in res.shards)
        n = kept.get((kind, kinds.get(kind).samples_unit), 0)
        if n != in_shards:
            raise AccountingError(f"{kind}: ledger says {n} kept, shards hold {in_shards}")
        if res.read_counts is not None:
            reconcile(kind, read.get(kind, {}), res.read_counts)
    if all(len(kinds.get(kind).units) == 1 for kind in results):
        return  # no kind has sub-items
    if whole is not None:
        import pyarrow.compute as pc

        subs = whole.filter(pc.is_valid(whole[L.PARENT_ID])).select(["kind", L.PARENT_ID])
        orphans = subs.join(whole.select(["kind", SAMPLE_ID]), keys=["kind", L.PARENT_ID],
                            right_keys=["kind", SAMPLE_ID], join_type="left anti").num_rows
        if orphans:
            raise AccountingError(f"{orphans} ledger rows name a parent_id that is not an item of their kind")
        return
    ids = ledger.select(F.col(SAMPLE_ID).alias("_parent"), F.col("kind").alias("_parent_kind"))
    orphans = (ledger.filter(F.col(L.PARENT_ID).isNotNull())
               .join(ids, (F.col(L.PARENT_ID) == F.col("_parent")) & (F.col("kind") == F.col("_parent_kind")),
                     "left_anti").count())
    if orphans:
        raise AccountingError(f"{orphans} ledger rows name a parent_id that is not an item of their kind")


class WorkDirError(ValueError):
    """The work dir cannot serve this run (checked on the driver before any Spark work)."""


def default_work_dir(recipe: Recipe, out: str) -> str:
    """Stage checkpoints: recipe.work_dir, else OUT/_work for local output, else a folder under the
    system temp dir named after OUT (stable, so a restarted run finds it)."""
    if recipe.work_dir:
        return recipe.work_dir
    if not storage.is_s3(out):
        return os.path.join(out, "_work")
    return os.path.join(tempfile.gettempdir(), "vlcurate-work", checkpoint.fingerprint(out))


def check_work_dir(recipe: Recipe, out: str, master: str) -> None:
    """Spooled media are read with os.pread by every executor, so the work dir must be a POSIX path all
    of them share: no s3:// or hdfs:// (for now), and, off a local master, not the driver's temp dir
    (the default for s3:// output)."""
    work = recipe.work_dir
    if "://" in work and not work.startswith("file://"):
        raise WorkDirError(f"work_dir={work}: stage checkpoints and spooled media need a POSIX path every executor "
                           f"can read (a shared mount, e.g. --set work_dir=/mnt/shared/vlcurate-work); "
                           f"{work.split('://')[0]}:// work dirs are not supported")
    if storage.is_s3(out) and not work and not master.startswith("local"):
        raise WorkDirError(f"output {out} on master {master}: the default work dir "
                           f"{default_work_dir(recipe, out)} is on the driver's local disk, which the executors do not "
                           f"share; give a shared mount with --set work_dir=/mnt/shared/vlcurate-work")


def run_build(spark, recipe: Recipe, inputs: dict[str, list[str]], out: str, started: float | None = None) -> dict:
    """Run every kind's pipeline into a run folder of its own, check it, and publish it all at once
    (pipelines/io/runs.py): OUT's ledger, reports/summary.json, report and shards; return the summary."""
    started = started or time.time()
    check_work_dir(recipe, out, spark.sparkContext.master)
    preload()  # great_expectations and matplotlib: in the background, while the kinds run
    timer = StageTimer(spark)
    work_dir = default_work_dir(recipe, out)
    work = checkpoint.begin(spark, work_dir, owner=checkpoint.fingerprint(out), ours=not recipe.work_dir)
    root = runs.new_root(out)  # everything of this run goes here; OUT shows it once it is published
    planned = {}
    for kind, uris in inputs.items():  # every kind's driver-side checks (models, weights) before any Spark work
        log.info("%s: %d input URI(s)", kind, len(uris))
        ctx = Context(spark=spark, recipe=recipe, cfg=recipe.section(kind), uris=uris, out=root, work_dir=work_dir,
                      timer=timer)
        planned[kind] = (ctx, kinds.get(kind).plan(ctx))
    with progress.Progress(spark, timer, interval=recipe.progress_seconds) as shown:
        summary, results, drawn = _curate(spark, recipe, planned, timer, started, out, root)
        summary["phases"] = shown.report()
    return _check_and_publish(spark, recipe, out, root, work, summary, results, drawn, timer, started)


def _curate(spark, recipe: Recipe, planned: dict, timer: StageTimer, started: float, out: str, root: str):
    """Every kind's pipeline, the ledger and summary.json, then the report material and the gates;
    returns (summary, results, the kinds' charts)."""
    results: dict = {}
    try:
        for kind, (ctx, plan) in planned.items():
            results[kind] = run_kind(kinds.get(kind), ctx, plan)
    except BaseException:
        _wait_quietly(r.written for r in results.values())
        raise
    read = [r.read["items"] if r.read else None for r in results.values()]
    codegen.choose(spark, None if None in read else sum(read))  # the ledger, report and gates: by the run's size
    ledgers = [r.ledger for r in results.values()]
    ledger = ledgers[0]
    for other in ledgers[1:]:
        ledger = ledger.unionByName(other)
    # --- the ledger; the report material and the gates beside the accounting and summary.json ---------
    # Each is a chain of small Spark jobs whose planning (one JVM thread per Python thread) and driver-side
    # work (great-expectations in pandas) leave the cores idle between jobs. The material and the gates'
    # ledger and shard suites need only the ledger and the kinds' rows, so they start as soon as the
    # ledger is materialised and counted (a kind of at most report.ROW_CAP rows gets its material from
    # the driver's copy of the ledger and one fetch); the gates' totals wait for summary.json's counts.
    from pipelines import report

    def run_material(ledger, whole) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        with progress.phase(spark, "report"):
            found = {kind: report.collect_material(kinds.get(kind), res, ledger, root, timer, recipe.section(kind),
                                                   whole=whole)
                     for kind, res in results.items()}
        timer.add_wall("report_material", time.perf_counter() - t0)
        return found, draw_charts(root, list(results))

    def run_gates(ledger, summary: Callable[[], dict], rows: dict, whole) -> dict:
        t0 = time.perf_counter()
        with progress.phase(spark, "gates", items=False):
            found = gates.run_gates(results, ledger, summary, recipe, root, rows, whole=whole)
        timer.add_wall("gates", time.perf_counter() - t0)
        return found

    collected = gated = None
    summarized: Future = Future()  # the gates' totals wait for it; their ledger and shard suites do not
    try:
        with progress.phase(spark, "ledger"):
            ledger, whole = materialise(ledger, results)
            counts, total = ledger_counts(ledger, whole)
            collected = beside(functools.partial(run_material, ledger, whole), "vlcurate-report")
            gated = beside(functools.partial(run_gates, ledger, summarized.result, total["kinds"], whole),
                           "vlcurate-gates")
            t0 = time.perf_counter()
            write_ledger(ledger, whole, storage.join(root, "ledger"))
            timer.add_wall("ledger", time.perf_counter() - t0)
            check_accounting(ledger, results, counts, total, whole)  # waits for the shard writers
            summary = summarize(counts, results, recipe, timer, started, out)
        # the curation itself (shards staged, ledger written), apart from the report and gates that follow
        summary["curated_seconds"] = summary["elapsed_seconds"]
        storage.write_bytes(storage.join(root, "reports", "summary.json"),
                            json.dumps(summary, indent=1, ensure_ascii=False, default=str).encode("utf-8"))
        summarized.set_result(summary)
        summary["gates"] = gated()
    except BaseException as e:
        if not summarized.done():
            summarized.set_exception(e)
        _wait_quietly([w for w in (collected, gated) if w is not None] + [r.written for r in results.values()])
        raise
    material, drawn = collected()
    for kind, m in material.items():
        summary["kinds"][kind]["report_material"] = {k: m[k] for k in ("rows", "rows_in_material", "sampled")}
    return summary, results, drawn


def _wait_quietly(waits) -> None:
    """A failed run still waits for the threads it started (`beside`: the kinds' shard writers, the report
    material, the gates), ignoring their errors: no Spark job of a run outlives it."""
    for wait in waits:
        with contextlib.suppress(BaseException):
            wait()


def draw_charts(root: str, kinds_run: list[str]) -> dict[str, str]:
    """The report's charts of each kind, drawn from its material as soon as that is written, so that
    they are drawn while the gates validate rather than after them (matplotlib: ~1 s of Python at the
    end of a run otherwise). A chart that fails is left to the report page, which draws it again and
    logs why (the report never fails a run)."""
    from pipelines.report import page

    preloaded()  # matplotlib draws in one thread at a time
    drawn = {}
    for kind in kinds_run:
        try:
            drawn[kind] = page.draw(root, kind)
        except Exception:
            log.debug("charts of %s not drawn beside the gates", kind, exc_info=True)
    return drawn


def _check_and_publish(spark, recipe: Recipe, out: str, root: str, work, summary: dict, results: dict, drawn: dict,
                       timer: StageTimer, started: float) -> dict:
    """summary.json final, the report page (with the kinds' charts `drawn` by `draw_charts`), the gates
    enforced, then the one-step publish and clean-up."""
    from pipelines import report

    summary["versions"].update(gates.tool_versions())
    summary["report"] = {"html": "index.html", "material": "material/", "data_docs": summary["gates"]["data_docs"]}
    summary["stages"] = timer.report()
    summary["elapsed_seconds"] = round(time.time() - started, 2)
    storage.write_bytes(storage.join(root, "reports", "summary.json"),
                        json.dumps(summary, indent=1, ensure_ascii=False, default=str).encode("utf-8"))
    try:
        preloaded()
        report.write_report(root, in_run=True, drawn=drawn)
    except Exception:
        log.exception("could not render %s; `python -m jobs.report OUT` retries from the material",
                      storage.join(root, "reports", "index.html"))
    try:
        gates.enforce(summary["gates"])
    except gates.GateFailed as e:  # nothing of this run replaces a good run; its folder stays to be read
        if not runs.holds_good_run(out):  # a first run: its ledger and report (no shards) show why
            runs.publish(out, root, None)
        else:
            e.details.append(f"OUT still shows the previous run; this run's report: "
                             f"{storage.join(root, 'reports', 'index.html')}")
        raise
    # publishing comes last and in one step: a reader never sees part of a run, or a run that failed
    runs.publish(out, root, {kind: res.shards for kind, res in results.items()})
    if not recipe.keep_work:
        work.remove()  # only what this run made or reused, and only where no other run holds a lease
    spark.catalog.clearCache()  # the small tables pipelines cached (checkpoint.cached)
    return summary
