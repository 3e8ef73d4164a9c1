"""Stage checkpoints: a DataFrame is written once as Parquet under <work_dir>/<name>-<fingerprint>/
and read back; a rerun with the same inputs and recipe finds the _SUCCESS marker and reuses it.
Spark's committer writes _SUCCESS last, after every part file is in place, so a folder without it is
the leftover of a killed run: it is overwritten, never read.

The work dir is a POSIX path every executor can read (a local folder for local runs, a shared mount
on a multi-node cluster: spooled media are read with os.pread); existence checks and deletes go
through Spark's Hadoop FileSystem.

What a run removes at the end (`WorkDir`): only what it made or reused there (stage checkpoints and
spool folders, recorded by `checkpoint()` and `own()`), never the rest of the work dir, which may
be a user's scratch folder shared with other runs. Two runs with the same inputs and recipe use the
same checkpoint names, so each run leaves a lease file `_lease-<owner>` in every folder it uses
(`owner`: a fingerprint of the run's OUT, so a restart of a killed run takes over its own leases);
at the end a run drops its leases and deletes a folder only when no other run's lease is left in
it. A killed run's leases stay, and so do its checkpoints: they are what its restart reuses.
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


LEASE = "_lease-"  # Spark's Parquet reader skips names starting with _ or .


class WorkDir:
    """The folders one run made or reused in its work dir, and their removal when the run succeeded."""

    def __init__(self, spark, path: str, owner: str, ours: bool = False):
        self.spark, self.path, self.owner = spark, path.rstrip("/"), owner
        self.ours = ours  # the default work dir (OUT/_work, a temp dir): the job's own, not a user's
        self.created = not exists(spark, self.path)
        self.paths: set[str] = set()

    def own(self, path: str) -> None:
        """Record `path` as used by this run and leave this run's lease in it."""
        self.paths.add(path.rstrip("/"))
        fs, p = _fs(self.spark, f"{path.rstrip('/')}/{LEASE}{self.owner}")
        fs.create(p, True).close()

    def leases(self, path: str) -> list[str]:
        fs, p = _fs(self.spark, f"{path}/{LEASE}*")
        return sorted(str(s.getPath().getName())[len(LEASE):] for s in (fs.globStatus(p) or []))

    def remove(self) -> list[str]:
        """Drop this run's leases; delete what it used unless another run holds a lease there; then the
        empty media folder, and the work dir itself when this run created it (or it is the job's own)
        and it is empty. Returns the folders kept for other runs."""
        kept = []
        for path in sorted(self.paths):
            remove(self.spark, f"{path}/{LEASE}{self.owner}")
            others = self.leases(path)
            if not others:
                # _SUCCESS goes first: a run that takes a lease after this can no longer reuse the folder
                # (it recomputes); one that took it before is seen by the second look and keeps it whole
                remove(self.spark, f"{path}/_SUCCESS")
                others = self.leases(path)
            if others:
                log.info("keeping %s: in use by other run(s) %s", path, ", ".join(others))
                kept.append(path)
            else:
                remove(self.spark, path)
        for folder, mine in ((f"{self.path}/media", True), (self.path, self.created or self.ours)):
            fs, p = _fs(self.spark, folder)
            if mine and fs.exists(p) and len(fs.listStatus(p)) == 0:
                fs.delete(p, False)
        return kept


_RUN: WorkDir | None = None  # the run in progress in this driver (one at a time)


def begin(spark, work_dir: str, owner: str, ours: bool = False) -> WorkDir:
    """Start recording what this run uses in work_dir (checkpoint() and own() add to it)."""
    global _RUN
    _RUN = WorkDir(spark, work_dir, owner, ours)
    return _RUN


def own(path: str) -> str:
    """Record a folder the run writes outside checkpoint() (spooled media) as this run's; returns it."""
    if _RUN is not None:
        _RUN.own(path)
    return path


def checkpoint_path(work_dir: str, name: str, key: str) -> str:
    """Where `checkpoint(df, work_dir, name, key)` materialises its DataFrame."""
    return f"{work_dir.rstrip('/')}/{name}-{key}"


def checkpoint(df, work_dir: str, name: str, key: str, timer=None):
    """Materialise df at work_dir/name-key, or reuse what a previous attempt finished there."""
    path = checkpoint_path(work_dir, name, key)
    spark = df.sparkSession
    if exists(spark, f"{path}/_SUCCESS"):
        own(path)  # the lease first, then the check: a run that is removing it either sees the lease or
        if exists(spark, f"{path}/_SUCCESS"):  # has already taken _SUCCESS away with the folder
            log.info("reusing finished stage output %s", path)
            if timer is not None:
                timer.mark_checkpoint(name, reused=True)
            return spark.read.parquet(path)
    if exists(spark, path):
        log.info("overwriting unfinished stage output %s (no _SUCCESS: a killed run's leftover)", path)
    t0 = time.perf_counter()
    df.write.mode("overwrite").parquet(path)
    own(path)  # after the write: overwrite mode clears the folder, leases included
    if timer is not None:
        timer.add_wall(name, time.perf_counter() - t0)
        timer.mark_checkpoint(name, reused=False)
    # read back with the schema just written: inferring it would run a Spark job to read a file's footer
    # (a file source makes every field nullable, as inference gives)
    return spark.read.schema(df.schema).parquet(path)


def cached(df):
    """Materialise a small table (ids, decisions, shard names) in executor memory, spilling to disk.
    Unlike localCheckpoint(), whose size the planner cannot see (so every join with it shuffled both
    sides, image bytes included), a materialised cache reports its real size: joins broadcast it when
    it is below spark.sql.autoBroadcastJoinThreshold and fall back to a shuffle join when it is not."""
    from pyspark import StorageLevel

    df = df.persist(StorageLevel.MEMORY_AND_DISK)
    df.count()
    return df
