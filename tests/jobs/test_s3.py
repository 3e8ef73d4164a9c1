"""The job reads from and writes to s3:// through boto3, against a real S3 server on 127.0.0.1."""
from __future__ import annotations

import io
import json
import os

import pyarrow.parquet as pq

from tests.jobs.test_build_pretrain import submit


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
    submit("--input", "image_text=s3://raw/sample", "--output", "s3://curated/run1",
           "--set", "shards.max_samples=8", "--set", "image_text.clip.pretrained=")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="curated", Prefix="run1/")["Contents"])
    shards = [k for k in keys if k.endswith(".tar")]
    assert shards == [f"run1/shards/image_text/image_text-{i:06d}.tar" for i in range(3)]
    assert "run1/shards/image_text/index.json" in keys and "run1/reports/summary.json" in keys
    summary = json.loads(s3.get_object(Bucket="curated", Key="run1/reports/summary.json")["Body"].read())
    k = summary["kinds"]["image_text"]
    assert k["input"] == 40 and k["kept"] == k["shards"]["samples"] > 0
    assert k["input"] == k["kept"] + sum(k["dropped"].values()) + sum(k["quarantined"].values())
    ledger_parts = [k for k in keys if k.startswith("run1/ledger/") and k.endswith(".parquet")]
    rows = [r for part in ledger_parts
            for r in pq.read_table(io.BytesIO(s3.get_object(Bucket="curated", Key=part)["Body"].read())).to_pylist()]
    assert len(rows) == 40 and all(r["source"].startswith("s3://raw/sample/") for r in rows)
    n = 0
    for key in shards:
        body = s3.get_object(Bucket="curated", Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as tf:
            n += sum(1 for m in tf.getmembers() if m.name.endswith(".jpg"))
    assert n == k["kept"]
