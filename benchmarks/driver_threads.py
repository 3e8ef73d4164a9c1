"""The driver's py4j calls while another Python thread of the driver runs Python code.

The job's driver plans Spark queries (hundreds of short py4j calls, each a socket round trip that
releases the GIL and must take it back) while other threads of the same process do CPU work in Python:
importing great_expectations and matplotlib in the background, and the quality gates (pandas) beside
the report material. A thread that wants the GIL back waits for the running one to give it up, which
it does every `sys.getswitchinterval()` seconds (5 ms by default): every round trip can cost that
much. jobs/build_pretrain.py lowers the interval to 0.1 ms for the driver; this measures why.

Planning loop: `ROUNDS` times, a select on a small DataFrame and its columns (a few py4j calls each),
alone, then beside a thread that only runs Python arithmetic, at several switch intervals.

    python -m benchmarks.driver_threads [--rounds 300]
writes benchmarks/results/driver_threads.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from benchmarks.pipeline_throughput import RESULTS
from benchmarks.provenance import provenance

INTERVALS = (0.005, 0.0005, 0.0001, 0.00002)


def plan_loop(df, rounds: int) -> float:
    from pyspark.sql import functions as F

    t0 = time.perf_counter()
    for i in range(rounds):
        df.select("id", (F.col("a") + i).alias("b")).columns  # noqa: B018 - analysed through py4j
    return time.perf_counter() - t0


def beside_busy_thread(df, rounds: int, interval: float) -> float:
    stop = threading.Event()

    def burn() -> None:
        x = 0
        while not stop.is_set():
            for i in range(10_000):
                x += i * i

    before = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    thread = threading.Thread(target=burn, daemon=True)
    thread.start()
    try:
        return plan_loop(df, rounds)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(before)


def measure(spark, rounds: int, warm_up: int = 100) -> dict:
    from pyspark.sql import functions as F

    df = spark.range(10).withColumn("a", F.col("id") * 2)
    plan_loop(df, warm_up)  # the JVM's first analyses
    return {"rounds": rounds, "alone_s": round(plan_loop(df, rounds), 3),
            "beside_busy_thread_s": {str(i): round(beside_busy_thread(df, rounds, i), 3) for i in INTERVALS},
            "load": os.getloadavg()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=300)
    a = p.parse_args(argv)
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.log.level", "WARN").getOrCreate())
    try:
        out = {"provenance": provenance("benchmarks.driver_threads", argv), **measure(spark, a.rounds)}
    finally:
        spark.stop()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "driver_threads.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"{a.rounds} planning rounds alone: {out['alone_s']} s")
    for interval, s in out["beside_busy_thread_s"].items():
        print(f"beside a busy Python thread, switch interval {float(interval) * 1000:g} ms: {s} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
