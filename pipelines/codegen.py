"""Spark's code generation, chosen by how many items the queries after a features pass read.

Spark compiles each query's physical plan to Java (whole-stage code generation, compiled by Janino)
before it runs it. On many rows that pays many times over; on a few thousand it is most of the query.
After the features pass, a run is some 30 queries (rules, dedup, shard assignment, ledger, report
material, gates) over narrow rows, one per item at most, so a small run spends its end compiling: at
2,000 URLs, JFR put 21 % of the driver JVM's samples there in Janino. Measured with Spark's event log
(benchmarks/HISTORY.md): interpreted (no whole-stage code, expressions evaluated instead of compiled),
the queries after the features pass of 2,000 URLs took 0.5-2.0 s less in each of 4 pairs (whole runs
0.8-1.8 s less); at 20,000 URLs, 0.7-1.6 s less after the features pass in each of 3 pairs (whole runs
within the features pass's noise); at 50,000 local pairs, interpreted took 1.6 s less after the features
in one of 3 pairs and 4.2 and 4.1 s more in the other two (16.2-18.1 s compiled). So:

- the queries after a kind's features pass are interpreted when the kind read at most
  `spark.vlcurate.interpretedRows` items (default INTERPRETED_ROWS: faster there, slower at 50,000)
  and compiled above, as Spark does by default; the ledger, report and gates follow the run's total;
- a features pass, and the task table it reads, are always interpreted (`features_pass`): their JVM
  work is handing Python's Arrow output to the Parquet writer, which took the same executor CPU both ways
  (0.12-0.15 s per task of 2,500 URLs at 20,000), while compiling it came first, on the critical path:
  Janino in the task table's `createDataFrame` and the features query, the first job ~0.5 s later.
  2,000 URLs, 4 alternating pairs: 11.17-12.02 s -> 10.85-11.22 s;
- the queries after a kind that does not count what it reads keep Spark's default.

A user's own `spark.sql.codegen.wholeStage` or `spark.sql.codegen.factoryMode` (spark-defaults.conf,
--conf) wins: nothing is changed then. Both settings are runtime SQL settings of the session, read when
a query is planned, so they apply to every query started after them.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

WHOLE_STAGE = "spark.sql.codegen.wholeStage"
FACTORY = "spark.sql.codegen.factoryMode"
LIMIT = "spark.vlcurate.interpretedRows"
INTERPRETED_ROWS = 20_000


def choose(spark, items: int | None) -> bool | None:
    """Compile the next queries (Spark's default) when they read more than the limit of items, or an
    unknown number (None); else interpret them. Returns True (compiled), False (interpreted), or None
    where the user set code generation and it was left alone."""
    return _set(spark, items is None or items > int(spark.conf.get(LIMIT, str(INTERPRETED_ROWS))), f"{items} items")


def features_pass(spark) -> bool | None:
    """Interpret the next queries: a kind's task table and features pass. False, or None where the user
    set code generation."""
    return _set(spark, False, "a features pass")


def _set(spark, compiled: bool, what) -> bool | None:
    # what spark-defaults.conf and --conf set: the context's own SparkConf, one py4j call a lookup
    # (getConf() copies it, a py4j call per entry: ~100 round trips, 3.7 s under py-spy at 2,000 URLs
    # while the preload thread held the GIL)
    launched = spark.sparkContext._conf
    if launched.contains(WHOLE_STAGE) or launched.contains(FACTORY):
        return None
    spark.conf.set(WHOLE_STAGE, "true" if compiled else "false")
    spark.conf.set(FACTORY, "FALLBACK" if compiled else "NO_CODEGEN")  # FALLBACK: Spark's default
    log.debug("%s queries: %s", "compiled" if compiled else "interpreted", what)
    return compiled
