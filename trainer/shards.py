"""Where the shards are and how to read them: shard lists from index.json / sizes.json, local or s3://.

The pipeline writes `OUT/shards/<kind>/<kind>-NNNNNN.tar` with `sizes.json` and a wids `index.json`
beside them. Shard urls in index.json are relative to that folder. S3 objects are streamed with boto3
(endpoint, region and credentials from the usual AWS environment, AWS_ENDPOINT_URL included), so no
`aws` CLI or `pipe:` command is needed and a local S3 server works unchanged.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger("trainer.shards")


@dataclass(frozen=True)
class Shard:
    url: str
    nsamples: int


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


@functools.cache
def _s3_client(pid: int):
    # keyed by pid: a boto3 client must not cross a fork into DataLoader workers
    import boto3
    from botocore.config import Config

    retries = {"max_attempts": 10, "mode": "adaptive"}  # back off on throttling and 5xx
    return boto3.session.Session().client("s3", config=Config(retries=retries))


def s3_client():
    return _s3_client(os.getpid())


def join(base: str, name: str) -> str:
    if is_s3(base):
        return base.rstrip("/") + "/" + name.lstrip("/")
    return os.path.join(base, name)


def open_shard(url: str) -> BinaryIO:
    """A readable stream over a shard (an S3 object is streamed, not downloaded first)."""
    if is_s3(url):
        bucket, key = _split_s3(url)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    return open(url, "rb")


def _read_json(uri: str):
    """The parsed JSON file at uri, or None when it does not exist."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except s3_client().exceptions.NoSuchKey:
            return None
        return json.loads(body)
    if not os.path.exists(uri):
        return None
    with open(uri, encoding="utf-8") as f:
        return json.load(f)


def _resolve(folder: str, url: str) -> str:
    if "://" in url or os.path.isabs(url):
        return url
    return join(folder, url)


def shard_list(folder: str) -> list[Shard] | None:
    """The shards of one kind's folder from index.json (preferred) or sizes.json; None when neither exists.

    Empty shards are left out: they would only cost an open.
    """
    index = _read_json(join(folder, "index.json"))
    if index is not None:
        if index.get("__kind__") != "wids-shard-index-v1":
            raise ValueError(f"{folder}/index.json: not a wids-shard-index-v1 file")
        shards = [Shard(_resolve(folder, s["url"]), int(s["nsamples"])) for s in index["shardlist"]]
    else:
        sizes = _read_json(join(folder, "sizes.json"))
        if sizes is None:
            return None
        shards = [Shard(_resolve(folder, name), int(n)) for name, n in sorted(sizes.items())]
    return [s for s in shards if s.nsamples > 0]


def _subfolders(root: str) -> list[str]:
    if is_s3(root):
        bucket, key = _split_s3(root)
        prefix = key.rstrip("/") + "/" if key else ""
        names = []
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(names)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"shards folder {root} does not exist")
    # dot folders are the pipeline's staging areas, never finished shards
    names = [d for d in os.listdir(root) if not d.startswith(".")]
    return sorted(d for d in names if os.path.isdir(os.path.join(root, d)))


def find_kinds(root: str, kinds: list[str] | None = None) -> dict[str, list[Shard]]:
    """{kind: shards} under root (OUT/shards). Root may also be one kind's folder (named after the kind).

    With `kinds` given, each must exist and hold at least one non-empty shard.
    """
    root = root if is_s3(root) else os.path.abspath(os.path.expanduser(root))
    own = shard_list(root)
    if own is not None:  # pointed straight at one kind's folder
        found = {os.path.basename(root.rstrip("/")): own}
    else:
        found = {}
        for name in _subfolders(root):
            shards = shard_list(join(root, name))
            if shards is not None:
                found[name] = shards
    if kinds is not None:
        missing = [k for k in kinds if not found.get(k)]
        if missing:
            raise FileNotFoundError(f"no shards for kind(s) {missing} under {root} (found: {sorted(found)})")
        found = {k: found[k] for k in kinds}
    found = {k: v for k, v in found.items() if v}
    if not found:
        raise FileNotFoundError(f"no shard folder with index.json or sizes.json under {root}")
    return found


def iter_shard(url: str, handler) -> Iterator[dict]:
    """The samples of one shard as webdataset dicts ({"__key__", "jpg": bytes, ...}), in tar order.

    Tar-level errors (a truncated or unreadable shard) go to `handler`, which logs them and ends the shard.
    """
    import webdataset as wds

    try:
        stream = open_shard(url)
    except Exception as exn:
        if handler(exn):
            return
        raise
    try:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from wds.tariterators.group_by_keys(files, handler=handler)
    finally:
        stream.close()


def log_and_continue(exn: BaseException) -> bool:
    """webdataset error handler: log and go on (wds's warn_and_continue also sleeps half a second)."""
    log.warning("skipping unreadable shard data: %r", exn)
    return True


def iter_raw_samples(urls: list[str]) -> Iterator[dict]:
    """Every sample of the given shards in order; bad shards are logged and skipped."""
    for url in urls:
        yield from iter_shard(url, log_and_continue)
