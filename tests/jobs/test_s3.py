"""The job reads from and writes to s3:// through boto3, against a real S3 server on 127.0.0.1."""
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


def test_s3_in_and_out(s3_server, sample_dir):
    import tarfile

    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="raw")
    s3.create_bucket(Bucket="curated")
    for dirpath, _, files in os.walk(sample_dir):
        for f in files:
            path = os.path.join(dirpath, f)
            s3.upload_file(path, "raw", "sample/" + os.path.relpath(path, sample_dir))
    submit("--input", "image_text=s3://raw/sample", "--output", "s3://curated/run1", *S3_ARGS, "--set", "shards.max_samples=8")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="curated", Prefix="run1/")["Contents"])
    pointer = json.loads(s3.get_object(Bucket="curated", Key="run1/_LATEST")["Body"].read())
    root = f"run1/.runs/{pointer['run']}"
    shards = [k for k in keys if k.endswith(".tar")]
    assert shards == [f"{root}/shards/image_text/image_text-{i:06d}.tar" for i in range(3)]
    assert "run1/shards/image_text/index.json" in keys and f"{root}/reports/summary.json" in keys
    summary = json.loads(s3.get_object(Bucket="curated", Key=f"{root}/reports/summary.json")["Body"].read())
    k = summary["kinds"]["image_text"]
    assert k["input"] == 40 and k["kept"] == k["shards"]["samples"] > 0
    assert k["input"] == k["kept"] + sum(k["dropped"].values()) + sum(k["quarantined"].values())
    ledger_parts = [k for k in keys if k.startswith(f"{root}/ledger/") and k.endswith(".parquet")]
    rows = [r for part in ledger_parts
            for r in pq.read_table(io.BytesIO(s3.get_object(Bucket="curated", Key=part)["Body"].read())).to_pylist()]
    assert len(rows) == 40 and all(r["source"].startswith("s3://raw/sample/") for r in rows)
    n = 0
    for key in shards:
        body = s3.get_object(Bucket="curated", Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as tf:
            n += sum(1 for m in tf.getmembers() if m.name.endswith(".jpg"))
    assert n == k["kept"]


S3_ARGS = ("--set", "image_text.clip.pretrained=", "--set", "image_text.clip.allow_random_weights=true")


def _objects(s3, prefix: str) -> dict[str, tuple]:
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket="curated", Prefix=prefix) for o in page.get("Contents", [])}


def test_s3_runs_publish_whole_or_not_at_all(s3_server, sample_dir):
    """A failed run touches no object of the published one; a later run with fewer shards leaves none of
    the earlier run's shards visible (or stored); the trainer and jobs.report read through the manifests."""
    import boto3

    from filters.base import FAULT_RATE_ENV, FAULT_SITES_ENV
    from trainer.shards import shard_list

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="curated")
    out = "s3://curated/swap"
    args = ("--input", f"image_text={sample_dir}", "--output", out, *S3_ARGS)
    submit(*args, "--set", "shards.max_samples=4")
    first = _objects(s3, "swap/")
    assert len(shard_list(f"{out}/shards/image_text")) > 3

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
