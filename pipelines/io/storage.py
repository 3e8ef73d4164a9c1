"""Local paths and s3:// URIs behind one small API (boto3 for S3: no Hadoop s3a jars needed).

Endpoint, region and credentials come from the usual AWS environment and config files
(AWS_ENDPOINT_URL, AWS_PROFILE, ~/.aws/config, ...), so a local S3 server works unchanged.
"""
from __future__ import annotations

import fnmatch
import functools
import glob
import io
import os
import shutil
import tempfile
from typing import BinaryIO

GLOB_CHARS = "*?["
MULTIPART_BYTES = 64 << 20  # shards above this go up in parts of this size (S3's minimum part is 5 MB)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


@functools.cache
def s3_client():
    import boto3
    from botocore.config import Config

    # adaptive retries with back-off on throttling and 5xx
    return boto3.session.Session().client("s3", config=Config(retries={"max_attempts": 10, "mode": "adaptive"}))


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(base, *parts)


def normalize(uri: str) -> str:
    return uri if is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def list_files(uri: str) -> list[str]:
    """Files under a folder / prefix, matching a glob, or the file itself; sorted."""
    return [f for f, _ in list_sized(uri)]


def list_sized(uri: str) -> list[tuple[str, int | None]]:
    """list_files with each file's size in bytes where the listing gives it for free (S3's); None for
    local files (a stat per file is left to callers that need it)."""
    uri = normalize(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        has_glob = any(c in key for c in GLOB_CHARS)
        prefix = key.split("*")[0].split("?")[0].split("[")[0] if has_glob else key
        out = []
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                k = obj["Key"]
                if k.endswith("/"):
                    continue
                if has_glob and not fnmatch.fnmatchcase(k, key):
                    continue
                if not has_glob and k != key and not k.startswith(key.rstrip("/") + "/"):
                    continue
                out.append((f"s3://{bucket}/{k}", obj.get("Size")))
        return sorted(out)
    if any(c in uri for c in GLOB_CHARS):
        return [(p, None) for p in sorted(p for p in glob.glob(uri, recursive=True) if os.path.isfile(p))]
    if os.path.isdir(uri):
        found = []
        for dirpath, dirnames, files in os.walk(uri):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(os.path.join(dirpath, f) for f in files if not f.startswith("."))
        return [(p, None) for p in sorted(found)]
    if os.path.exists(uri) or os.path.islink(uri):
        return [(uri, None)]
    raise FileNotFoundError(f"input {uri} does not exist")


def open_read(uri: str) -> BinaryIO:
    """A readable binary stream (not necessarily seekable for s3)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    return open(uri, "rb")


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole object; raises ValueError when it is larger than max_bytes."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        obj = s3_client().get_object(Bucket=bucket, Key=key)
        if max_bytes is not None and obj["ContentLength"] > max_bytes:
            raise ValueError(f"{obj['ContentLength']} bytes > {max_bytes}")
        return obj["Body"].read()
    if max_bytes is not None and os.path.getsize(uri) > max_bytes:
        raise ValueError(f"{os.path.getsize(uri)} bytes > {max_bytes}")
    with open(uri, "rb") as f:
        return f.read()


def local_copy(uri: str) -> tuple[str, bool]:
    """A local path for `uri` (downloaded to a temp file for s3); True when the caller must delete it."""
    if not is_s3(uri):
        return uri, False
    fd, path = tempfile.mkstemp(suffix=os.path.splitext(uri)[1])
    os.close(fd)
    bucket, key = split_s3(uri)
    s3_client().download_file(bucket, key, path)
    return path, True


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception:  # noqa: BLE001 - 404 and friends
            return False
    return os.path.exists(uri)


def publish_file(local_path: str, uri: str) -> None:
    """Move a finished local file to its final place atomically (rename, or one S3 upload)."""
    if is_s3(uri):
        from boto3.s3.transfer import TransferConfig

        bucket, key = split_s3(uri)
        # multipart above MULTIPART_BYTES; either way the object appears whole or not at all
        s3_client().upload_file(local_path, bucket, key, Config=TransferConfig(
            multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES))
        os.remove(local_path)
        return
    os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
    if os.path.dirname(os.path.abspath(local_path)) == os.path.dirname(os.path.abspath(uri)):
        os.replace(local_path, uri)
    else:
        tmp = f"{uri}.tmp-{os.getpid()}"
        shutil.move(local_path, tmp)
        os.replace(tmp, uri)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a small file atomically."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
    tmp = f"{uri}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, uri)


def write_table(uri: str, table) -> None:
    """An Arrow table as one Parquet file, written atomically (`write_bytes`)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue())


def remove_tree(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/"
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                s3_client().delete_objects(Bucket=bucket, Delete={"Objects": objs})
        return
    shutil.rmtree(uri, ignore_errors=True)


def remove_files(uris: list[str]) -> None:
    """Delete files / objects (S3: up to 1,000 per request); a missing one is no error."""
    by_bucket: dict[str, list[str]] = {}
    for uri in uris:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            by_bucket.setdefault(bucket, []).append(key)
        elif os.path.lexists(uri):
            os.remove(uri)
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            s3_client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})


def staging_dir(uri: str) -> str:
    """Where a task writes a file before publishing it: beside the target locally, a temp dir for s3."""
    if is_s3(uri):
        return tempfile.mkdtemp(prefix="vlcurate-")
    os.makedirs(uri, exist_ok=True)
    return uri


