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

CLIP weights reach every executor: a checkpoint given as a path only the driver can open (relative to the
driver's working directory; executors run in their own work folders) is shipped with the job
(SparkContext.addFile) and scored with on both workers.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import socket
import subprocess
import sys
import sysconfig
import tarfile
import time
import urllib.request
import zipfile

import pytest

from filters.base import FAULT_RATE_ENV, FAULT_SEED_ENV, FAULT_SITES_ENV, FAULT_STALL_ENV
from tests.jobs.conftest import ARGS, assert_same_output
from tests.jobs.test_build_pretrain import ROOT, submit
from tests.jobs.test_reliability import FAULT_RATE, SPECULATION, fault_seed

pytestmark = pytest.mark.slow  # whole-job runs: `pytest -m "not slow"` for a quick pass

SPARK_CLASS = os.path.join(os.path.dirname(sys.executable), "spark-class")
HOSTS = ("127.0.0.1", "127.0.0.2")


class Cluster(str):
    """The master URL, with the workers' work folders (executors run in work/APP/ID/)."""

    def __new__(cls, url: str, work: list[str]):
        self = super().__new__(cls, url)
        self.work = work
        return self


def _free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n different ports free now: all bound at once, so no two are the same (a port chosen after another
    one's socket closed can be that port again; a daemon that finds its port taken moves to the next)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def _master_ui(log_path) -> str | None:
    """The master's web UI, from its log line 'Bound MasterWebUI to HOST, and started at URL': the port it
    really has, which is not the one asked for when that one was taken meanwhile."""
    try:
        with open(log_path, errors="replace") as f:
            found = re.search(r"Bound MasterWebUI to [^,]+, and started at http://[^:/]+:(\d+)", f.read())
    except OSError:
        return None
    return f"http://{HOSTS[0]}:{found.group(1)}" if found else None


def _daemon(args: list[str], host: str, log_path: str, env: dict | None = None) -> subprocess.Popen:
    # no PYTHONPATH (tests/conftest.py points it at the checkout): executors inherit the worker's environment
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full.update(env or {}, SPARK_LOCAL_IP=host)
    with open(log_path, "wb") as log:
        return subprocess.Popen([SPARK_CLASS, *args], env=full, stdout=log, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def standalone(tmp, workers: list[tuple[str, int, str]], env: dict | None = None):
    """A master on HOSTS[0] and one worker per (host, cores, memory), started with `env` added to their
    environment, logs in `tmp` (master.log, worker<i>.log) and work folders tmp/worker<i>. Yields (master
    URL, the master's JSON state) once every worker registered; stops the daemons afterwards."""
    port, ui, *worker_uis = _free_ports(2 + len(workers))
    url = f"spark://{HOSTS[0]}:{port}"
    procs = []
    try:
        procs.append(_daemon(["org.apache.spark.deploy.master.Master", "--host", HOSTS[0], "--port", str(port),
                              "--webui-port", str(ui)], HOSTS[0], str(tmp / "master.log"), env))
        for i, (host, cores, memory) in enumerate(workers):
            work = tmp / f"worker{i}"
            work.mkdir()
            procs.append(_daemon(["org.apache.spark.deploy.worker.Worker", url, "--host", host, "--cores", str(cores),
                                  "--memory", memory, "--webui-port", str(worker_uis[i]), "--work-dir", str(work)],
                                 host, str(tmp / f"worker{i}.log"), env))
        deadline, state = time.monotonic() + 180, {}
        while True:
            assert all(p.poll() is None for p in procs), f"a cluster daemon died: see {tmp}/master.log, worker*.log"
            assert time.monotonic() < deadline, (f"the workers did not register within 180 s (master UI "
                                                 f"{_master_ui(tmp / 'master.log')}, last state {state}): see "
                                                 f"{tmp}/master.log, worker*.log")
            master_ui = _master_ui(tmp / "master.log")
            try:
                if master_ui:
                    state = json.load(urllib.request.urlopen(f"{master_ui}/json/", timeout=5))
                    if state.get("aliveworkers") == len(workers):
                        break
            except (OSError, ValueError):
                pass
            time.sleep(1)
        yield url, state
    finally:
        for p in reversed(procs):  # workers first: they stop their executors
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """spark://127.0.0.1:PORT with two 1-core workers (the tests of this module share them); both daemons
    are stopped afterwards. Each worker's --work-dir is `cluster.work[i]`."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    with standalone(tmp_path, [(host, 1, "3g") for host in HOSTS]) as (url, _):
        yield Cluster(url, [str(tmp_path / f"worker{i}") for i in range(len(HOSTS))])


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


# these tests read the driver's INFO lines (executors granted, speculative attempts killed); the job's
# default is WARN (spark-defaults.conf)
INFO = ["--conf", "spark.log.level=INFO"]


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
    proc = submit("--input", f"image_text={sample_dir}", "--output", out, *ARGS, master=cluster, plain=True,
                  env=faults, spark_args=["--py-files", src, "--conf", f"spark.pyspark.python={python}",
                              "--conf", f"spark.pyspark.driver.python={sys.executable}", *SPECULATION, *INFO])
    (tmp_path / "driver.log").write_text(proc.stderr)
    executors = set(re.findall(r"Granted executor ID \S+ on hostPort (127\.0\.0\.\d+)", proc.stderr))
    assert executors == set(HOSTS), executors
    won = re.findall(r"Killing attempt 0 for .* as the attempt 1 succeeded", proc.stderr)
    assert won, "no speculative copy beat a stalled original"
    assert_same_output(out, clean_run)  # same shards (bytes), same ledger, no temporary files


def test_a_driver_only_clip_checkpoint_is_shipped_to_every_executor(cluster, sample_dir, tmp_path):
    import open_clip
    import torch
    from PIL import Image

    model_name = "ViT-S-32"  # open_clip's smallest text+vision pair
    torch.manual_seed(7)
    model = open_clip.create_model(model_name, pretrained=None).eval()
    ckpt = tmp_path / "driver-only" / "clip-shipped-by-the-job.pt"
    ckpt.parent.mkdir()
    torch.save(model.state_dict(), ckpt)
    # relative to the driver's working directory (submit runs in ROOT): no executor can open this path
    pretrained = os.path.relpath(ckpt, ROOT)
    python = _executor_python(str(tmp_path / "python"))
    src = _source_zip(str(tmp_path / "vlcurate-src.zip"))
    out = tmp_path / "out"
    proc = submit("--input", f"image_text={os.path.join(sample_dir, 'folder')}", "--output", str(out),
                  "--set", "shards.max_samples=8", "--set", "image_text.balance.enabled=false",
                  "--set", f"image_text.clip.model={model_name}", "--set", f"image_text.clip.pretrained={pretrained}",
                  "--set", "image_text.clip.threshold=-1",  # keep every scored pair, to read its score back
                  master=cluster, plain=True, spark_args=["--py-files", src, "--conf", f"spark.pyspark.python={python}",
                                              "--conf", f"spark.pyspark.driver.python={sys.executable}", *INFO])
    (tmp_path / "driver.log").write_text(proc.stderr)
    assert set(re.findall(r"Granted executor ID \S+ on hostPort (127\.0\.0\.\d+)", proc.stderr)) == set(HOSTS)
    executor_dirs = [d for w in cluster.work for d in glob.glob(os.path.join(w, "*", "*")) if os.path.isdir(d)]
    shipped = [d for d in executor_dirs if os.path.isfile(os.path.join(d, ckpt.name))]
    assert shipped, f"no executor received {ckpt.name}: {executor_dirs}"
    assert not any(os.path.exists(os.path.join(d, pretrained)) for d in executor_dirs)  # only the shipped copy

    with open(out / "reports" / "summary.json") as f:
        k = json.load(f)["kinds"]["image_text"]
    clip = (k.get("facts") or k)["clip"]
    assert clip["real_weights"] and clip["threshold_applied"], clip
    samples = _shard_samples(str(out / "shards" / "image_text"))
    assert samples and all(s["json"]["clip_score"] is not None for s in samples)
    # the executors scored with the checkpoint's weights: one pair, recomputed here
    pre = open_clip.create_model_and_transforms(model_name, pretrained=None)[2]
    first = samples[0]
    img = Image.open(io.BytesIO(first["jpg"]))
    img.draft("RGB", (448, 448))
    with torch.inference_mode():
        i = model.encode_image(pre(img.convert("RGB")).unsqueeze(0))
        t = model.encode_text(open_clip.get_tokenizer(model_name)([first["json"]["caption"]]))
        expect = float((i / i.norm() * (t / t.norm())).sum())
    assert first["json"]["clip_score"] == pytest.approx(expect, abs=2e-3)


def _shard_samples(folder: str) -> list[dict]:
    """jpg bytes and parsed json of every sample in the folder's tars."""
    samples: dict[str, dict] = {}
    for name in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        with tarfile.open(name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                data = tar.extractfile(member).read()
                samples.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data
    return [samples[k] for k in sorted(samples)]
