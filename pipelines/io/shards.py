"""The WebDataset shard writer: deterministic, even shards, each published atomically.

Kept rows are ordered by sample_id (a hash, so the order is a fixed shuffle), cut into
ceil(n / per_shard) shards of near-equal count, where per_shard is the smaller of max_samples and
max_bytes / mean sample size. Each shard is written by one task to a temporary name and renamed (or
uploaded as one S3 object) when complete, so a retried or speculative attempt rewrites identical
bytes and never leaves a partial or doubled shard. Tar headers carry fixed owner, mode and mtime.
A temporary file that a killed attempt could not remove is deleted at publish time.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from filters.base import FaultPlan, arrow_only
from pipelines.checkpoint import cached, fetch_small
from pipelines.io import storage
from schemas.common import SAMPLE_ID
from schemas.contract import Contract

SHARD_STATS = pa.schema([
    pa.field("shard", pa.string()), pa.field("nsamples", pa.int64()), pa.field("bytes", pa.int64()),
])


def shard_name(kind: str, index: int) -> str:
    return f"{kind}-{index:06d}.tar"


def set_of(shard: str) -> str:
    """The shard set (its folder under shards/) a shard belongs to: the name without `-NNNNNN.tar`. A kind
    writes its own set (named after it) and may write more (interleaved_long)."""
    return shard.rsplit("-", 1)[0]


def by_set(kind: str, stats: list[dict]) -> dict[str, list[dict]]:
    """A kind's per-shard stats by shard set; the kind's own set is always there (maybe empty)."""
    out: dict[str, list[dict]] = {kind: []}
    for s in stats:
        out.setdefault(set_of(s["shard"]), []).append(s)
    return out


BUCKET_CHARS = 3  # sample ids are 32 hex digits: at most 16^3 = 4,096 buckets, whatever the number of rows


def shard_starts(n: int, num_shards: int) -> list[int]:
    """The global rank at which each shard starts, and n at the end: shard i holds the ranks
    [ceil(i n / S), ceil((i + 1) n / S)), so shard sizes differ by at most one. No rows: no shards, [0]."""
    return [-(-i * n // num_shards) for i in range(num_shards)] + [n]


def plan_buckets(counts: list[tuple[str, int]], num_shards: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """From the row count of every bucket (in sample_id order): the shard of each bucket's first row,
    and the shard boundaries that fall inside a bucket, as (bucket, rank within the bucket) with a
    rank above 0 (a boundary at a bucket's first row is that bucket's first shard)."""
    n = sum(c for _, c in counts)
    starts = shard_starts(n, num_shards)
    first, inside, offset, i = [], [], 0, 1
    for bucket, count in counts:
        first.append((bucket, offset * num_shards // n))
        while i < num_shards and starts[i] < offset + count:
            if starts[i] > offset:
                inside.append((bucket, starts[i] - offset))
            i += 1
        offset += count
    return first, inside


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Which shard every row of a table goes to, kept as a small per-bucket table: the rows ordered by
    sample_id, ranked, cut into `count` shards of near-equal size (`sizes`). A row's shard is its
    bucket's first shard plus the number of that bucket's boundary ids at or below its sample_id: a
    broadcast join and an array filter, no shuffle and no Python per row."""

    kind: str
    count: int
    sizes: list[int]  # samples per shard, exact
    buckets: Any  # DataFrame: _bucket, _first (shard of the bucket's first row), _bounds (sorted ids)
    index: Any = None  # DataFrame: (sample_id, shard) of every row, materialised (the ledger's)

    def of(self, rows):
        """`rows` with `_shard` (the shard's number) and `shard` (its name)."""
        from pyspark.sql import functions as F

        # a SQL lambda: pyspark's Python one (F.filter) costs 0.3 s of py4j calls and class loading on first use
        bounds = F.expr(f"size(filter(_bounds, b -> b <= {SAMPLE_ID}))")
        return (rows.withColumn("_bucket", _bucket(F)).join(F.broadcast(self.buckets), "_bucket")
                .withColumn("_shard", (F.col("_first") + bounds).cast("int"))
                .withColumn("shard", F.format_string(f"{self.kind}-%06d.tar", F.col("_shard")))
                .drop("_bucket", "_first", "_bounds"))


def _bucket(F):
    return F.substring(SAMPLE_ID, 1, BUCKET_CHARS)


