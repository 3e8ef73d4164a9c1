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


@pytest.fixture(params=["driver", "jvm"])
def assign_on(request, monkeypatch):
    """Shard assignment both ways: a table of at most LOCAL_ROWS rows is assigned on the driver, a
    larger one in the JVM; LOCAL_ROWS = 0 sends every non-empty table to the JVM path."""
    from pipelines import checkpoint

    if request.param == "jvm":
        monkeypatch.setattr(checkpoint, "LOCAL_ROWS", 0)
    return request.param


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


def test_assign_and_write_make_even_shards(spark, tmp_path, assign_on):
    df = spark.createDataFrame([(f"{i:05d}", f"caption {i}") for i in range(23)], "sample_id string, text string")
    from pyspark.sql import functions as F

    assigned = shards.assign_shards(df, "k", max_samples=5, max_bytes=10**9, size_col=F.length("text"))
    assert assigned.count == 5 and assigned.sizes == [5, 5, 4, 5, 4]
    index = assigned.index
    assert sorted(index.columns) == ["sample_id", "shard"] and index.count() == 23
    # consecutive ids share a shard: the order is by sample_id
    names = [r.shard for r in index.orderBy("sample_id").collect()]
    assert names == sorted(names) and names[0] == "k-000000.tar" and names[-1] == "k-000004.tar"
    stats = shards.write_shards(df, assigned, str(tmp_path / "staging"), _sample)
    assert [s["nsamples"] for s in stats] == assigned.sizes
    by_bytes = shards.assign_shards(df, "k", max_samples=100, max_bytes=40, size_col=F.lit(10))
    assert by_bytes.count == 6  # 4 samples of 10 bytes fit in 40 bytes


def test_publish_renames_staging_and_writes_manifests_last(tmp_path):
    out = str(tmp_path)
    staging = shards.staging_dir(out, "k")
    os.makedirs(staging)
    with open(os.path.join(staging, "k-000000.tar"), "wb") as f:
        f.write(b"x" * 10)
    os.makedirs(shards.final_dir(out, "k"))
    with open(os.path.join(shards.final_dir(out, "k"), "k-000099.tar"), "wb") as f:
        f.write(b"old run")
    shards.publish(out, "k", [{"shard": "k-000000.tar", "nsamples": 1, "bytes": 10}])
    final = shards.final_dir(out, "k")
    assert sorted(os.listdir(final)) == ["index.json", "k-000000.tar", "sizes.json"]
    assert sorted(os.listdir(os.path.join(out, "shards"))) == ["k"]
    with open(os.path.join(final, "index.json")) as f:
        index = json.load(f)
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


def test_shards_per_task_keeps_every_core_busy_twice_and_caps_a_retry():
    assert shards.shards_per_task(4, 2) == 1  # fewer shards than 2 tasks per core: one each
    assert shards.shards_per_task(24, 2) == 6
    assert shards.shards_per_task(41, 2) == 10
    assert shards.shards_per_task(2_000_000, 500) == shards.SHARDS_PER_TASK


