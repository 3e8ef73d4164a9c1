"""Spark's GPU scheduling on a real standalone cluster hands each task a GPU address, and
filters.clip_gpu.task_device maps it to the task's torch device.

A master and one 2-core worker on this machine; the worker finds "its GPUs" with bin/gpu-discovery,
which reads a fake nvidia-smi (two GPUs) put first on the daemons' PATH; executors inherit that PATH,
so the executor discovery script (spark.executor.resource.gpu.discoveryScript) is the same file. The
job asks for 2 GPUs per executor and 1 per task and runs two tasks as one barrier stage (launched
together, both waiting at the barrier), so both hold a GPU at once and must have different ones.
No GPU and no CUDA are needed: only the addresses travel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.jobs.test_cluster import HOSTS, standalone

pytestmark = pytest.mark.slow  # a standalone cluster: three JVMs and an executor, about 20 s on 2 idle cores

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DISCOVERY = os.path.join(ROOT, "bin", "gpu-discovery")

DRIVER = r'''
import json, sys
from pyspark.sql import SparkSession
from filters.clip_gpu import spark_gpu_settings

url, script = sys.argv[1], sys.argv[2]
conf = {"spark.executor.cores": "2", "spark.executor.memory": "1g", "spark.ui.enabled": "false",
        "spark.executor.resource.gpu.amount": "2", "spark.executor.resource.gpu.discoveryScript": script,
        # a barrier stage submitted before the executor registered is retried after this long (default 15 s)
        "spark.scheduler.barrier.maxConcurrentTasksCheck.interval": "1s"}
settings, problems = spark_gpu_settings(conf, url, tasks_per_gpu=1)  # what the driver checks before starting
assert not problems, problems
builder = SparkSession.builder.master(url).appName("clip-gpu-scheduling")
for key, value in {**conf, **settings}.items():
    builder = builder.config(key, value)
spark = builder.getOrCreate()

def devices(rows):
    from pyspark import BarrierTaskContext
    from filters.clip_gpu import task_device, task_gpu_addresses

    ctx = BarrierTaskContext.get()
    ctx.barrier()  # both tasks are running, each holding the GPU it was given
    yield {"partition": ctx.partitionId(), "addresses": task_gpu_addresses(), "device": task_device()}

rows = spark.sparkContext.parallelize(range(2), 2).barrier().mapPartitions(devices).collect()
print("RESULT " + json.dumps({"settings": settings, "tasks": rows}))
spark.stop()
'''


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """spark://127.0.0.1:PORT with one 2-core worker that discovers two (fake) GPUs."""
    tmp = tmp_path_factory.mktemp("gpu-cluster")
    fake = tmp / "fake-bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    os.chmod(fake / "nvidia-smi", 0o755)
    env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",  # executors inherit it: same discovery
           "SPARK_WORKER_OPTS": f"-Dspark.worker.resource.gpu.amount=2 "
                                f"-Dspark.worker.resource.gpu.discoveryScript={DISCOVERY}"}
    with standalone(tmp, [(HOSTS[0], 2, "2g")], env) as (url, state):
        yield url, state, tmp


def test_each_task_gets_its_own_gpu_and_task_device_maps_it(gpu_cluster, tmp_path):
    url, state, logs = gpu_cluster
    # the worker found the fake GPUs through bin/gpu-discovery and offers them
    (worker,) = state["workers"]
    assert worker["resources"]["gpu"]["addresses"] == ["0", "1"], worker
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "SPARK_LOCAL_IP": HOSTS[0], "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable}
    done = subprocess.run([sys.executable, str(driver), url, DISCOVERY], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"driver failed ({done.returncode}):\n{done.stderr[-4000:]}\nlogs: {logs}"
    result = json.loads(lines[0][len("RESULT "):])
    assert result["settings"] == {"spark.task.resource.gpu.amount": "1"}  # derived by spark_gpu_settings
    tasks = sorted(result["tasks"], key=lambda t: t["partition"])
    assert sorted(t["device"] for t in tasks) == ["cuda:0", "cuda:1"], tasks
    assert all(t["device"] == f"cuda:{t['addresses'][0]}" and len(t["addresses"]) == 1 for t in tasks), tasks