def assign_shards(alive, kind: str, max_samples: int, max_bytes: int, size_col) -> Assignment:
    """Assign every row of `alive` to a shard. size_col: a Column giving a sample's bytes. Only narrow
    columns are read here (sample_id and the size); the media go through Spark once, in the writer.

    A table of at most LOCAL_ROWS rows (`fetch_small`: one limited collect) is assigned on the driver
    (`_assign_fetched`) and its index travels in the plan, as every small table of a run does: one
    Spark query where the steps below are three (2,000 local pairs: the shards phase 2.4-2.9 -> 1.5-2.0 s).

    A larger one is assigned in the JVM, nothing per row on the driver and no single-partition sort:
    the row count and bytes of each sample_id prefix bucket (an aggregation; at most 16^BUCKET_CHARS
    rows collected), from which the driver places every shard start (a global rank) in its bucket; then
    the sample_id at each start that falls inside a bucket, found by ranking the rows of those buckets
    only (a window per bucket; count - 1 ids at most collected); then the index (sample_id, shard),
    materialised for the ledger. A prefix orders the buckets as the ids themselves (truncation keeps
    string order), so skewed buckets (ids that are not hashes) change the cost, never the result. Both
    give every id the shard of its global rank (rank * count // n), whatever the partitioning."""
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    spark = alive.sparkSession
    narrow = alive.select(SAMPLE_ID, size_col.alias("_size"))
    fetched = fetch_small(narrow)
    if fetched is not None:
        return _assign_fetched(spark, kind, fetched, max_samples, max_bytes)
    narrow = narrow.persist(StorageLevel.MEMORY_AND_DISK)  # read twice below and once for the index
    rows = (narrow.groupBy(_bucket(F).alias("_bucket"))
            .agg(F.count("*").alias("n"), F.count("_size").alias("sized"), F.sum("_size").alias("bytes")).collect())
    # Python orders str by code point, Spark by UTF-8 bytes: the same order
    counts = sorted((r["_bucket"], int(r["n"])) for r in rows)
    n = sum(c for _, c in counts)
    num_shards = shard_count(n, sum(float(r["bytes"] or 0) for r in rows), sum(int(r["sized"]) for r in rows),
                             max_samples, max_bytes)
    first, inside = plan_buckets(counts, num_shards)
    bounds: dict[str, list[str]] = {}
    if inside:
        # Arrow tables become local relations: a list would become a Python RDD, a job of Python tasks
        wanted = spark.createDataFrame(pa.table({"_bucket": [b for b, _ in inside],
                                                 "_q": pa.array([q for _, q in inside], pa.int32())}))
        split = spark.createDataFrame(pa.table({"_bucket": sorted({b for b, _ in inside})}))
        ranked = (narrow.select(SAMPLE_ID, _bucket(F).alias("_bucket"))
                  .join(F.broadcast(split), "_bucket", "left_semi")
                  .withColumn("_q", (F.row_number().over(Window.partitionBy("_bucket").orderBy(SAMPLE_ID)) - 1).cast("int"))
                  .join(F.broadcast(wanted), ["_bucket", "_q"])
                  .select("_bucket", "_q", SAMPLE_ID).collect())
        if len(ranked) != len(inside):
            raise RuntimeError(f"{kind}: {len(ranked)} of {len(inside)} shard boundaries found: the rows changed "
                               "between two reads (a nondeterministic input) or sample_ids repeat")
        for r in sorted(ranked, key=lambda r: (r["_bucket"], r["_q"])):
            bounds.setdefault(r["_bucket"], []).append(r[SAMPLE_ID])
    return _assignment(kind, num_shards, shard_sizes(n, num_shards), _bucket_table(spark, first, bounds), narrow)


