"""Near-dedup at scale: recall, precision, time and memory of `filters.dedup` on synthetic hashes.

Each size n holds n background items with a random 64-bit pHash and an independent random 256-bit
second-tier signature, plus `--planted` near copies of the first background items: a copy is
d1 = 0..hamming_radius pHash bits and d2 = 0..second_radius signature bits from its original (both
spread evenly over the range, the bits chosen at random). Everything is generated inside Spark
(spark.range + xxhash64 expressions), nothing on the driver.

Recall: planted pairs with a drop between them / planted pairs. Precision: drops between a planted
pair / all drops (background pairs that fall within the radii by chance count as false). skipped:
`DedupStats.skipped`. seconds: `find_duplicates_with_stats` plus collecting the drops, data generated
and checkpointed before. peak_mib: largest resident memory of this process and its children (JVM,
Python workers) during that time.

Floors, measured in the same run on the same rows, so the scaling has a reference:
`scan_seconds` reads every item once (an aggregate over all rows: what any dedup must at least do),
`shuffle_seconds` emits the 11 block rows per item and hands each (block, value) group to a Python
worker that only counts it (the Spark part of the candidate generation, without the numpy work inside
each group). Any method
that looks at every item grows at least linearly, 2x per doubling of n, once fixed costs are paid.

    python -m benchmarks.dedup_scale --sizes 1000000,4000000
    python -m benchmarks.dedup_scale --sizes 10000000 --append     # adds a size to the same file
writes benchmarks/results/dedup_scale.json: a list of {n, recall, precision, seconds, peak_mib, skipped}.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import threading
import time

from benchmarks.provenance import provenance

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dedup_scale.json")


def _positions(g: str, count: str, bits: int, salt: str) -> str:
    """SQL: `count` distinct random bit positions in [0, bits), a function of g (sorted by a hash)."""
    return (f"slice(transform(array_sort(transform(sequence(0, {bits - 1}), "
            f"p -> named_struct('k', xxhash64({g}, p, '{salt}'), 'p', p))), x -> x.p), 1, {count})")


def _bits(positions: str, word: int = 0) -> str:
    """SQL: 64-bit mask of the positions that fall in word `word` (bits 64*word .. 64*word+63)."""
    return f"aggregate(filter({positions}, q -> q div 64 = {word}), 0L, (acc, q) -> acc | shiftleft(1L, q % 64))"


def synthetic(spark, n: int, planted: int, radius: int, second_radius: int):
    from pyspark.sql import functions as F

    def frame(ids, sample_id, phash, words):
        return ids.select(
            sample_id.alias("sample_id"), F.concat(F.lit("sha-"), sample_id).alias("content_sha"),
            phash.alias("phash"), F.concat(*[F.unhex(F.lpad(F.hex(w), 16, "0")) for w in words]).alias("phash256"),
            F.lit(256).alias("width"), F.lit(256).alias("height"), F.lit(1000).cast("long").alias("source_bytes"))

    bg = spark.range(n)
    background = frame(bg, F.concat(F.lit("s"), F.col("id").cast("string")), F.xxhash64("id", F.lit(0)),
                       [F.xxhash64("id", F.lit(w + 1)) for w in range(4)])
    g = F.col("id")
    pos1 = _positions("id", f"cast(id % {radius + 1} as int)", 64, "t1")
    pos2 = _positions("id", f"cast((id * 7 + 3) % {second_radius + 1} as int)", 256, "t2")
    copies = frame(spark.range(min(planted, n)), F.concat(F.lit("p"), g.cast("string")),
                   F.xxhash64(g, F.lit(0)).bitwiseXOR(F.expr(_bits(pos1))),
                   [F.xxhash64(g, F.lit(w + 1)).bitwiseXOR(F.expr(_bits(pos2, w))) for w in range(4)])
    return background.unionByName(copies)


class PeakRss:
    """Largest summed RSS of this process and its descendants, sampled every 0.5 s."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def _sample(self):
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def __enter__(self):
        def run():
            while not self._stop.wait(0.5):
                self._sample()
        self._sample()
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def floors(df, radius: int) -> dict:
    """Seconds of a full scan and of the bare block shuffle of `df` (see the module docstring)."""
    import pyarrow as pa
    from pyspark.sql import functions as F

    from filters.dedup import blocks

    t0 = time.perf_counter()
    df.agg(F.sum(F.length("sample_id") + F.length("phash256")), F.max("phash")).collect()
    scan = time.perf_counter() - t0
    t0 = time.perf_counter()
    exploded = df.select("sample_id", "phash", "phash256", F.explode(F.array(*[
        F.struct(F.lit(i).alias("block"),
                 F.shiftrightunsigned(F.col("phash"), shift).bitwiseAND((1 << width) - 1).alias("value"))
        for i, (shift, width) in enumerate(blocks(radius))])).alias("b")).select("sample_id", "phash256", "b.*")
    # every row shipped to its group's Python worker, as the candidate generation does (an aggregate
    # would be combined map-side and move nothing)
    exploded.groupBy("block", "value").applyInArrow(
        lambda t: pa.table({"c": [t.num_rows], "b": [sum(len(v or b"") for v in t.column("phash256").to_pylist())]}),
        "c long, b long").agg(F.max("c"), F.sum("b")).collect()
    return {"scan_seconds": round(scan, 1), "shuffle_seconds": round(time.perf_counter() - t0, 1)}


