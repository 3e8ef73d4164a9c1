"""The job reads from and writes to s3:// through boto3, against a real S3 server on 127.0.0.1.

Three spark-submits in all (each a whole run, about a minute): the first run of s3://curated/swap reads
its input from s3://raw/sample (`first_run`, read by both tests), then a failed run and a later good run."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.jobs.test_build_pretrain import ROOT, submit

pytestmark = pytest.mark.slow  # whole-job runs: `pytest -m "not slow"` for a quick pass

# random CLIP weights (no download); the small ViT-S-32-alt: these tests are not about the scores
S3_ARGS = ("--set", "image_text.clip.pretrained=", "--set", "image_text.clip.allow_random_weights=true",
           "--set", "image_text.clip.model=ViT-S-32-alt")
OUT = "s3://curated/swap"
FIRST_MAX_SAMPLES = 4


def _objects(s3, prefix: str) -> dict[str, tuple]:
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket="curated", Prefix=prefix) for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def first_run(s3_server, sample_dir) -> dict:
    """The first run of OUT, its input the sample uploaded to s3://raw/sample, shards.max_samples=4.
    What it left, read right after it (the publish test's later runs replace it): every object under
    swap/ (`objects`: ETag and LastModified; `bodies`) and its shard list read back through index.json."""
    import boto3

    from trainer.shards import shard_list

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="raw")
    s3.create_bucket(Bucket="curated")
    for dirpath, _, files in os.walk(sample_dir):
        for f in files:
            path = os.path.join(dirpath, f)
            s3.upload_file(path, "raw", "sample/" + os.path.relpath(path, sample_dir))
    submit("--input", "image_text=s3://raw/sample", "--output", OUT, *S3_ARGS,
           "--set", f"shards.max_samples={FIRST_MAX_SAMPLES}")
    objects = _objects(s3, "swap/")
    return {"objects": objects, "bodies": {k: s3.get_object(Bucket="curated", Key=k)["Body"].read() for k in objects},
            "shards": shard_list(f"{OUT}/shards/image_text")}


def test_s3_in_and_out(first_run):
    """A run with its input and its output on S3: shards under the run's folder, the published index,
    every input item accounted for in the summary and the ledger (sources on S3), the kept images in the tars."""
    import tarfile

    bodies = first_run["bodies"]
    keys = sorted(bodies)
    pointer = json.loads(bodies["swap/_LATEST"])
    root = f"swap/.runs/{pointer['run']}"
    shards = [k for k in keys if k.endswith(".tar")]
    # the sample keeps 22 items: 6 shards of at most 4 (3 of at most 8: tests/jobs/test_build_pretrain.py)
    assert shards == [f"{root}/shards/image_text/image_text-{i:06d}.tar" for i in range(6)]
    assert "swap/shards/image_text/index.json" in keys and f"{root}/reports/summary.json" in keys
    summary = json.loads(bodies[f"{root}/reports/summary.json"])
    k = summary["kinds"]["image_text"]
    assert k["input"] == 40 and k["kept"] == k["shards"]["samples"] > 0
    assert len(shards) == -(-k["kept"] // FIRST_MAX_SAMPLES)
    assert k["input"] == k["kept"] + sum(k["dropped"].values()) + sum(k["quarantined"].values())
    ledger_parts = [k for k in keys if k.startswith(f"{root}/ledger/") and k.endswith(".parquet")]
    rows = [r for part in ledger_parts for r in pq.read_table(io.BytesIO(bodies[part])).to_pylist()]
    assert len(rows) == 40 and all(r["source"].startswith("s3://raw/sample/") for r in rows)
    n = 0
    for key in shards:
        with tarfile.open(fileobj=io.BytesIO(bodies[key])) as tf:
            n += sum(1 for m in tf.getmembers() if m.name.endswith(".jpg"))
    assert n == k["kept"]


def test_s3_runs_publish_whole_or_not_at_all(first_run, s3_server, sample_dir):
    """A failed run touches no object of the published one (`first_run`'s); a later run with fewer shards
    leaves none of the earlier run's shards visible (or stored); the trainer and jobs.report read through
    the manifests."""
    import boto3

    from filters.base import FAULT_RATE_ENV, FAULT_SITES_ENV
    from trainer.shards import shard_list

    s3 = boto3.client("s3")
    out = OUT
    args = ("--input", f"image_text={sample_dir}", "--output", out, *S3_ARGS)
    first = first_run["objects"]
    assert len(first_run["shards"]) > 3
    assert _objects(s3, "swap/") == first  # as the first run left it (test_s3_in_and_out only reads)

    # every shard-writer task fails (local[2] does not retry): the run dies after its features and ledger work
    failed = submit(*args, "--set", "shards.max_samples=40", check=False,
                    env={FAULT_RATE_ENV: "1", FAULT_SITES_ENV: "shards"})
    assert failed.returncode != 0
    leftover = _objects(s3, "swap/")
    assert {k: v for k, v in leftover.items() if k in first} == first  # nothing of the published run changed
    assert set(leftover) - set(first) <= {k for k in leftover if k.startswith("swap/.runs/")}  # only its own folder

    submit(*args, "--set", "shards.max_samples=40")
    listed = shard_list(f"{out}/shards/image_text")
    pointer = json.loads(s3.get_object(Bucket="curated", Key="swap/_LATEST")["Body"].read())
    assert [s.url for s in listed] == [f"{out}/.runs/{pointer['run']}/shards/image_text/image_text-000000.tar"]
    now = _objects(s3, "swap/")
    assert [k for k in now if k.endswith(".tar")] == [listed[0].url[len("s3://curated/"):]]
    assert not set(first) & set(now) - {"swap/_LATEST", "swap/shards/image_text/index.json",
                                        "swap/shards/image_text/sizes.json"}
    proc = subprocess.run([sys.executable, "-m", "jobs.report", out], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    page = s3.get_object(Bucket="curated", Key=f"swap/.runs/{pointer['run']}/reports/index.html")["Body"].read()
    assert b"index.json missing" not in page and b"published" in page
