"""Shard writer: even, deterministic shards; failed attempts leave nothing behind."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from pipelines.io import shards


def _sample(row):
    return {"__key__": row["sample_id"], "txt": row["text"].encode(), "json": json.dumps({"id": row["sample_id"]}).encode()}


def _batches(rows):
    return [pa.RecordBatch.from_pylist(rows)]


def test_partition_writes_one_tar_per_shard_and_reports_stats(tmp_path):
    rows = [{"sample_id": f"{i:04d}", "text": f"t{i}", "shard": f"k-{i // 3:06d}.tar"} for i in range(7)]
    stats = [r for b in shards.write_partition(iter(_batches(rows)), str(tmp_path), _sample) for r in b.to_pylist()]
    assert [(s["shard"], s["nsamples"]) for s in stats] == [("k-000000.tar", 3), ("k-000001.tar", 3), ("k-000002.tar", 1)]
    assert sorted(os.listdir(tmp_path)) == ["k-000000.tar", "k-000001.tar", "k-000002.tar"]
    first = (tmp_path / "k-000000.tar").read_bytes()
    again = tmp_path / "again"
    list(shards.write_partition(iter(_batches(rows)), str(again), _sample))
    assert (again / "k-000000.tar").read_bytes() == first  # fixed tar headers: byte-identical


def test_a_failing_attempt_leaves_no_partial_shard(tmp_path):
    rows = [{"sample_id": f"{i:04d}", "text": f"t{i}", "shard": "k-000000.tar"} for i in range(4)]

    def explode(row):
        if row["sample_id"] == "0002":
            raise RuntimeError("executor lost")
        return _sample(row)

    with pytest.raises(RuntimeError):
        list(shards.write_partition(iter(_batches(rows)), str(tmp_path), explode))
    assert os.listdir(tmp_path) == []


def test_assign_and_write_make_even_shards(spark, tmp_path):
    df = spark.createDataFrame([(f"{i:05d}", f"caption {i}") for i in range(23)], "sample_id string, text string")
    from pyspark.sql import functions as F

    index, n = shards.assign_shards(df, "k", max_samples=5, max_bytes=10**9, size_col=F.length("text"))
    assert n == 5
    assert sorted(index.columns) == ["sample_id", "shard"] and index.count() == 23
    # consecutive ids share a shard: the order is by sample_id
    names = [r.shard for r in index.orderBy("sample_id").collect()]
    assert names == sorted(names) and names[0] == "k-000000.tar" and names[-1] == "k-000004.tar"
    stats = shards.write_shards(df.join(index, "sample_id"), str(tmp_path / "staging"), _sample, n)
    counts = [s["nsamples"] for s in stats]
    assert sum(counts) == 23 and max(counts) - min(counts) <= 1
    by_bytes, m = shards.assign_shards(df, "k", max_samples=100, max_bytes=40, size_col=F.lit(10))
    assert m == 6  # 4 samples of 10 bytes fit in 40 bytes


def test_publish_renames_staging_and_writes_manifests_last(tmp_path):
    out = str(tmp_path)
    staging = shards.staging_dir(out, "k")
    os.makedirs(staging)
    open(os.path.join(staging, "k-000000.tar"), "wb").write(b"x" * 10)
    os.makedirs(shards.final_dir(out, "k"))
    open(os.path.join(shards.final_dir(out, "k"), "k-000099.tar"), "wb").write(b"old run")
    shards.publish(out, "k", [{"shard": "k-000000.tar", "nsamples": 1, "bytes": 10}])
    final = shards.final_dir(out, "k")
    assert sorted(os.listdir(final)) == ["index.json", "k-000000.tar", "sizes.json"]
    assert sorted(os.listdir(os.path.join(out, "shards"))) == ["k"]
    index = json.load(open(os.path.join(final, "index.json")))
    assert index["shardlist"] == [{"url": "k-000000.tar", "nsamples": 1, "filesize": 10}]
