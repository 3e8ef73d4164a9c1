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


def _sample_with_task(row):
    """The sample plus the Spark partition that wrote it (read back by the test below)."""
    from pyspark import TaskContext

    doc = {"id": row["sample_id"], "task": TaskContext.get().partitionId()}
    return {"__key__": row["sample_id"], "txt": row["text"].encode(), "json": json.dumps(doc).encode()}


def _read_tars(folder):
    import tarfile

    out = {}
    for name in sorted(os.listdir(folder)):
        with tarfile.open(os.path.join(folder, name)) as tf:
            out[name] = [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
    return out


@pytest.mark.parametrize("num_shards", [5, 8])
def test_each_shard_is_written_by_a_task_of_its_own(spark, tmp_path, num_shards):
    """Shard i goes to task i: no task writes two shards and none is left empty (hashing the shard
    names gave, for 5 shards, tasks of 3, 1 and 1 shards and two idle ones)."""
    from pyspark.sql import functions as F

    df = spark.createDataFrame([(f"{i:05d}", f"caption {i}") for i in range(num_shards * 4)],
                               "sample_id string, text string")
    index, n = shards.assign_shards(df, "k", max_samples=4, max_bytes=10**9, size_col=F.length("text"))
    assert n == num_shards
    shards.write_shards(df.join(index, "sample_id"), str(tmp_path / "s"), _sample_with_task, n)
    tars = _read_tars(tmp_path / "s")
    assert len(tars) == n
    tasks = {name: {d["task"] for d in docs} for name, docs in tars.items()}
    assert tasks == {shards.shard_name("k", i): {i} for i in range(n)}


def test_write_shards_gives_the_bytes_of_one_pass_per_shard(spark, tmp_path):
    """The exact partitioning changes who writes a shard, not its bytes: the same as writing each
    shard's rows, sorted by sample_id, in one write_partition pass."""
    from pyspark.sql import functions as F

    df = spark.createDataFrame([(f"{i * 7919 % 1000:05d}", f"caption {i}") for i in range(37)],
                               "sample_id string, text string")
    index, n = shards.assign_shards(df, "k", max_samples=6, max_bytes=10**9, size_col=F.length("text"))
    rows = sorted((r.asDict() for r in df.join(index, "sample_id").collect()), key=lambda r: (r["shard"], r["sample_id"]))
    list(shards.write_partition(iter(_batches(rows)), str(tmp_path / "reference"), _sample))
    stats = shards.write_shards(df.join(index, "sample_id"), str(tmp_path / "spark"), _sample, n)
    assert [s["shard"] for s in stats] == sorted(os.listdir(tmp_path / "reference"))
    for name in os.listdir(tmp_path / "reference"):
        assert (tmp_path / "spark" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_index_with_a_base_names_shards_by_absolute_url(tmp_path):
    """The S3 manifests at OUT/shards/<kind>/ point into the published run's prefix."""
    shards.write_index(str(tmp_path), [{"shard": "k-000000.tar", "nsamples": 2, "bytes": 9}],
                       base="s3://b/out/.runs/r1/shards/k")
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["shardlist"] == [{"url": "s3://b/out/.runs/r1/shards/k/k-000000.tar", "nsamples": 2, "filesize": 9}]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"s3://b/out/.runs/r1/shards/k/k-000000.tar": 2}


def test_tar_shard_writes_the_bytes_tarfile_writes(tmp_path):
    """TarShard builds ustar headers itself (tarfile's were most of the writer's CPU time): the same bytes,
    for short and long (prefix-split) names, non-ASCII names, and payloads on and off block boundaries."""
    import io
    import tarfile

    samples = [{"__key__": key, "jpg": b"x" * size, "json": b"{}"}
               for key, size in [("a" * 32, 0), ("é" * 10, 511), ("k/" * 60 + "z", 512), ("b", 513), ("c" * 90, 9000)]]
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as ref:
        for s in samples:
            for ext in ("jpg", "json"):
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(s[ext]), 0, 0o444, "vlcurate", "vlcurate"
                ref.addfile(info, io.BytesIO(s[ext]))
    ours = shards.TarShard(str(tmp_path / "ours.tar"))
    for s in samples:
        ours.write(s)
    ours.close()
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
