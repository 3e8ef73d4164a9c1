"""Which part of a run a process is, from its name and command line: the one classifier the benchmarks
share (benchmarks.compare's per-kind CPU and memory, benchmarks.memory_scaling's peaks per role)."""
from __future__ import annotations

import os

import psutil

JVM, WORKERS, DRIVER = "jvm", "python workers", "python driver"
# pyspark's daemon and workers, and this project's daemon module (pipelines/pyspark_daemon.py) that local
# runs start them from
_WORKER_MARKS = ("pyspark.daemon", "pyspark/daemon", "pipelines.pyspark_daemon", "pyspark.worker", "pyspark/worker")


def role(p: psutil.Process) -> str | None:
    """JVM (Spark's JVM, or spark-submit's launcher script that becomes it), WORKERS (a Python worker or
    its daemon), DRIVER (the job's Python driver), or None (anything else, or a process that is gone)."""
    try:
        name, cmd = p.name(), " ".join(p.cmdline())
    except psutil.Error:
        return None
    if os.path.basename(name) == "java" or " org.apache.spark." in cmd:
        return JVM
    if any(mark in cmd for mark in _WORKER_MARKS):
        return WORKERS
    if "build_pretrain.py" in cmd:
        return DRIVER
    return None
