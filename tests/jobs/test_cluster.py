"""The job on a Spark standalone cluster (a master and two workers on this machine) gives the local
run's output, byte for byte, with speculative copies of straggling tasks racing their originals.

Shipping: the README's production path ships a venv-pack archive of a non-editable install
(`make package`), a multi-GB torch environment: far too slow to build in a test. Here the workers run on
this machine, so the executors use this venv's interpreter, and the project code travels the way the
README sends it: a zip of jobs, pipelines, filters and schemas given to --py-files. The interpreter is
started with -S (no .pth files), so the editable install of this checkout is invisible to the executors:
they can import the project only from the shipped zip.

Two workers, on 127.0.0.1 and 127.0.0.2 (both loopback), because Spark launches a speculative copy
only on a host where the task has not run yet. The test-only fault hook stalls and then fails the first
attempt of some decode and shard-writer tasks, so speculation has stragglers to copy; a copy that wins
gets its original killed mid-shard, and that attempt's temporary file must not reach the output.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile

import pytest

from filters.base import FAULT_RATE_ENV, FAULT_SEED_ENV, FAULT_SITES_ENV, FAULT_STALL_ENV
from tests.jobs.conftest import ARGS, assert_same_output
from tests.jobs.test_build_pretrain import ROOT, submit
from tests.jobs.test_reliability import FAULT_RATE, SPECULATION, fault_seed

SPARK_CLASS = os.path.join(os.path.dirname(sys.executable), "spark-class")
HOSTS = ("127.0.0.1", "127.0.0.2")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _daemon(args: list[str], host: str, log_path: str) -> subprocess.Popen:
    # no PYTHONPATH (tests/conftest.py points it at the checkout): executors inherit the worker's environment
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SPARK_LOCAL_IP"] = host
    with open(log_path, "wb") as log:
        return subprocess.Popen([SPARK_CLASS, *args], env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def cluster(tmp_path):
    """spark://127.0.0.1:PORT with two 1-core workers; both daemons are stopped afterwards."""
    port, ui = _free_port(), _free_port()
    procs = [_daemon(["org.apache.spark.deploy.master.Master", "--host", HOSTS[0], "--port", str(port),
                      "--webui-port", str(ui)], HOSTS[0], str(tmp_path / "master.log"))]
    url = f"spark://{HOSTS[0]}:{port}"
    try:
        for i, host in enumerate(HOSTS):
            work = tmp_path / f"worker{i}"
            work.mkdir()
            procs.append(_daemon(["org.apache.spark.deploy.worker.Worker", url, "--host", host, "--cores", "1",
                                  "--memory", "3g", "--webui-port", str(_free_port(host)), "--work-dir", str(work)],
                                 host, str(tmp_path / f"worker{i}.log")))
        deadline = time.monotonic() + 180
        while True:
            assert all(p.poll() is None for p in procs), "a cluster daemon died: see master.log / worker*.log"
            assert time.monotonic() < deadline, "the workers did not register within 180 s"
            try:
                state = json.load(urllib.request.urlopen(f"http://{HOSTS[0]}:{ui}/json/", timeout=2))
                if state.get("aliveworkers") == len(HOSTS):
                    break
            except OSError:
                pass
            time.sleep(1)
        yield url
    finally:
        for p in reversed(procs):  # workers first: they stop their executors
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def _source_zip(path: str) -> str:
    """What `make package` puts in dist/vlcurate-src.zip."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for package in ("jobs", "pipelines", "filters", "schemas"):
            for dirpath, dirnames, files in os.walk(os.path.join(ROOT, package)):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                for f in sorted(files):
                    full = os.path.join(dirpath, f)
                    z.write(full, os.path.relpath(full, ROOT))
    return path


def _executor_python(path: str) -> str:
    """This venv's interpreter without `site`: its packages come from PYTHONPATH, .pth files (the
    editable install of the checkout among them) are not read."""
    site_packages = sysconfig.get_paths()["purelib"]
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexport PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site_packages}"\n'
                f'exec "{sys.executable}" -S "$@"\n')
    os.chmod(path, 0o755)
    return path


def test_cluster_run_equals_the_local_run(cluster, clean_run, sample_dir, tmp_path):
    python = _executor_python(str(tmp_path / "python"))
    # without the zip the executors' interpreter cannot see the project at all
    bare = subprocess.run([python, "-c", "import pipelines"], cwd=tmp_path, capture_output=True, check=False,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert bare.returncode != 0 and b"No module named 'pipelines'" in bare.stderr
    src = _source_zip(str(tmp_path / "vlcurate-src.zip"))
    out = str(tmp_path / "out")
    faults = {FAULT_RATE_ENV: str(FAULT_RATE), FAULT_SEED_ENV: fault_seed(("decode", "shards")),
              FAULT_SITES_ENV: "decode,shards", FAULT_STALL_ENV: "8"}
    proc = submit("--input", f"image_text={sample_dir}", "--output", out, *ARGS, master=cluster, env=faults,
                  spark_args=["--py-files", src, "--conf", f"spark.pyspark.python={python}",
                              "--conf", f"spark.pyspark.driver.python={sys.executable}", *SPECULATION])
    (tmp_path / "driver.log").write_text(proc.stderr)
    executors = set(re.findall(r"Granted executor ID \S+ on hostPort (127\.0\.0\.\d+)", proc.stderr))
    assert executors == set(HOSTS), executors
    won = re.findall(r"Killing attempt 0 for .* as the attempt 1 succeeded", proc.stderr)
    assert won, "no speculative copy beat a stalled original"
    assert_same_output(out, clean_run)  # same shards (bytes), same ledger, no temporary files