@pytest.mark.parametrize("num_shards", [5, 8, 17])
def test_each_task_writes_its_own_consecutive_shards(spark, tmp_path, num_shards, assign_on):
    """Shard i goes to task i // per: each shard is written whole by one task, tasks get equal runs of
    consecutive shards and none is left empty (hashing the shard names gave, for 5 shards, tasks of 3,
    1 and 1 shards and two idle ones)."""
    from pyspark.sql import functions as F

    df = spark.createDataFrame([(f"{i:05d}", f"caption {i}") for i in range(num_shards * 4)],
                               "sample_id string, text string")
    assigned = shards.assign_shards(df, "k", max_samples=4, max_bytes=10**9, size_col=F.length("text"))
    n = assigned.count
    assert n == num_shards
    shards.write_shards(df, assigned, str(tmp_path / "s"), _sample_with_task)
    tars = _read_tars(tmp_path / "s")
    assert len(tars) == n
    tasks = {name: {d["task"] for d in docs} for name, docs in tars.items()}
    per = shards.shards_per_task(n, spark.sparkContext.defaultParallelism)
    assert tasks == {shards.shard_name("k", i): {i // per} for i in range(n)}


def test_write_shards_gives_the_bytes_of_one_pass_per_shard(spark, tmp_path, assign_on):
    """The exact partitioning changes who writes a shard, not its bytes: the same as writing each
    shard's rows, sorted by sample_id, in one write_partition pass."""
    from pyspark.sql import functions as F

    df = spark.createDataFrame([(f"{i * 7919 % 1000:05d}", f"caption {i}") for i in range(37)],
                               "sample_id string, text string")
    assigned = shards.assign_shards(df, "k", max_samples=6, max_bytes=10**9, size_col=F.length("text"))
    rows = sorted((r.asDict() for r in df.join(assigned.index, "sample_id").collect()),
                  key=lambda r: (r["shard"], r["sample_id"]))
    list(shards.write_partition(iter(_batches(rows)), str(tmp_path / "reference"), _sample))
    stats = shards.write_shards(df, assigned, str(tmp_path / "spark"), _sample)
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


def test_plan_buckets_places_every_shard_start():
    """Shard i starts at rank ceil(i n / S); a start inside a bucket is a (bucket, rank in bucket) boundary,
    one at a bucket's first row makes that the bucket's first shard. A skewed bucket holds several starts."""
    counts = [("a", 1), ("b", 9), ("c", 2), ("d", 1)]  # n = 13, ranks: a 0 | b 1-9 | c 10-11 | d 12
    assert shards.shard_starts(13, 4) == [0, 4, 7, 10, 13]
    assert shards.shard_starts(0, 0) == [0] and shards.plan_buckets([], 0) == ([], [])  # no rows
    first, inside = shards.plan_buckets(counts, 4)
    assert first == [("a", 0), ("b", 0), ("c", 3), ("d", 3)]
    assert inside == [("b", 3), ("b", 6)]  # ranks 4 and 7; rank 10 is c's first row
    assert shards.plan_buckets([("z", 5)], 1) == ([("z", 0)], [])
    first, inside = shards.plan_buckets([("a", 2), ("b", 2)], 4)  # one sample per shard
    assert first == [("a", 0), ("b", 2)] and inside == [("a", 1), ("b", 1)]


def _reference_shards(ids, per_shard):
    """rank * S // n over ids sorted: the assignment by definition."""
    import math

    n = len(ids)
    s = math.ceil(n / per_shard)
    return {sid: f"k-{rank * s // n:06d}.tar" for rank, sid in enumerate(sorted(ids))}


@pytest.mark.parametrize("partitions", [1, 3, 7])
def test_assignment_is_exact_and_independent_of_partitioning(spark, partitions, assign_on):
    """Hash-like ids and skewed ones (a third share one prefix, some are shorter than a bucket's prefix):
    every id gets its shard by global rank, whatever the partitioning of the input."""
    import hashlib

    from pyspark.sql import functions as F

    ids = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(200)]
    ids += [f"fff{i:04d}" for i in range(100)] + ["f", "ff", "0"]
    df = spark.createDataFrame([(i,) for i in ids], "sample_id string").repartition(partitions)
    assigned = shards.assign_shards(df, "k", max_samples=7, max_bytes=10**9, size_col=F.lit(1))
    got = {r.sample_id: r.shard for r in assigned.index.collect()}
    assert got == _reference_shards(ids, 7)
    counts = sorted({list(got.values()).count(s) for s in set(got.values())})
    assert assigned.count == 44 and counts == [6, 7] and sum(assigned.sizes) == len(ids)


def test_one_bucket_holding_every_row_is_cut_exactly(spark, assign_on):
    from pyspark.sql import functions as F

    ids = [f"abc{i:05d}" for i in range(50)]
    df = spark.createDataFrame([(i,) for i in ids], "sample_id string")
    assigned = shards.assign_shards(df, "k", max_samples=3, max_bytes=10**9, size_col=F.lit(1))
    assert {r.sample_id: r.shard for r in assigned.index.collect()} == _reference_shards(ids, 3)


def test_empty_input_assigns_and_writes_nothing(spark, tmp_path, assign_on):
    from pyspark.sql import functions as F

    df = spark.createDataFrame([], "sample_id string, text string")
    assigned = shards.assign_shards(df, "k", max_samples=3, max_bytes=10**9, size_col=F.lit(1))
    assert assigned.count == 0 and assigned.index.count() == 0
    assert shards.write_shards(df, assigned, str(tmp_path / "s"), _sample) == []


def test_rows_that_differ_from_the_assignment_fail_the_write(spark, tmp_path, assign_on):
    """The writer checks each shard's count against the assignment: rows that changed between the reads
    (a nondeterministic input) fail the run rather than give uneven or missing shards."""
    from pyspark.sql import functions as F

    df = spark.createDataFrame([(f"{i:05d}", f"caption {i}") for i in range(20)], "sample_id string, text string")
    assigned = shards.assign_shards(df, "k", max_samples=5, max_bytes=10**9, size_col=F.lit(1))
    with pytest.raises(RuntimeError, match="differ from their assignment"):
        shards.write_shards(df.filter(F.col("sample_id") != "00003"), assigned, str(tmp_path / "s"), _sample)


def test_hash_routing_of_older_sparks_gives_each_task_its_partition(spark):
    """Spark 4.0 has no repartitionById: rows are routed by a key whose hash lands in their task's partition."""
    from pyspark.sql import functions as F

    rows = spark.range(0, 60).select(F.col("id").cast("string").alias("sample_id"), (F.col("id") % 6).cast("int").alias("_task"))
    routed = shards._route_by_hash(rows.withColumn("s", F.col("_task")), 6)
    placed = routed.select("s", F.spark_partition_id().alias("p")).distinct().collect()
    assert sorted((r.s, r.p) for r in placed) == [(i, i) for i in range(6)]


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
