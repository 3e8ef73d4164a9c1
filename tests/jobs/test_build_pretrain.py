"""End to end: spark-submit the job on the bundled sample, read the shards back with webdataset."""
from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from schemas import image_text as S
from tests.util import read_json

pytestmark = pytest.mark.slow  # whole-job runs: `pytest -m "not slow"` for a quick pass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPARK_SUBMIT = os.path.join(os.path.dirname(sys.executable), "spark-submit")
VLCURATE = os.path.join(ROOT, "bin", "vlcurate")


def submit(*args, check=True, master="local[2]", env=None, spark_args=(), plain=False):
    """The job, as users run it: bin/vlcurate (the README's command: this venv's Spark, the driver's class
    archive, the settings for a local master), or with `plain` spark-submit itself with spark-defaults.conf,
    as users who bring their own Spark run it (sample_run, the cluster tests, a killed run)."""
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1", **(env or {})}
    spark = ["--master", master, "--conf", "spark.ui.enabled=false", *spark_args]
    if plain:
        cmd = [SPARK_SUBMIT, "--properties-file", os.path.join(ROOT, "spark-defaults.conf"), *spark,
               os.path.join(ROOT, "jobs", "build_pretrain.py"), *args]
    else:
        assert not [a for a in spark if " " in a], spark  # VLCURATE_SPARK_ARGS is split on spaces
        env["VLCURATE_SPARK_ARGS"] = " ".join(spark)
        cmd = [VLCURATE, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def runs(sample_run, clean_run):
    """Two separate runs with the same inputs and arguments (tests/jobs/conftest.py): the first by
    spark-submit itself, the second by bin/vlcurate (its local settings: no adaptive execution, fewer
    shuffle partitions, another Python worker daemon) keeping its stage checkpoints; neither may change
    the shards."""
    return [sample_run, clean_run]


def test_every_input_is_accounted_for(runs, sample_dir):
    out = runs[0]
    ledger = pq.read_table(os.path.join(out, "ledger")).to_pylist()
    summary = read_json(os.path.join(out, "reports", "summary.json"))
    k = summary["kinds"]["image_text"]
    assert k["input"] == len(ledger) == 40  # every item of the sample, once
    assert len({r["sample_id"] for r in ledger}) == len(ledger)
    assert k["input"] == k["kept"] + sum(k["dropped"].values()) + sum(k["quarantined"].values())
    by_key = {r["source_key"]: r for r in ledger}
    expect = {
        "truncated_jpeg": ("quarantined", "image_truncated"), "random_bytes": ("quarantined", "image_undecodable"),
        "html_as_jpeg": ("quarantined", "image_undecodable"), "empty_file": ("quarantined", "image_empty"),
        "page_too_small": ("dropped", "image_too_small"), "microaneurysms_tiny": ("dropped", "image_too_small"),
        "hubble_panorama": ("dropped", "image_too_small"), "blank_grey": ("dropped", "solid_color"),
        "caption_short": ("dropped", "caption_too_short"), "caption_german": ("dropped", "language"),
        "caption_missing": ("dropped", "caption_missing"),
        "astronaut": ("kept", None), "cmyk_noise": ("kept", None), "gradient_16bit": ("kept", None),
        "logo": ("kept", None), "chessboard_RGB": ("kept", None),
    }
    got = {key: (by_key[key]["status"], by_key[key]["reason"]) for key in expect}
    assert got == expect
    families = {"chelsea": ["chelsea_exact_copy"], "astronaut": ["astronaut_reencoded"],
                "coffee": ["coffee_resized_brighter", "palette_gif"], "rocket": ["rocket_watermarked"],
                "horse": ["horse_cropped"], "camera": ["exif_rotated"]}
    for original, copies in families.items():
        members = [by_key[m] for m in [original, *copies]]
        (keeper,) = [m for m in members if m["status"] == "kept"]
        for m in members:
            if m is not keeper:
                assert m["reason"] in ("exact_duplicate", "near_duplicate") and m["duplicate_of"] == keeper["sample_id"]
    assert by_key["chelsea_exact_copy"]["reason"] in ("exact_duplicate", None)
    # keeper rule: most pixels, then the largest input file
    assert by_key["astronaut_reencoded"]["duplicate_of"] == by_key["astronaut"]["sample_id"]
    assert all(r["reason"] in S.REASONS for r in ledger if r["reason"])
    assert {r["unit"] for r in ledger} == {"pair"} and all(r["parent_id"] is None for r in ledger)
    assert all((r["shard"] is not None) == (r["status"] == "kept") for r in ledger)
    assert not k["facts"]["clip"]["real_weights"] and not k["facts"]["clip"]["threshold_applied"]
    assert k["units"]["pair"]["input"] == k["input"] and k["unit"] == "pair"
    assert set(summary["stages"]) >= {"decode", "caption", "clip", "concepts"}
    # the progress reporter's phases: every item went through the read pass once, each phase timed
    phases = summary["phases"]
    assert phases["image_text features"]["items"] == 40 and phases["image_text features"]["tasks"] >= 1
    assert {"image_text dedup", "image_text shards", "ledger", "report", "gates"} <= set(phases)
    assert summary["stages"]["decode"]["rows"] == 40 and summary["stages"]["decode"]["rows_per_task_second"] > 0


def test_shards_read_back_with_webdataset(runs):
    import webdataset as wds

    out = runs[0]
    shard_dir = os.path.join(out, "shards", "image_text")
    index = read_json(os.path.join(shard_dir, "index.json"))
    sizes = read_json(os.path.join(shard_dir, "sizes.json"))
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    names = [s["url"] for s in index["shardlist"]]
    assert names == [f"image_text-{i:06d}.tar" for i in range(len(names))] and len(names) == 3
    assert [s["nsamples"] for s in index["shardlist"]] == [sizes[n] for n in names]
    assert max(sizes.values()) - min(sizes.values()) <= 1  # even shards
    assert not [f for f in os.listdir(shard_dir) if f.startswith(".") or "tmp" in f]
    ledger = {r["sample_id"]: r for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()}
    ds = wds.WebDataset([os.path.join(shard_dir, n) for n in names], shardshuffle=False).decode("pil")
    seen = []
    for sample in ds:
        meta = sample["json"]
        for field in ("sample_id", "source", "source_key", "width", "height", "language", "clip_score",
                      "phash", "concepts", "caption_original", "recaption"):
            assert field in meta
        assert sample["__key__"] == meta["sample_id"]
        assert sample["jpg"].mode == "RGB" and sample["jpg"].size == (meta["width"], meta["height"])
        assert sample["txt"] == meta["caption"]
        assert ledger[meta["sample_id"]]["status"] == "kept"
        assert ledger[meta["sample_id"]]["shard"] == os.path.basename(sample["__url__"])
        seen.append(meta["sample_id"])
    assert seen == sorted(seen) and len(seen) == sum(sizes.values())
    assert len(seen) == sum(1 for r in ledger.values() if r["status"] == "kept")


def test_same_inputs_give_the_same_shards_byte_for_byte(runs):
    a, b = (os.path.join(r, "shards", "image_text") for r in runs)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for n in names:
        with open(os.path.join(a, n), "rb") as fa, open(os.path.join(b, n), "rb") as fb:
            assert fa.read() == fb.read(), n


def test_unknown_recipe_key_fails_before_spark(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "build_pretrain.py"),
                           "--set", "image_text.clip.treshold=0.2"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2
    assert "unknown recipe key 'image_text.clip.treshold'" in proc.stderr
    assert "threshold" in proc.stderr  # the known keys are listed


def test_unloadable_clip_weights_fail_before_spark_work(sample_dir, tmp_path):
    """A real run never silently loses its CLIP filter: a checkpoint that is not there stops the job on the
    driver (exit 2, the recipe key named) before any Spark job, and nothing is written."""
    missing = str(tmp_path / "no-such-dir" / "clip.pt")
    out = tmp_path / "out"
    proc = submit("--input", f"image_text={sample_dir}", "--output", str(out),
                  "--set", f"image_text.clip.pretrained={missing}", check=False)
    output = proc.stdout + proc.stderr  # spark-submit's PythonRunner merges the driver's stderr into its stdout
    assert proc.returncode == 2, output[-4000:]
    assert f"build_pretrain: recipe error: image_text.clip.pretrained: cannot load CLIP weights: " \
           f"tried checkpoint file {missing}: the file does not exist" in output
    assert "image_text.clip.allow_random_weights=true" in output
    assert "Traceback" not in output
    assert "Starting job" not in output and "Job 0 finished" not in output  # no Spark action ran
    assert not out.exists() or not any(out.iterdir())
