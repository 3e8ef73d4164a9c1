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


LOCAL_ROWS = 50_000  # a narrow table of at most this many rows travels inside the query plan (truncated)


def truncated(df):
    """Materialise a narrow table (decisions, a stage's columns) and cut its lineage. Each step joins
    its table back onto the rows in play it was computed from, so with lineage kept the plan doubles at
    every step (seven steps made plans Spark ran out of heap analysing).

    One limited collect (it stops early on a big table) both materialises a small table and tells the two
    cases apart. A table of at most LOCAL_ROWS rows (a few MB: every step's drops in most runs) comes back
    to the driver and becomes a local relation made from Arrow: its rows travel inside the plan with their
    exact size, so joins broadcast it, and an empty one is removed from the joins altogether by the
    optimizer (an empty checkpoint's size was unknown: every join with it became a sort-merge join
    shuffling all rows in play, 383 shard tasks instead of 55 at 20,000 URLs with rules and dedup off).
    That is one Spark job per step where a local checkpoint and its emptiness test were two (37 -> 35
    jobs at 2,000 URLs). A larger table is a local checkpoint (the rows the collect read, a few times
    LOCAL_ROWS at most, are then computed twice), which keeps its size statistics, so the
    planner still broadcasts it when it is small enough; executor loss then fails the job (no lineage to
    recompute from) and the restart reuses the Parquet stage checkpoints."""
    head = fetch_small(df)
    if head is not None:
        return df.sparkSession.createDataFrame(head, schema=df.schema)
    return df.localCheckpoint(eager=True)


def fetch_small(df):
    """`df` as an Arrow table when it has at most LOCAL_ROWS rows, else None: one limited collect, which
    stops early on a big table (a few times LOCAL_ROWS rows read at most)."""
    head = df.limit(LOCAL_ROWS + 1).toArrow()
    return head if head.num_rows <= LOCAL_ROWS else None
