"""Smoke test of benchmarks/driver_threads.py: a few planning rounds at every switch interval."""
from __future__ import annotations

import sys

from benchmarks.driver_threads import INTERVALS, measure


def test_measures_every_interval_and_restores_the_process_setting(spark):
    before = sys.getswitchinterval()
    out = measure(spark, rounds=3, warm_up=2)
    assert out["rounds"] == 3 and out["alone_s"] > 0
    assert set(out["beside_busy_thread_s"]) == {str(i) for i in INTERVALS}
    assert all(s > 0 for s in out["beside_busy_thread_s"].values())
    assert sys.getswitchinterval() == before
