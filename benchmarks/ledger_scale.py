"""The end of a run at the size where the ledger stops being held on the driver: time and memory of the
ledger's counts, its sorted write and its great-expectations suite, on the driver's Arrow copy (a ledger
of at most `pipelines.gates.LEDGER_CAP` rows, `pipelines.build.materialise`) and in Spark (above it).

    python -m benchmarks.ledger_scale --rows 250000,1000000

Each (rows, engine) runs in a fresh Python process with this repo's spark-defaults.conf (local[2],
2 GB driver heap, Arrow batches of 128 rows) on a synthetic image_text ledger made in Spark: ids as
`make_sample_id` gives them, URLs as source keys, 60 % kept (shards of 10,000), 35 % dropped under the
kind's reasons (duplicates naming a keeper), 5 % quarantined with a decoder's message as detail. The
ledger is computed and checkpointed first (untimed); then, timed one by one:

- fetch (driver engine only): the ledger's `LEDGER_FETCHED` columns to the driver as Arrow;
- counts: `ledger_counts` (Arrow group-by on the driver, one Spark job otherwise);
- write: `write_ledger` (sorted on the driver into one file, or Spark's global sort);
- gates: the kind's ledger table (`ledger_table`: pandas from the copy, or Spark joins) and its
  expectation suite validated (pandas or great-expectations' Spark engine).

Peak resident memory is sampled every 0.1 s per step for the driver's Python process and the JVM, so
the driver engine's cost at the cap is seen beside Spark's. Writes benchmarks/results/ledger_scale.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.memory_scaling import TreeMemory
from benchmarks.pipeline_throughput import RESULTS
from benchmarks.provenance import header, provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("driver", "spark")


def spark_defaults(path: str = os.path.join(ROOT, "spark-defaults.conf")) -> dict[str, str]:
    """The project's spark-defaults.conf as a dict (spark.master left out: the benchmark sets its own)."""
    conf = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition(" ")
                conf[key] = value.strip()
    conf.pop("spark.master", None)
    return conf


def synthetic_ledger(spark, n: int, partitions: int):
    """An image_text ledger of n rows with every column of `LEDGER_FETCHED`, made in Spark."""
    from pyspark.sql import functions as F

    from pipelines.build import LEDGER_FETCHED
    from schemas import image_text as S
    from schemas import ledger as L

    def sid(col):
        return F.substring(F.sha1(F.concat(F.lit("image_text\x00urls.parquet\x00"), col.cast("string"))), 1, 32)

    dropped = sorted(c for c, r in S.REASONS.items() if r.status == L.DROPPED)
    pick = F.element_at(F.array(*map(F.lit, dropped)), (F.col("id") % len(dropped) + 1).cast("int"))
    r = F.col("id") % 100
    status = F.when(r < 60, L.KEPT).when(r < 95, L.DROPPED).otherwise(L.QUARANTINED)
    reason = F.when(r < 60, None).when(r < 95, pick).otherwise(F.lit("image_undecodable"))
    df = spark.range(0, n, 1, partitions).select(
        sid(F.col("id")).alias("sample_id"), F.lit("image_text").alias("kind"), F.lit("urls.parquet").alias("source"),
        F.concat(F.lit("https://images.example.com/photos/"), F.sha1(F.col("id").cast("string")).substr(1, 12),
                 F.lit("/"), F.col("id").cast("string"), F.lit(".jpg")).alias("source_key"),
        F.lit("pair").alias(L.UNIT), F.lit(None).cast("string").alias(L.PARENT_ID), status.alias(L.STATUS),
        reason.alias(L.REASON),
        F.when(r >= 95, F.concat(F.lit("cannot identify image file <_io.BytesIO object at 0x7f"),
                                 F.hex(F.col("id")), F.lit(">"))).alias(L.DETAIL),
        F.when(reason.isin(*L.DUPLICATE_REASONS), sid(F.col("id") - 1)).alias(L.DUPLICATE_OF),
        F.when(r < 60, F.concat(F.lit("image_text-"), F.lpad((F.col("id") / 10_000).cast("long").cast("string"), 6, "0"),
                                F.lit(".tar"))).alias(L.SHARD),
        F.concat(F.lit("urls.parquet#"), (F.col("id") % 64).cast("string")).alias("read_unit"))
    return df.select(LEDGER_FETCHED)


