"""Smoke test of benchmarks/ledger_scale.py on a few thousand rows: its synthetic ledger passes the
kind's ledger suite and counts as it should, on the driver's copy. (The same suite in Spark costs ~17 s
of great-expectations' Spark jobs at any size; tests/pipelines/test_gates.py shows both engines give the
same results.) The sizes it is meant for (1M rows, a fresh process per engine): `python -m
benchmarks.ledger_scale`.
"""
from __future__ import annotations

from benchmarks.ledger_scale import markdown, measure


def test_synthetic_ledger_passes_its_suite(spark):
    engine = "driver"
    run = measure(spark, 3000, engine)
    assert run["table_engine"] == "pandas" and "fetch" in run["steps"]
    assert all(s["seconds"] >= 0 and s["driver_python_mib"] > 0 for s in run["steps"].values())
    assert run["counts"] == {"kept": 1800, "with_shard": 1800, "ids": 3000}  # 60 % kept, each in a shard
    assert "| 3,000 | " + engine in markdown([run], {"command": "x", "commit": None, "at": "now", "machine": "m"})
