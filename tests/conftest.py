"""Shared fixtures: one local[2] SparkSession for the whole run, and the sample corpus."""
from __future__ import annotations

import logging
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
# Python workers unpickle functions defined in test modules (tests.*) by reference: let them import them
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH", "")] if p)


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("vlcurate-tests")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "64")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", "2g")
        .config("spark.python.daemon.module", "pipelines.pyspark_daemon")  # as bin/vlcurate's local runs
        .config("spark.python.sql.dataFrameDebugging.enabled", "false")  # as spark-defaults.conf
        # these small runs compile their queries, as large runs do (pipelines/codegen.py); the end-to-end
        # tests run spark-submit with the default and interpret them
        .config("spark.vlcurate.interpretedRows", "0")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    # py4j's finalizer thread may still release Python proxies after the JVM is gone; its INFO records of
    # the refused connection then went to pytest's closed capture stream ("--- Logging error ---" after
    # the summary). They come from the "py4j" logger and, for a retried command (java_gateway's
    # send_command), from the root logger, which tests that call jobs.build_pretrain.main() in-process
    # leave at INFO (its logging.basicConfig).
    logging.getLogger("py4j").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    from jobs.make_sample import make_sample

    return make_sample(str(tmp_path_factory.mktemp("sample")))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto's standalone server) on 127.0.0.1; yields the env a client needs."""
    import subprocess
    import time
    import urllib.request

    port = _free_port()
    server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