def one(n: int, engine: str) -> dict:
    """One (rows, engine) run in this process, in a SparkSession set up as spark-defaults.conf says."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master("local[2]").appName("vlcurate-ledger-scale")
    for key, value in {**spark_defaults(), "spark.ui.enabled": "false"}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    try:
        return measure(spark, n, engine)
    finally:
        spark.stop()


def measure(spark, n: int, engine: str) -> dict:
    """The timings and peaks of each step on a synthetic ledger of n rows; the kind's counts."""
    from pipelines import build, gates, kinds

    kind = kinds.get("image_text")
    steps: dict = {}
    tmp = tempfile.mkdtemp(prefix="ledger-scale-")

    def step(name, fn):
        with TreeMemory() as mem:
            t = time.perf_counter()
            value = fn()
            seconds = time.perf_counter() - t
        peaks = mem.mib()
        steps[name] = {"seconds": round(seconds, 2), "driver_python_mib": peaks["driver_python_mib"],
                       "jvm_mib": peaks["jvm_mib"]}
        return value

    def make():
        ledger = synthetic_ledger(spark, n, 8).localCheckpoint()
        ledger.count()
        return ledger

    try:
        ledger = step("make", make)
        whole = step("fetch", ledger.toArrow) if engine == "driver" else None
        _, total = step("counts", lambda: build.ledger_counts(ledger, whole))
        assert total["n"] == n and total["ids"] == n, total
        step("write", lambda: build.write_ledger(ledger, whole, os.path.join(tmp, "ledger")))

        def suite():
            table, info = gates.ledger_table(ledger, kind.name, cap=n if engine == "driver" else 0, n=n, whole=whole)
            v = gates.Validation(tmp)
            v.run("image_text.ledger", table, gates.ledger_checks(kind), n)
            return info, v.out["image_text.ledger"]

        info, result = step("gates", suite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert result["success"], [c for c in result["expectations"] if not c["success"]]
    end = {k: v for k, v in steps.items() if k != "make"}
    return {"rows": n, "engine": engine, "table_engine": info["engine"], "steps": steps,
            "counts": {k: total["kinds"][kind.name][k] for k in ("kept", "with_shard", "ids")},
            "seconds": round(sum(s["seconds"] for s in end.values()), 2),
            "driver_python_peak_mib": max(s["driver_python_mib"] for s in steps.values()),
            "jvm_peak_mib": max(s["jvm_mib"] for s in steps.values())}


COLUMNS = ("| rows | engine | fetch s | counts s | write s | gates s | total s | driver Python peak MiB "
           "| JVM peak MiB |")


def markdown(runs: list[dict], prov: dict) -> str:
    lines = [f"# The end of a run, driver copy vs Spark\n\n{header({'provenance': prov})}\n", COLUMNS,
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        cells = [f"{r['steps'][k]['seconds']:.2f}" if k in r["steps"] else "-"
                 for k in ("fetch", "counts", "write", "gates")]
        lines.append(f"| {r['rows']:,} | {r['engine']} | {' | '.join(cells)} | {r['seconds']:.2f} | "
                     f"{r['driver_python_peak_mib']:,.0f} | {r['jvm_peak_mib']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="250000,1000000", help="comma-separated ledger sizes")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--one", nargs=2, metavar=("ROWS", "ENGINE"), help=argparse.SUPPRESS)  # a child's run
    a = p.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(one(int(a.one[0]), a.one[1])), flush=True)
        return
    prov = provenance("benchmarks.ledger_scale", argv)
    runs = []
    for n in (int(x) for x in a.rows.split(",")):
        for engine in a.engines.split(","):
            done = subprocess.run([sys.executable, "-m", "benchmarks.ledger_scale", "--one", str(n), engine],
                                  cwd=ROOT, capture_output=True, text=True, check=False)
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not found:
                sys.exit(f"{n} rows, {engine}: failed ({done.returncode})\n{done.stderr[-3000:]}")
            runs.append(json.loads(found[0][len("RESULT "):]))
            print(json.dumps(runs[-1]), flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "ledger_scale.json"), "w") as f:
        json.dump({"provenance": prov, "runs": runs}, f, indent=1)
    text = markdown(runs, prov)
    with open(os.path.join(RESULTS, "ledger_scale.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
