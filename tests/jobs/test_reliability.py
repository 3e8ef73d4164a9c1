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
import threading
import time

import pytest

from filters.base import FAULT_RATE_ENV, FAULT_SEED_ENV, FAULT_SITES_ENV, FaultPlan
from pipelines.io import shards
from tests.jobs.conftest import ARGS, assert_same_output
from tests.jobs.test_build_pretrain import ROOT, SPARK_SUBMIT, submit

pytestmark = pytest.mark.slow  # whole-job runs: `pytest -m "not slow"` for a quick pass

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
    # the features stage is finished when its read counts sit beside the checkpoint (written after _SUCCESS)
    finished = os.path.join(out, "_work", "image_text-features-*", "_read_counts.json")
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


# --- runs never damage what users already have ----------------------------------------------------------


def test_a_run_removes_only_what_it_used_in_the_work_dir(spark, tmp_path):
    """A user's work dir keeps everything the run did not make; a checkpoint another run uses (same
    inputs and recipe, so the same name) stays until that run is done with it too."""
    from pipelines import checkpoint

    scratch = tmp_path / "scratch"
    (scratch / "someone-elses").mkdir(parents=True)
    (scratch / "notes.txt").write_text("mine")
    df = spark.range(3)
    first = checkpoint.begin(spark, str(scratch), owner="run-a")
    checkpoint.checkpoint(df, str(scratch), "k-features", "f1")
    media = checkpoint.own(str(scratch / "media" / "k-f1"))
    (scratch / "media" / "k-f1" / "part-0.bin").write_bytes(b"img")
    second = checkpoint.begin(spark, str(scratch), owner="run-b")  # a concurrent run with the same inputs
    assert checkpoint.checkpoint(df, str(scratch), "k-features", "f1").count() == 3  # reused, not rewritten
    checkpoint.own(media)
    assert first.remove() == sorted([str(scratch / "k-features-f1"), media])  # kept for run-b
    assert checkpoint.checkpoint(df, str(scratch), "k-features", "f1").count() == 3  # still whole
    assert second.remove() == []
    assert sorted(os.listdir(scratch)) == ["notes.txt", "someone-elses"]
    fresh = tmp_path / "fresh"  # a work dir the run created itself goes too, once empty
    run = checkpoint.begin(spark, str(fresh), owner="run-c")
    checkpoint.checkpoint(df, str(fresh), "k-features", "f1")
    run.remove()
    assert not fresh.exists()


def test_work_dir_executors_cannot_share_is_refused_before_spark_work(tmp_path):
    from pipelines.build import WorkDirError, run_build
    from pipelines.recipe import load

    class Driver:  # no Spark at all: the check must come first
        class sparkContext:
            master = "spark://head:7077"

    s3 = load(None, [], ["image_text=s3://raw/x"], "s3://curated/out")
    with pytest.raises(WorkDirError, match="driver's local disk.*--set work_dir="):
        run_build(Driver, s3, s3.inputs, "s3://curated/out")
    for work in ("s3://bucket/work", "hdfs://nn/work"):
        recipe = load(None, [f"work_dir={work}"], ["image_text=/data"], str(tmp_path))
        with pytest.raises(WorkDirError, match="POSIX path every executor"):
            run_build(Driver, recipe, recipe.inputs, str(tmp_path))
    Driver.sparkContext.master = "local[2]"
    with pytest.raises(WorkDirError, match="POSIX"):  # spooled media: not even locally
        run_build(Driver, recipe, recipe.inputs, str(tmp_path))


