"""All-or-nothing output: a run writes under OUT/.runs/<run_id>/ and is published in one step.

    OUT/.runs/<run_id>/ledger/ reports/ shards/<kind>/   one run, complete, invisible until published
    OUT/_LATEST                                          the published run: the one commit point
    OUT/ledger, OUT/reports, OUT/shards                  local output: symlinks through _LATEST, made once
    OUT/shards/<kind>/index.json, sizes.json             s3:// output: written after _LATEST, urls into the run

Local: `_LATEST` is a symlink to `.runs/<run_id>`, replaced by one rename(2), and OUT/ledger,
OUT/reports and OUT/shards are fixed symlinks through it, so every path a reader opens, before or
after the rename, belongs to one whole run. S3 has no rename: `_LATEST` is a small JSON object
naming the run's prefix (readers in this repository follow it: `current`), and the wids index.json of
each kind (what the trainer and webdataset readers open) is rewritten after it, one PUT each, with
urls into the run's prefix. The previous run's objects are deleted only after both are in place.

A run that fails (an exception, a quality gate, SIGKILL) publishes nothing and leaves its folder for
inspection; the next published run removes it. The one exception: a run whose gates failed on an
OUT that holds no good run yet publishes its ledger and report (never shards), so a person sees why.
One run per OUT at a time.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import uuid

from pipelines.io import shards, storage

log = logging.getLogger(__name__)
POINTER = "_LATEST"
RUNS = ".runs"
ENTRIES = ("ledger", "reports", "shards")  # what OUT shows of the published run


def new_root(out: str) -> str:
    """A fresh folder / prefix for one run's whole output."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return storage.join(out, RUNS, f"{stamp}-{uuid.uuid4().hex[:8]}")


def current(out: str) -> str | None:
    """The published run's folder / prefix; None where OUT has none (nothing yet, or the layout of
    an earlier version, with ledger/ reports/ shards/ directly under OUT)."""
    pointer = storage.join(out, POINTER)
    if storage.is_s3(out):
        if not storage.exists(pointer):
            return None
        return storage.join(out, RUNS, json.loads(storage.read_bytes(pointer))["run"])
    if not os.path.islink(pointer):
        return None
    return os.path.join(out, RUNS, os.path.basename(os.readlink(pointer)))


def root_for_reading(out: str) -> str:
    """Where a reader finds the published run's reports/ and shards/ (OUT itself for local output and
    the earlier layout; the run's prefix on S3)."""
    if storage.is_s3(out):
        return current(out) or out
    return out


def holds_good_run(out: str) -> bool:
    """Whether OUT shows a run whose gates passed (or, in the earlier layout, any published shards)."""
    root = current(out)
    if root is not None:
        summary = storage.join(root, "reports", "summary.json")
        return storage.exists(summary) and bool(json.loads(storage.read_bytes(summary)).get("gates", {}).get("passed"))
    if storage.is_s3(out):
        return any(u.endswith("/index.json") for u in storage.list_files(storage.join(out, "shards")))
    folder = os.path.join(out, "shards")
    return os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, k, "index.json"))
                                         for k in os.listdir(folder) if not k.startswith("."))


def publish(out: str, root: str, shard_stats: dict[str, list[dict]] | None) -> None:
    """Make the run at `root` the one OUT shows. shard_stats ({kind: per-shard stats}) publishes its
    shards too; None (a run whose gates failed) only its ledger and reports."""
    for kind, stats in (shard_stats or {}).items():
        for name, part in shards.by_set(kind, stats).items():
            shards.publish(root, name, part)  # inside the run's folder: manifests, then <set>/ in place
    if storage.is_s3(out):
        _publish_s3(out, root, shard_stats or {})
    else:
        _publish_local(out, root)
    log.info("published %s as %s", root, storage.join(out, POINTER))


def _publish_local(out: str, root: str) -> None:
    run_id = os.path.basename(root)
    tmp = os.path.join(out, f".{POINTER}.{uuid.uuid4().hex}")
    os.symlink(os.path.join(RUNS, run_id), tmp)
    os.replace(tmp, os.path.join(out, POINTER))  # the commit point
    for name in ENTRIES:  # fixed links; only the first run on an OUT (or one of the earlier layout) makes them
        path, target = os.path.join(out, name), os.path.join(POINTER, name)
        if os.path.islink(path) and os.readlink(path) == target:
            continue
        tmp = os.path.join(out, f".{name}.{uuid.uuid4().hex}")
        os.symlink(target, tmp)
        if os.path.isdir(path) and not os.path.islink(path):  # the earlier layout's folder
            if shards._exchange(tmp, path):
                shutil.rmtree(tmp)  # now the earlier folder, under the temporary name
            else:  # no atomic swap here: a brief gap with nothing at `path`, once
                old = tmp + ".old"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    runs = os.path.join(out, RUNS)
    for name in os.listdir(runs):
        if name != run_id:
            shutil.rmtree(os.path.join(runs, name), ignore_errors=True)


def _publish_s3(out: str, root: str, shard_stats: dict[str, list[dict]]) -> None:
    run_id = root.rstrip("/").rsplit("/", 1)[1]
    storage.write_bytes(storage.join(out, POINTER), json.dumps({"run": run_id}).encode())  # the commit point
    manifests = set()
    for kind, stats in shard_stats.items():
        for name, part in shards.by_set(kind, stats).items():
            final = shards.final_dir(out, name)
            shards.write_index(final, part, base=shards.final_dir(root, name))
            manifests |= {storage.join(final, "index.json"), storage.join(final, "sizes.json")}
    # only now the previous run's objects go, and what the earlier layout kept directly under OUT
    keep = storage.join(out, RUNS, run_id) + "/"
    storage.remove_files([uri for name in (RUNS, *ENTRIES) for uri in storage.list_files(storage.join(out, name))
                          if not uri.startswith(keep) and uri not in manifests])
