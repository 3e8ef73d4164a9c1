"""Stage checkpoints: a DataFrame is written once as Parquet under OUT/_work/<name>-<fingerprint>/
and read back; a rerun with the same inputs and recipe finds the _SUCCESS marker and reuses it."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

log = logging.getLogger(__name__)


def fingerprint(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def checkpoint(df, work_dir: str, name: str, key: str, timer=None):
    """Materialise df at work_dir/name-key (local paths only; on s3 output, the work dir is local)."""
    path = os.path.join(work_dir, f"{name}-{key}")
    spark = df.sparkSession
    if os.path.exists(os.path.join(path, "_SUCCESS")):
        log.info("reusing finished stage output %s", path)
        return spark.read.parquet(path)
    t0 = time.perf_counter()
    df.write.mode("overwrite").parquet(path)
    if timer is not None:
        timer.add_wall(name, time.perf_counter() - t0)
    return spark.read.parquet(path)