def _published(out: str) -> dict[str, bytes]:
    """Everything a reader sees: OUT/ledger, OUT/reports and OUT/shards, through whatever links."""
    seen = {}
    for entry in ("ledger", "reports", "shards"):
        for dirpath, dirnames, files in os.walk(os.path.join(out, entry), followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in files:
                path = os.path.join(dirpath, f)
                with open(path, "rb") as fh:
                    seen[os.path.relpath(path, out)] = fh.read()
    return seen


def test_publish_swaps_whole_runs_and_replaces_the_earlier_layout(tmp_path):
    """Local output: OUT/ledger, reports and shards go through one _LATEST link, so a reader sees one run;
    folders of the earlier layout (and its larger run's extra shards) are gone after the first publish."""
    from pipelines.io import runs

    out = str(tmp_path)
    for rel in ("ledger/part-0.parquet", "reports/summary.json", "shards/k/k-000007.tar", "shards/k/index.json"):
        os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
        (tmp_path / rel).write_bytes(b"earlier")
    assert runs.holds_good_run(out) and runs.current(out) is None
    for n in (1, 2):
        root = runs.new_root(out)
        for rel in ("ledger/part-0.parquet", "reports/summary.json", "shards/.staging-k/k-000000.tar"):
            os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
            with open(os.path.join(root, rel), "wb") as fh:
                fh.write(f"run{n}".encode())
        runs.publish(out, root, {"k": [{"shard": "k-000000.tar", "nsamples": 1, "bytes": 4}]})
        seen = _published(out)
        assert sorted(seen) == ["ledger/part-0.parquet", "reports/summary.json", "shards/k/index.json",
                                "shards/k/k-000000.tar", "shards/k/sizes.json"]
        assert {seen[r] for r in ("ledger/part-0.parquet", "reports/summary.json", "shards/k/k-000000.tar")} == {
            f"run{n}".encode()}
        assert runs.current(out) == root and os.listdir(os.path.join(out, runs.RUNS)) == [os.path.basename(root)]
    assert sorted(os.listdir(out)) == [".runs", "_LATEST", "ledger", "reports", "shards"]


def _recipe(sample_dir: str, out: str, *sets: str):
    import dataclasses

    from filters.clip import ClipScore
    from pipelines.recipe import load

    extra = ["image_text.clip.allow_random_weights=true"] if "allow_random_weights" in {
        f.name for f in dataclasses.fields(ClipScore)} else []
    return load(None, ["image_text.clip.pretrained=", "image_text.clip.model=ViT-S-32-alt", *extra, *sets],
                [f"image_text={sample_dir}"], out)  # the small model, as tests/jobs/conftest.py ARGS


def test_publishing_is_all_or_nothing(spark, sample_dir, tmp_path, monkeypatch):
    """A run that fails (a quality gate, any exception) leaves the published run as it was, byte for
    byte; a later good run with fewer shards shows only its own; the user's work dir keeps its files."""
    from pipelines import build, gates
    from pipelines.io import runs

    out, scratch = str(tmp_path / "out"), tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "notes.txt").write_text("mine")
    work = f"work_dir={scratch}"
    # keep_work: the later runs reuse the checkpoints (same inputs); the last one removes them
    first = build.run_build(spark, _recipe(sample_dir, out, work, "shards.max_samples=8", "keep_work=true"),
                            {"image_text": [sample_dir]}, out)
    good = _published(out)
    assert len(first["kinds"]["image_text"]["shards"]["files"]) == 3

    def gate_fails(summary_gates):
        raise gates.GateFailed(["image_text.totals.planted"])

    monkeypatch.setattr(gates, "enforce", gate_fails)
    with pytest.raises(gates.GateFailed) as failed:
        build.run_build(spark, _recipe(sample_dir, out, work, "shards.max_samples=4"), {"image_text": [sample_dir]}, out)
    assert _published(out) == good
    (report,) = [d for d in failed.value.details if "this run's report" in d]
    assert os.path.isfile(report.rsplit(" ", 1)[1])  # the failed run's own report, to read why
    monkeypatch.undo()

    def crash(*args, **kwargs):
        raise RuntimeError("executor lost for good")

    monkeypatch.setattr(gates, "run_gates", crash)
    with pytest.raises(RuntimeError, match="executor lost"):
        build.run_build(spark, _recipe(sample_dir, out, work, "shards.max_samples=4"), {"image_text": [sample_dir]}, out)
    assert _published(out) == good
    monkeypatch.undo()

    def no_summary(*args, **kwargs):  # the gates' thread waits for the summary: it must end, not hang
        raise RuntimeError("summary lost")

    monkeypatch.setattr(build, "summarize", no_summary)
    with pytest.raises(RuntimeError, match="summary lost"):
        build.run_build(spark, _recipe(sample_dir, out, work, "shards.max_samples=4"), {"image_text": [sample_dir]}, out)
    assert _published(out) == good
    assert not [t.name for t in threading.enumerate() if t.name in ("vlcurate-gates", "vlcurate-report")]
    monkeypatch.undo()

    last = build.run_build(spark, _recipe(sample_dir, out, work, "shards.max_samples=16"), {"image_text": [sample_dir]}, out)
    names = sorted(f["shard"] for f in last["kinds"]["image_text"]["shards"]["files"])
    assert len(names) == 2
    assert sorted(os.listdir(os.path.join(out, "shards", "image_text"))) == sorted(names + ["index.json", "sizes.json"])
    with open(os.path.join(out, "reports", "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["started_at"] == last["started_at"] and summary["gates"]["passed"]
    assert os.listdir(os.path.join(out, runs.RUNS)) == [os.path.basename(runs.current(out))]  # failed runs' folders gone
    assert sorted(os.listdir(scratch)) == ["notes.txt"]  # the run's checkpoints and media went, not the folder