def shard_count(n: int, total_bytes: float, sized: int, max_samples: int, max_bytes: int) -> int:
    """Shards for n samples: per shard the smaller of max_samples and max_bytes / the mean size of the
    `sized` samples (those whose size is known) holding total_bytes."""
    per_shard = max(1, min(max_samples, int(max_bytes // max(1.0, total_bytes / max(1, sized)))))
    return math.ceil(n / per_shard)


def shard_sizes(n: int, num_shards: int) -> list[int]:
    return [b - a for a, b in itertools.pairwise(shard_starts(n, num_shards))]


def _assign_fetched(spark, kind: str, table: pa.Table, max_samples: int, max_bytes: int) -> Assignment:
    """The assignment of a fetched (sample_id, _size) table, on the driver: the ids sorted (Arrow
    orders strings by their UTF-8 bytes, as Spark does), the shard of rank r is r * count // n, and the
    bucket table the writer joins on is the JVM path's (`plan_buckets` over the same ranks)."""
    import pyarrow.compute as pc

    ids = table.column(SAMPLE_ID)
    if pc.count(ids, mode="only_null").as_py() or pc.count_distinct(ids).as_py() != len(ids):
        raise RuntimeError(f"{kind}: sample_ids repeat or are missing: shards cannot be assigned")
    ids = pc.take(ids, pc.sort_indices(ids)).to_pylist()
    n, size = len(ids), table.column("_size")
    num_shards = shard_count(n, float(pc.sum(size).as_py() or 0), n - size.null_count, max_samples, max_bytes)
    counts = [(b, len(list(g))) for b, g in itertools.groupby(i[:BUCKET_CHARS] for i in ids)]
    first, inside = plan_buckets(counts, num_shards)
    offset, at = {}, 0  # each bucket's first rank
    for b, c in counts:
        offset[b], at = at, at + c
    bounds: dict[str, list[str]] = {}
    for b, q in inside:
        bounds.setdefault(b, []).append(ids[offset[b] + q])
    index = spark.createDataFrame(pa.table({
        SAMPLE_ID: pa.array(ids, pa.string()),
        "shard": pa.array([shard_name(kind, r * num_shards // n) for r in range(n)], pa.string()),
    }))
    return Assignment(kind, num_shards, shard_sizes(n, num_shards), _bucket_table(spark, first, bounds), index)


def _assignment(kind: str, count: int, sizes: list[int], buckets, narrow) -> Assignment:
    """The assignment with its index materialised from the narrow rows (which are then released)."""
    plain = Assignment(kind, count, sizes, buckets)
    index = cached(plain.of(narrow.select(SAMPLE_ID)).select(SAMPLE_ID, "shard"))
    narrow.unpersist()
    return dataclasses.replace(plain, index=index)


def _bucket_table(spark, first: list[tuple[str, int]], bounds: dict[str, list[str]]):
    return spark.createDataFrame(pa.table({
        "_bucket": pa.array([b for b, _ in first], pa.string()),
        "_first": pa.array([s for _, s in first], pa.int32()),
        "_bounds": pa.array([bounds.get(b, []) for b, _ in first], pa.list_(pa.string())),
    }))


SHARDS_PER_TASK = 16
BLOCK, RECORD = 512, 20 * 512  # tar block; a tar file is a whole number of records (tarfile's default)
_OWNER = b"vlcurate".ljust(32, b"\0")
# a ustar header after its name field: mode 0444, uid/gid 0 | size | mtime 0, checksum (spaces while summed),
# regular file, no link, magic, owner names, no device, no prefix
_MODE_IDS = b"0000444\0" + b"0000000\0" * 2
_REST = (b"00000000000\0" + b" " * 8 + b"0" + b"\0" * 100 + b"ustar\x0000" + _OWNER + _OWNER + b"\0" * 16
         + b"\0" * 155).ljust(BLOCK - 100 - 24 - 12, b"\0")


def tar_header(name: str, size: int) -> bytes:
    """The ustar header tarfile writes for a regular file with TarShard's fixed owner, mode and mtime,
    built directly (tarfile's own is most of a shard's CPU time); tarfile itself for names it has to split."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or not 0 <= size < 8 ** 11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o444
        info.uname = info.gname = "vlcurate"
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    head = raw.ljust(100, b"\0") + _MODE_IDS + b"%011o\0" % size + _REST
    return head[:148] + b"%06o\0" % sum(head) + head[155:]


class TarShard:
    """A WebDataset tar: each sample's files as `{__key__}.{ext}` members, in the sample's order, with
    fixed owner, mode and mtime so equal samples give equal bytes: the bytes tarfile writes (ustar), without
    its per-member cost. (webdataset's own TarWriter imports torch, half a GiB per writer process.)"""

    def __init__(self, path: str):
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.offset = 0

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for ext, payload in sample.items():
            if ext.startswith("__"):
                continue
            self.file.write(tar_header(f"{key}.{ext}", len(payload)))
            self.file.write(payload)
            pad = -len(payload) % BLOCK
            if pad:
                self.file.write(b"\0" * pad)
            self.offset += BLOCK + len(payload) + pad

    def close(self) -> None:
        end = self.offset + 2 * BLOCK  # two empty blocks, then zeros up to a whole record
        self.file.write(b"\0" * (2 * BLOCK + -end % RECORD))
        self.file.close()


def write_partition(batches: Iterator[pa.RecordBatch], out_dir: str, to_sample: Callable[[dict], dict],
                    contract: Contract | None = None, fault: FaultPlan | None = None) -> Iterator[pa.RecordBatch]:
    """Write the shards of one partition (rows sorted by shard, then sample_id). Every sample is checked
    against the kind's `contract` first: one that breaks it is a pipeline bug and fails the task
    (ContractViolation), never a silently malformed shard. `fault`: test only, fails a chosen first
    attempt right after its first sample, mid-shard."""
    arrow_only()
    staging = storage.staging_dir(out_dir)
    current, writer, tmp_path, count = None, None, None, 0

    def finish():
        if writer is None:
            return None
        writer.close()
        size = os.path.getsize(tmp_path)
        storage.publish_file(tmp_path, storage.join(out_dir, current))
        return pa.RecordBatch.from_pylist([{"shard": current, "nsamples": count, "bytes": size}], schema=SHARD_STATS)

    try:
        for batch in batches:
            for row in batch.to_pylist():
                if row["shard"] != current:
                    done = finish()
                    if done is not None:
                        yield done
                    current, count = row["shard"], 0
                    tmp_path = os.path.join(staging, f".{current}.{uuid.uuid4().hex}.tmp")
                    writer = TarShard(tmp_path)
                sample = to_sample(row)
                if contract is not None:
                    contract.validate(sample)
                writer.write(sample)
                count += 1
                if fault is not None:
                    fault.strike()
                    fault = None
        done = finish()
        writer = None
        if done is not None:
            yield done
    finally:
        if writer is not None:  # failed mid-shard: leave nothing behind; Spark retries the task
            try:
                writer.close()
            finally:
                if tmp_path and os.path.exists(tmp_path):
                    os.remove(tmp_path)
        if storage.is_s3(out_dir):
            shutil.rmtree(staging, ignore_errors=True)  # this task's local temp dir


def final_dir(out: str, kind: str) -> str:
    return storage.join(out, "shards", kind)


def staging_dir(out: str, kind: str) -> str:
    """Local output: shards are written here and the folder is renamed at publish time. S3 has no
    folder rename: shards go to their final keys and the manifests, written last, publish them.
    `out` is the run's own folder (pipelines/io/runs.py), never seen by readers before it is published."""
    return final_dir(out, kind) if storage.is_s3(out) else storage.join(out, "shards", f".staging-{kind}")


def publish(out: str, kind: str, stats: list[dict]) -> None:
    """Make a finished run's shards visible. Local: drop from the staging folder whatever is not one of
    this run's shards (a killed attempt's .tmp file), write sizes.json and index.json (the manifest a
    reader trusts) into it, and swap it in for the previous run's folder in one step. S3: the shards
    are at their keys already; the manifests, written last, publish them."""
    final = final_dir(out, kind)
    if storage.is_s3(out):
        write_index(final, stats)
        return
    staging = staging_dir(out, kind)
    os.makedirs(staging, exist_ok=True)
    names = {s["shard"] for s in stats}
    for name in os.listdir(staging):
        path = os.path.join(staging, name)
        if name in names:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    missing = names - set(os.listdir(staging))
    if missing:
        raise RuntimeError(f"shards missing from {staging}: {sorted(missing)[:5]}")
    write_index(staging, stats)
    old = storage.join(out, "shards", f".previous-{kind}")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final) and _exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous run's folder
        return
    if os.path.exists(final):  # no atomic exchange here: a brief gap with no folder at `final`
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_index(out_dir: str, stats: list[dict], base: str | None = None) -> None:
    """sizes.json and the wids index.json; written last, after every shard is in place. Shard urls are
    relative to out_dir, or absolute under `base` (the S3 manifests at OUT/shards/<kind>/ that point
    into the published run's prefix)."""
    stats = sorted(stats, key=lambda s: s["shard"])

    def url(name: str) -> str:
        return storage.join(base, name) if base else name

    sizes = {url(s["shard"]): int(s["nsamples"]) for s in stats}
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "shardlist": [{"url": url(s["shard"]), "nsamples": int(s["nsamples"]), "filesize": int(s["bytes"])}
                      for s in stats],
    }
    storage.write_bytes(storage.join(out_dir, "sizes.json"), json.dumps(sizes, indent=1).encode())
    storage.write_bytes(storage.join(out_dir, "index.json"), json.dumps(index, indent=1).encode())


def shards_per_task(num_shards: int, cores: int) -> int:
    """How many consecutive shards one writer task writes: enough tasks to keep every core busy
    twice over, no more. A Python task costs ~0.1-0.2 s to start whatever it writes, and a stage of one
    task per shard is millions of tasks at a billion items; at most SHARDS_PER_TASK, so that a retried
    task rewrites little."""
    return max(1, min(SHARDS_PER_TASK, num_shards // max(1, 2 * cores)))


def route_to_tasks(rows, num_tasks: int):
    """`rows` (with `_task`, the number of the writer task) in num_tasks partitions, task i's rows in
    partition i. Spark 4.1+ sends a row to the partition its `_task` names (repartitionById). Before
    that, hash partitioning on the number itself put several tasks' rows in one partition and left
    others empty, and range partitioning samples the lineage once more for its bounds and does not cut
    exactly either: there, each task i gets a routing key k_i with pmod(murmur3(k_i), n) == i (see
    `_route_by_hash`)."""
    if hasattr(rows, "repartitionById"):
        return rows.repartitionById(num_tasks, "_task").drop("_task")
    return _route_by_hash(rows, num_tasks)


def _route_by_hash(rows, num_tasks: int):
    """Spark 4.0: keys found by hashing a few candidates per task in one tiny job (Spark's own hash(),
    the function hash partitioning uses), the rows hash-partitioned on their task's key."""
    from pyspark.sql import functions as F

    spark = rows.sparkSession
    for per in (32, 256):  # a task without a candidate among 32 has odds of about e^-32
        keys = (spark.range(0, num_tasks * per)
                .select(F.expr(f"pmod(hash(id), {num_tasks})").cast("int").alias("_index"), F.col("id").alias("_key"))
                .groupBy("_index").agg(F.min("_key").alias("_key")))
        keys = cached(keys.coalesce(1))  # num_tasks small rows, broadcast below: one partition, not 64
        if keys.count() == num_tasks:
            break
    else:
        raise RuntimeError(f"no routing key found for some of {num_tasks} tasks")
    routed = rows.join(F.broadcast(keys), F.col("_task") == F.col("_index")).drop("_index", "_task")
    return routed.repartition(num_tasks, "_key").drop("_key")


def write_shards(rows, assigned: Assignment, out_dir: str, to_sample: Callable[[dict], dict],
                 contract: Contract | None = None) -> list[dict]:
    """Write `rows` (those `assigned` was made from) as tars under out_dir, each shard whole by one task,
    a few consecutive shards per task (`shards_per_task`); returns per-shard stats (small), checked
    against the assignment's exact sizes."""
    from pyspark.sql import functions as F

    from schemas.common import spark_type

    if not storage.is_s3(out_dir):
        storage.remove_tree(out_dir)  # leftovers of an earlier, failed run must not be published
    if assigned.count == 0:
        return []
    per = shards_per_task(assigned.count, rows.sparkSession.sparkContext.defaultParallelism)
    tasks = assigned.of(rows).withColumn("_task", F.expr(f"_shard div {per}").cast("int")).drop("_shard")
    # a task's shards are consecutive, so its rows sorted by sample_id come shard by shard
    parts = route_to_tasks(tasks, math.ceil(assigned.count / per)).sortWithinPartitions(SAMPLE_ID)
    fault = FaultPlan.from_env("shards")  # None outside fault-injection tests
    stats = parts.mapInArrow(lambda it: write_partition(it, out_dir, to_sample, contract, fault), spark_type(SHARD_STATS))
    # sorted here, not with orderBy: its range-partitioning sample would run the writer a second time
    out = sorted((r.asDict() for r in stats.collect()), key=lambda r: r["shard"])
    if len({r["shard"] for r in out}) != len(out):
        raise RuntimeError("a shard was written by two partitions: shard assignment is broken")
    written = {r["shard"]: r["nsamples"] for r in out}
    expected = {shard_name(assigned.kind, i): size for i, size in enumerate(assigned.sizes)}
    if written != expected:
        wrong = sorted(k for k in expected.keys() | written.keys() if written.get(k) != expected.get(k))
        raise RuntimeError(f"shards differ from their assignment (the rows changed between reads?): {wrong[:5]}")
    return out