def measure(spark, n: int, planted: int) -> dict:
    from filters.dedup import Dedup, find_duplicates_with_stats

    cfg = Dedup()
    df = synthetic(spark, n, planted, cfg.hamming_radius, cfg.second_radius).localCheckpoint()
    total = df.count()
    floor = floors(df, cfg.hamming_radius)
    with PeakRss() as mem:
        t0 = time.perf_counter()
        drops, stats = find_duplicates_with_stats(df, cfg)
        rows = drops.collect()
        seconds = time.perf_counter() - t0
    truth = {(f"p{g}", f"s{g}") for g in range(min(planted, n))}
    true = [r for r in rows if (r.sample_id, r.duplicate_of) in truth or (r.duplicate_of, r.sample_id) in truth]
    found = {tuple(sorted((r.sample_id, r.duplicate_of))) for r in true}
    out = {"n": total, "recall": round(len(found) / max(1, len(truth)), 5),
           "precision": round(len(true) / max(1, len(rows)), 5), "seconds": round(seconds, 1),
           "peak_mib": round(mem.peak / 2**20), "skipped": stats.skipped,
           "planted": len(truth), "drops": len(rows), "edges": stats.edges, "rounds": stats.rounds, **floor,
           "load_avg": round(os.getloadavg()[0], 1)}
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000000,4000000", help="comma-separated background sizes")
    p.add_argument("--planted", type=int, default=2000, help="planted near copies per size")
    p.add_argument("--cores", type=int, default=2, help="local[N]")
    p.add_argument("--driver-memory", default="12g", help="spark.driver.memory (local mode: all of Spark)")
    p.add_argument("--out", default=OUT, help="JSON list of results")
    p.add_argument("--append", action="store_true",
                   help="keep the other sizes already in --out (a larger size run on its own)")
    a = p.parse_args(argv)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(f"local[{a.cores}]").appName("vlcurate-dedup-scale")
             .config("spark.driver.memory", a.driver_memory).config("spark.sql.shuffle.partitions", "64")
             .config("spark.ui.enabled", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    made = provenance("benchmarks.dedup_scale", argv)  # per size: --append keeps sizes measured by other code
    results = [{**measure(spark, int(s), a.planted), "provenance": made} for s in a.sizes.split(",")]
    if a.append and os.path.exists(a.out):  # the sizes of an earlier run of the same code, then these
        with open(a.out) as f:
            results = sorted([r for r in json.load(f) if r["n"] not in {x["n"] for x in results}] + results,
                             key=lambda r: r["n"])
    for prev, cur in itertools.pairwise(results):  # growth per doubling of n, ours and the floors
        doublings = max(1e-9, math.log2(cur["n"] / prev["n"]))
        cur["per_doubling"] = {k: round((cur[k] / max(prev[k], 1e-9)) ** (1 / doublings), 2)
                               for k in ("seconds", "scan_seconds", "shuffle_seconds")}
        print(json.dumps({"n": cur["n"], "per_doubling": cur["per_doubling"]}), flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    spark.stop()


if __name__ == "__main__":
    main()
