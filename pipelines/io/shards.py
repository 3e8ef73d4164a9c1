"""The WebDataset shard writer: deterministic, even shards, each published atomically.

Kept rows are ordered by sample_id (a hash, so the order is a fixed shuffle), cut into
ceil(n / per_shard) shards of near-equal count, where per_shard is the smaller of max_samples and
max_bytes / mean sample size. Each shard is written by one task to a temporary name and renamed (or
uploaded as one S3 object) when complete, so a retried or speculative attempt rewrites identical
bytes and never leaves a partial or doubled shard. Tar headers carry fixed owner, mode and mtime.
A temporary file that a killed attempt could not remove is deleted at publish time.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterator

import pyarrow as pa

from filters.base import FaultPlan
from pipelines.checkpoint import cached
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


def assign_shards(alive, kind: str, max_samples: int, max_bytes: int, size_col):
    """(index, number of shards): index is a small DataFrame (sample_id, shard) of every row of `alive`,
    materialised. size_col: a Column giving a sample's bytes. Only narrow columns are read here: the
    image bytes go through Spark once, in the writer."""
    from pyspark.sql import functions as F

    narrow = alive.select(SAMPLE_ID, size_col.alias("size")).localCheckpoint()
    stats = narrow.agg(F.count("*").alias("n"), F.avg("size").alias("mean")).first()
    n = int(stats["n"])
    spark = alive.sparkSession
    if n == 0:
        return spark.createDataFrame([], "sample_id string, shard string"), 0
    per_shard = max(1, min(max_samples, int(max_bytes // max(1.0, float(stats["mean"])))))
    num_shards = math.ceil(n / per_shard)
    # global position by sample_id without pulling ids to the driver: zipWithIndex over a sorted RDD
    order = narrow.select(SAMPLE_ID).orderBy(SAMPLE_ID).rdd.map(lambda r: r[0]).zipWithIndex()
    index = spark.createDataFrame(order.map(lambda p: (p[0], p[1] * num_shards // n)), "sample_id string, shard_index long")
    names = F.format_string(f"{kind}-%06d.tar", F.col("shard_index"))
    return cached(index.select(SAMPLE_ID, names.alias("shard"))), num_shards


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


def one_shard_per_partition(kept, num_shards: int):
    """`kept` (with a `shard` column named `<kind>-NNNNNN.tar`) in num_shards partitions, shard i in
    partition i: one task writes exactly one shard. Hash partitioning on the name put several shards in
    one task and left others empty (5 shards: tasks of 3, 1, 1, 0, 0); range partitioning samples the
    whole lineage once more for its bounds and does not cut exactly either. So each shard index i gets
    a routing key k_i with pmod(murmur3(k_i), n) == i, found by hashing a few candidates per shard in one
    tiny job (Spark's own hash(), the function hash partitioning uses), and the rows are hash-partitioned
    on that key: an exact, JVM-only shuffle."""
    from pyspark.sql import functions as F

    spark = kept.sparkSession
    for per in (32, 256):  # a shard without a candidate among 32 has odds of about e^-32
        keys = (spark.range(0, num_shards * per)
                .select(F.expr(f"pmod(hash(id), {num_shards})").alias("_index"), F.col("id").alias("_key"))
                .groupBy("_index").agg(F.min("_key").alias("_key")))
        keys = cached(keys.coalesce(1))  # num_shards small rows, broadcast below: one partition, not 64
        if keys.count() == num_shards:
            break
    else:
        raise RuntimeError(f"no routing key found for some of {num_shards} shards")
    index = F.regexp_extract("shard", r"-(\d+)\.tar$", 1).cast("long")
    routed = kept.join(F.broadcast(keys), index == F.col("_index")).drop("_index")
    return routed.repartition(num_shards, "_key").drop("_key")


def write_shards(kept, out_dir: str, to_sample: Callable[[dict], dict], num_shards: int,
                 contract: Contract | None = None) -> list[dict]:
    """Write `kept` (with a `shard` column) as tars under out_dir; returns per-shard stats (small)."""
    from schemas.common import spark_type

    if not storage.is_s3(out_dir):
        storage.remove_tree(out_dir)  # leftovers of an earlier, failed run must not be published
    if num_shards == 0:
        return []
    parts = one_shard_per_partition(kept, num_shards).sortWithinPartitions("shard", SAMPLE_ID)
    fault = FaultPlan.from_env("shards")  # None outside fault-injection tests
    stats = parts.mapInArrow(lambda it: write_partition(it, out_dir, to_sample, contract, fault), spark_type(SHARD_STATS))
    # sorted here, not with orderBy: its range-partitioning sample would run the writer a second time
    rows = sorted((r.asDict() for r in stats.collect()), key=lambda r: r["shard"])
    if len({r["shard"] for r in rows}) != len(rows):
        raise RuntimeError("a shard was written by two partitions: shard assignment is broken")
    return rows
