"""Reliability: failed task attempts and a killed driver change nothing in the output.

- Task failures: the test-only fault hook (filters.base.FaultPlan, VLCURATE_FAULT_RATE) fails the first
  attempt of a fixed share of the stage and shard-writer tasks, mid-partition; Spark retries them
  (local[2,4]: local mode retries only with a failure count in the master). Speculation is on too, but
  local mode never launches a speculative copy (Spark runs a copy only on a host where the task has
  not run, and local mode has one host): tests/jobs/test_cluster.py runs real copies on two hosts.
- Restart: the job is killed (SIGKILL, whole process group) once its features checkpoint is finished,
  and started again with the same arguments: it reuses the checkpoint and ends with the clean output.
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

from filters.base import FAULT_RATE_ENV, FAULT_SEED_ENV, FAULT_SITES_ENV, FaultPlan
from pipelines.io import shards
from tests.jobs.conftest import ARGS, assert_same_output
from tests.jobs.test_build_pretrain import ROOT, SPARK_SUBMIT, submit

SPECULATION = ("--conf", "spark.speculation=true", "--conf", "spark.speculation.multiplier=1",
               "--conf", "spark.speculation.quantile=0.1", "--conf", "spark.speculation.minTaskRuntime=0")
FAULT_RATE = 0.3
# not CLIP: a failed Python worker reloads the model, slow; the other row-wise stages and the shard writer
FAULT_SITES = "download,decode,caption,concepts,shards"
INJECTED = re.compile(r"injected fault \(test only\): site=(\w+) partition=(\d+)")


def fault_seed(sites: tuple[str, ...], rate: float = FAULT_RATE) -> str:
    """A seed whose plan fails some, not all, of the first attempts at each site in the sample run
    (3 read units, so 3 tasks per feature stage; 3 shards, so 3 writer tasks)."""
    for seed in map(str, range(1000)):
        if all(0 < sum(FaultPlan(site, rate, seed).chosen(p) for p in range(3)) < 3 for site in sites):
            return seed
    raise AssertionError("no seed found")


def test_fault_plan_is_deterministic_and_fails_only_first_attempts():
    plan = FaultPlan("decode", 0.3, "7")
    chosen = [p for p in range(1000) if plan.chosen(p)]
    assert chosen == [p for p in range(1000) if FaultPlan("decode", 0.3, "7").chosen(p)]
    assert 200 < len(chosen) < 400
    assert chosen != [p for p in range(1000) if FaultPlan("caption", 0.3, "7").chosen(p)]
    plan.strike()  # outside a Spark task: nothing happens


def test_publish_drops_temp_files_and_swaps_the_folder_in_one_step(tmp_path):
    out = str(tmp_path)
    staging, final = shards.staging_dir(out, "k"), shards.final_dir(out, "k")
    os.makedirs(staging)
    os.makedirs(final)
    for folder, name in ((staging, "k-000000.tar"), (staging, ".k-000001.tar.dead.tmp"), (final, "k-000009.tar")):
        (tmp_path / folder / name).write_bytes(b"x")
    if sys.platform.startswith("linux"):  # renameat2(RENAME_EXCHANGE) works on this file system
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir()
        b.mkdir()
        (a / "from_a").touch()
        assert shards._exchange(str(a), str(b)) and (b / "from_a").exists() and not (a / "from_a").exists()
    shards.publish(out, "k", [{"shard": "k-000000.tar", "nsamples": 1, "bytes": 1}])
    assert sorted(os.listdir(final)) == ["index.json", "k-000000.tar", "sizes.json"]
    assert os.listdir(os.path.join(out, "shards")) == ["k"]  # no staging, no previous folder left


def test_failed_first_attempts_give_the_clean_output(clean_run, sample_dir, tmp_path):
    out = str(tmp_path / "out")
    seed = fault_seed(("decode", "caption", "shards"))
    proc = submit("--input", f"image_text={sample_dir}", "--output", out, *ARGS, master="local[2,4]",
                  env={FAULT_RATE_ENV: str(FAULT_RATE), FAULT_SEED_ENV: seed, FAULT_SITES_ENV: FAULT_SITES},
                  spark_args=SPECULATION)
    (tmp_path / "driver.log").write_text(proc.stderr)
    sites = {site for site, _ in INJECTED.findall(proc.stderr)}
    assert {"decode", "caption", "shards"} <= sites, sites  # the faults really happened, mid-shard included
    assert_same_output(out, clean_run)  # same shards (bytes), same ledger, no temporary files


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def test_a_killed_run_restarts_to_the_clean_output(clean_run, sample_dir, tmp_path):
    import psutil

    out = str(tmp_path / "out")
    args = ["--input", f"image_text={sample_dir}", "--output", out, *ARGS]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1"}
    cmd = [SPARK_SUBMIT, "--master", "local[2]", "--properties-file", os.path.join(ROOT, "spark-defaults.conf"),
           "--conf", "spark.ui.enabled=false", os.path.join(ROOT, "jobs", "build_pretrain.py"), *args]
    finished = os.path.join(out, "_work", "image_text-features-*", "_SUCCESS")
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        spawned = []
        try:
            deadline = time.monotonic() + 600
            while not glob.glob(finished):
                assert proc.poll() is None, f"the job ended before its features checkpoint: {proc.returncode}"
                assert time.monotonic() < deadline, "no features checkpoint after 600 s"
                time.sleep(0.2)
            spawned = psutil.Process(proc.pid).children(recursive=True)
        finally:
            _kill_group(proc)  # the driver JVM, the Python driver and the Python workers
            _, alive = psutil.wait_procs(spawned, timeout=30)  # the PySpark daemon has its own group: it
            for p in alive:  # exits when the JVM's pipe closes; kill it by pid if it lingers
                p.kill()
    assert not alive, f"processes outlived the killed driver: {[p.pid for p in alive]}"
    assert not os.path.exists(os.path.join(out, "shards", "image_text"))  # nothing was published

    # what else a killed run leaves: a stale staging shard, a killed attempt's temp file, and an unfinished
    # checkpoint (no _SUCCESS) where the rerun will write its CLIP scores; all must be ignored or removed
    staging = os.path.join(out, "shards", ".staging-image_text")
    os.makedirs(staging, exist_ok=True)
    for name in ("image_text-000000.tar", "image_text-000007.tar", ".image_text-000001.tar.0123.tmp"):
        with open(os.path.join(staging, name), "wb") as f:
            f.write(b"half a shard")
    (clip_name,) = [os.path.basename(p) for p in glob.glob(os.path.join(clean_run, "_work", "image_text-clip-*"))]
    unfinished = os.path.join(out, "_work", clip_name)
    clip_finished = os.path.exists(os.path.join(unfinished, "_SUCCESS"))  # only if the kill came late
    if not clip_finished:
        os.makedirs(unfinished, exist_ok=True)
        with open(os.path.join(unfinished, "part-00000-left-by-the-killed-run.parquet"), "wb") as f:
            f.write(b"not parquet")

    proc = submit(*args)
    log = proc.stdout + proc.stderr  # the job's own log lines go to stdout
    (tmp_path / "rerun.log").write_text(log)
    with open(os.path.join(out, "reports", "summary.json")) as f:
        summary = json.load(f)
    features = summary["stages"]["image_text-features"]
    assert features["reused"] is True and "reusing finished stage output" in log
    assert summary["stages"]["decode"]["task_seconds"] == 0  # decoding was not redone
    assert summary["stages"]["image_text-clip"]["reused"] is clip_finished
    assert_same_output(out, clean_run)  # byte-identical shards, same ledger, no temp files, _work removed
