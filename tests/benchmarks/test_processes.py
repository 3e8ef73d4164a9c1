"""benchmarks.processes.role on the processes of a real local Spark session: its JVM, its Python workers
(started from pipelines/pyspark_daemon.py, as bin/vlcurate's local runs do), a job driver, and others."""
from __future__ import annotations

import subprocess
import sys
import time

import psutil

from benchmarks import processes


def test_the_sessions_jvm_and_python_workers_and_a_driver(spark):
    spark.range(8).mapInArrow(lambda it: it, "id long").collect()  # a Python worker: the daemon forks it
    children = psutil.Process().children(recursive=True)
    roles = {p.pid: processes.role(p) for p in children}
    assert processes.JVM in roles.values()
    assert any(r == processes.WORKERS and "pipelines.pyspark_daemon" in " ".join(p.cmdline())
               for p in children if (r := roles[p.pid]))
    assert processes.role(psutil.Process()) is None  # pytest itself
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "jobs/build_pretrain.py"])
    try:
        proc = psutil.Process(driver.pid)
        deadline = time.monotonic() + 10
        while "build_pretrain.py" not in " ".join(proc.cmdline()) and time.monotonic() < deadline:
            time.sleep(0.01)  # between fork and exec it still has pytest's command line
        assert processes.role(proc) == processes.DRIVER
    finally:
        driver.kill()
        driver.wait()
