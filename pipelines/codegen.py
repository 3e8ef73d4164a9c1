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
- a features pass itself keeps Spark's default (its size is not known before it runs), and so does a
  kind that does not count what it reads.

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
    # what spark-defaults.conf and --conf set: the context's own SparkConf, one py4j call a lookup
    # (getConf() copies it, a py4j call per entry: ~100 round trips, 3.7 s under py-spy at 2,000 URLs
    # while the preload thread held the GIL)
    launched = spark.sparkContext._conf
    if launched.contains(WHOLE_STAGE) or launched.contains(FACTORY):
        return None
    compiled = items is None or items > int(spark.conf.get(LIMIT, str(INTERPRETED_ROWS)))
    spark.conf.set(WHOLE_STAGE, "true" if compiled else "false")
    spark.conf.set(FACTORY, "FALLBACK" if compiled else "NO_CODEGEN")  # FALLBACK: Spark's default
    log.debug("%s queries for %s items", "compiled" if compiled else "interpreted", items)
    return compiled
