"""Smoke test of benchmarks/ledger_scale.py on a few thousand rows: its synthetic ledger passes the
kind's ledger suite and counts as it should, on the driver's copy and in Spark alike.

The sizes it is meant for (1M rows, a fresh process per engine): `python -m benchmarks.ledger_scale`.
"""
from __future__ import annotations

import pytest

from benchmarks.ledger_scale import markdown, measure


@pytest.mark.parametrize("engine", ["driver", "spark"])
def test_synthetic_ledger_passes_its_suite_on_either_engine(spark, engine):
    run = measure(spark, 3000, engine)
    assert run["table_engine"] == {"driver": "pandas", "spark": "spark"}[engine]
    assert ("fetch" in run["steps"]) == (engine == "driver")
    assert all(s["seconds"] >= 0 and s["driver_python_mib"] > 0 for s in run["steps"].values())
    assert run["counts"] == {"kept": 1800, "with_shard": 1800, "ids": 3000}  # 60 % kept, each in a shard
    assert "| 3,000 | " + engine in markdown([run], {"command": "x", "commit": None, "at": "now", "machine": "m"})
