"""Stage checkpoints: a DataFrame is written once as Parquet under <work_dir>/<name>-<fingerprint>/
and read back; a rerun with the same inputs and recipe finds the _SUCCESS marker and reuses it.
Spark's committer writes _SUCCESS last, after every part file is in place, so a folder without it is
the leftover of a killed run: it is overwritten, never read.

The work dir is any Hadoop-reachable path (a local folder for local runs, hdfs:// or a shared mount
on a multi-node cluster); existence checks and deletes go through Spark's Hadoop FileSystem.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time

log = logging.getLogger(__name__)


def fingerprint(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _fs(spark, path: str):
    jvm = spark.sparkContext._jvm
    p = jvm.org.apache.hadoop.fs.Path(path)
    return p.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), p


def exists(spark, path: str) -> bool:
    fs, p = _fs(spark, path)
    return bool(fs.exists(p))


def remove(spark, path: str) -> None:
    fs, p = _fs(spark, path)
    if fs.exists(p):
        fs.delete(p, True)


def checkpoint(df, work_dir: str, name: str, key: str, timer=None):
    """Materialise df at work_dir/name-key, or reuse what a previous attempt finished there."""
    path = f"{work_dir.rstrip('/')}/{name}-{key}"
    spark = df.sparkSession
    if exists(spark, f"{path}/_SUCCESS"):
        log.info("reusing finished stage output %s", path)
        if timer is not None:
            timer.mark_checkpoint(name, reused=True)
        return spark.read.parquet(path)
    if exists(spark, path):
        log.info("overwriting unfinished stage output %s (no _SUCCESS: a killed run's leftover)", path)
    t0 = time.perf_counter()
    df.write.mode("overwrite").parquet(path)
    if timer is not None:
        timer.add_wall(name, time.perf_counter() - t0)
        timer.mark_checkpoint(name, reused=False)
    return spark.read.parquet(path)


def cached(df):
    """Materialise a small table (ids, decisions, shard names) in executor memory, spilling to disk.
    Unlike localCheckpoint(), whose size the planner cannot see (so every join with it shuffled both
    sides, image bytes included), a materialised cache reports its real size: joins broadcast it when
    it is below spark.sql.autoBroadcastJoinThreshold and fall back to a shuffle join when it is not."""
    from pyspark import StorageLevel

    df = df.persist(StorageLevel.MEMORY_AND_DISK)
    df.count()
    return df
