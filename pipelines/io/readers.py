"""Readers for image-text inputs; the format is detected from what is there.

- WebDataset / img2dataset tars: KEY.jpg|png|webp|... + KEY.txt (+ KEY.json), grouped by key as
  webdataset does (the key is the member path up to the first dot of its file name).
- img2dataset Parquet output and any Parquet / JSONL table with a caption column and one of: image
  bytes, an image path (relative to the table), or a URL (fetched later by filters.download).
- A folder of images with side-car .txt captions (and optional .json).

Planning (listing files, grouping them into read units) runs on the driver and handles only names;
reading runs in the executors, one unit per task, and turns every problem into a quarantined row
(`error`, `error_detail`) instead of an exception. Nothing is extracted to disk, so tar member names
such as '../x' or '/etc/x' can do no harm; they are still quarantined as unsafe.

Every row's `source_key` is unique within its tar or table: a key seen before gets a `#n` suffix and is
quarantined as `duplicate_member` (so two rows can never share a sample_id). Text that Arrow cannot
hold (lone surrogates from undecodable file names or JSON escapes) is made valid before it leaves.
"""
from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import posixpath
import re
import stat
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import pyarrow as pa
from pyspark.accumulators import AccumulatorParam

from filters.base import Stage, apply_stages
from pipelines.io import storage
from schemas import image_text as S
from schemas.common import (
    ERROR,
    ERROR_DETAIL,
    KIND,
    READ_UNIT,
    SAMPLE_ID,
    SOURCE,
    SOURCE_KEY,
    make_sample_id,
)


def _image_exts() -> tuple[str, ...]:
    """Every file extension Pillow registers for a format decode accepts (filters.decode.FORMATS):
    jpg, jpe, jfif, tif, ico, avif, ... A file decode could read is never skipped as 'not an item'."""
    from PIL import Image

    from filters.decode import FORMATS

    Image.init()
    return tuple(sorted(ext[1:] for ext, fmt in Image.registered_extensions().items() if fmt in FORMATS))


IMAGE_EXTS = _image_exts()
CAPTION_EXTS = ("txt",)
META_EXTS = ("json",)
TABLE_EXTS = (".parquet", ".jsonl", ".ndjson")

CAPTION_COLUMNS = ("caption", "text", "txt", "alt", "TEXT", "alt_text")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "image_bytes", "bytes")
PATH_COLUMNS = ("image_path", "path", "file", "filepath")
URL_COLUMNS = ("url", "URL", "image_url")
KEY_COLUMNS = ("key", "id", "sample_id", "__key__", "uid")

# `part` (JSON, or null for a whole file): which part of a table a unit reads (Parquet row groups, a JSONL
# byte range), the keys resolved across the whole table, or {"failed_only": true} for img2dataset's Parquet
UNIT = pa.schema([
    pa.field("format", pa.string()), pa.field("uri", pa.string()),
    pa.field("caption_uri", pa.string()), pa.field("meta_uri", pa.string()), pa.field("part", pa.string()),
    pa.field("root", pa.string()),
])
ROWS_PER_BATCH = 64
BYTES_PER_BATCH = 64 << 20
I2D_STATS_SUFFIX = "_stats.json"  # img2dataset's per-shard summary: not an item


# --- transient or permanent ---------------------------------------------------------------------
_TRANSIENT_ERRNOS = frozenset({
    errno.ECONNRESET, errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ENETRESET,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EAGAIN,
})
_TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "RequestLimitExceeded", "TooManyRequestsException", "BandwidthLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "PriorRequestNotComplete",
})


def _transient_one(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):  # reset, refused, aborted, broken pipe, timed out
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    try:
        from botocore import exceptions as bx
        from urllib3 import exceptions as ux
    except ImportError:  # pragma: no cover - both come with boto3 / requests
        return False
    if isinstance(e, (bx.HTTPClientError, bx.ConnectionError, bx.ResponseStreamingError, bx.IncompleteReadError,
                      ux.ProtocolError, ux.TimeoutError)):
        return True
    if isinstance(e, bx.ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return e.response.get("Error", {}).get("Code") in _TRANSIENT_S3_CODES or status == 429 or status >= 500
    return False


def is_transient(e: BaseException) -> bool:
    """True for errors that may well pass on a second try (S3 throttling and 5xx, connection resets,
    timeouts; botocore's retryable errors), also when wrapped by another exception. Those RAISE, so
    Spark retries the task; turning them into a row would hide every item not read yet."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if _transient_one(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class _S3Object(io.RawIOBase):
    """A seekable read-only S3 object, each read one ranged GET: Parquet footers and row groups and
    JSONL byte ranges are read without fetching the whole object."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.bucket, self.key = storage.split_s3(uri)
        self.size = storage.s3_client().head_object(Bucket=self.bucket, Key=self.key)["ContentLength"]
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence])
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        body = storage.s3_client().get_object(Bucket=self.bucket, Key=self.key,
                                              Range=f"bytes={self.pos}-{self.pos + n - 1}")["Body"]
        data = body.read()
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _open_seekable(uri: str) -> io.BufferedReader:
    uri = _local_path(uri)
    if storage.is_s3(uri):
        return io.BufferedReader(_S3Object(uri), buffer_size=1 << 20)
    return open(uri, "rb")


TABLE_ROWS_PER_UNIT = 50_000  # a Parquet table above this many rows is split by row groups
# Small tables and tars are read together (group_units): about TASKS_PER_CORE read tasks per core, but
# no fewer than MIN_ROWS_PER_TASK rows (tables) or MIN_TAR_BYTES_PER_TASK (tars) a task unless the cores
# need more tasks. A task has a fixed cost (its hand-off to a Python worker, and for URLs the downloads'
# fill at its start and drain at its end): 20,000 URLs in 40 tables of 500 on 2 cores took 20.4 s as
# 40 tasks, 16.3 s as 8; 2,000 in 4 tables 3.7-3.9 s as 4 tasks (6 with the plan's own), 2.9-3.1 s as
# 2; 20,000 pairs in 40 tars of 18 MB 15.6 s as 40 tasks, 13.6 s as 8 (benchmarks/HISTORY.md).
TASKS_PER_CORE = 4
MIN_ROWS_PER_TASK = 1_000
MIN_TAR_BYTES_PER_TASK = 64 << 20
MAX_TAR_BYTES_PER_TASK = 1 << 30
JSONL_BYTES_PER_UNIT = 64 << 20  # a JSONL table above this many bytes is split by byte ranges
# A Parquet row group above the rows a unit may hold is cut into row slices, each read by decoding the
# group up to its end (Parquet has no cheaper row access in pyarrow): only groups of at most
# SLICED_GROUP_BYTES uncompressed (URL lists, not tables of image bytes), in at most
# SLICES_PER_GROUP slices. pandas and pyarrow write up to 1,048,576 rows a group: a URL list of 10
# million rows would otherwise be 10 read tasks, and 20,000 in one group one task, whatever the cores.
SLICED_GROUP_BYTES = 256 << 20
SLICES_PER_GROUP = 32
PLAN_THREADS = 32  # tables whose metadata the driver reads at once while planning


def _unit(fmt: str, uri: str, caption_uri=None, meta_uri=None, part: dict | None = None) -> dict:
    return {"format": fmt, "uri": uri, "caption_uri": caption_uri, "meta_uri": meta_uri,
            "part": None if part is None else json.dumps(part, sort_keys=True)}


def plan_units(uris: Iterable[str], files_per_task: int, rows_per_unit: int = TABLE_ROWS_PER_UNIT,
               bytes_per_unit: int = JSONL_BYTES_PER_UNIT, cores: int = 0) -> list[list[dict]]:
    """Group input files into read units (one list per Spark task). `cores`: the cores the read runs
    on; with it, small Parquet tables and small tars share tasks (group_units), without it each is a task.

    img2dataset's output folder (NNNNN.tar + NNNNN.parquet + NNNNN_stats.json) is read as its samples,
    once: the tar gives the successful ones and the Parquet only the rows whose `status` is not
    success (its other rows are the tar's samples); the _stats.json is no item. A table owns only the
    loose files it references by path; a large table is split into several units (split_table)."""
    listed: list[str] = []
    seen: set[str] = set()
    roots: dict[str, str] = {}
    sizes: dict[str, int | None] = {}
    for uri in uris:
        root = input_root(uri)
        for f, size in storage.list_sized(uri):
            f = _valid_text(f, name=True)  # undecodable bytes in a name: '\\udcXX', see _local_path
            if f not in seen:  # overlapping inputs (a folder and a file inside it): one item, not two
                seen.add(f)
                listed.append(f)
                roots[f] = root
                sizes[f] = size
    tar_stems = {f[: -len(".tar")] for f in listed if f.lower().endswith(".tar")}
    pq_stems = {f[: -len(".parquet")] for f in listed if f.lower().endswith(".parquet")}
    tars, tables, loose = [], [], {}
    for f in listed:
        lower = f.rsplit("/", 1)[-1].lower()
        if lower.endswith(".tar"):
            tars.append({**_unit("tar", f), "bytes": _size_or_none(f, sizes[f])})
        elif lower.endswith(TABLE_EXTS):
            if lower.endswith(".parquet") and f[: -len(".parquet")] in tar_stems:
                tables.append([_unit("table", f, part={"failed_only": True})])  # img2dataset's shard metadata
            else:
                tables.append(f)  # split below, once the loose files are known
        elif lower.endswith(I2D_STATS_SUFFIX) and f[: -len(I2D_STATS_SUFFIX)] in (tar_stems | pq_stems):
            continue  # img2dataset's per-shard statistics
        else:
            stem, ext = os.path.splitext(f)
            ext = ext[1:].lower()
            slot = "image" if ext in IMAGE_EXTS else "caption" if ext in CAPTION_EXTS else "meta" if ext in META_EXTS else None
            if slot is None:
                continue  # README files, checksums, ...: not items
            group = loose.setdefault(stem, {})
            if slot == "image" and "image" in group:
                # two images with one stem (a.jpg and a.png): each is its own item
                loose.setdefault(f, {})["image"] = f
            else:
                group[slot] = f
    # a table owns the images it references by path (and their side-cars): they are not items of their own
    images = {g["image"]: stem for stem, g in loose.items() if "image" in g}
    for t in tables:
        if isinstance(t, str) and images:
            for ref in _referenced_paths(t):
                loose.pop(images.get(ref), None)
    items = []
    for stem in sorted(loose):
        g = loose[stem]
        items.append(_unit("file", g.get("image") or g.get("caption") or g.get("meta"), g.get("caption"),
                           g.get("meta") if "image" in g or "caption" in g else None))
    chunks = [items[i : i + files_per_task] for i in range(0, len(items), files_per_task)]
    split = list(zip(tables, _split_tables(tables, rows_per_unit, bytes_per_unit, sizes)))
    total = sum(u.get("rows") or 0 for _, units in split for u in units)
    if cores > 0 and total:  # a table larger than a task's share (and MIN_ROWS_PER_TASK) is split to that
        # share (a 20,000-row URL list on 2 cores: 8 tasks, not 1), the rest grouped
        share = max(MIN_ROWS_PER_TASK, -(-total // task_count(total, cores, MIN_ROWS_PER_TASK, rows_per_unit)))
        big = [t for t, units in split if isinstance(t, str) and any((u.get("rows") or 0) > share for u in units)]
        again = dict(zip(big, _split_tables(big, share, bytes_per_unit, sizes)))
        split = [(t, again.get(t, units) if isinstance(t, str) else units) for t, units in split]
    tables = group_units([u for _, units in split for u in units], cores, "rows", MIN_ROWS_PER_TASK, rows_per_unit)
    tars = group_units(tars, cores, "bytes", MIN_TAR_BYTES_PER_TASK, MAX_TAR_BYTES_PER_TASK)
    tasks = tars + tables + chunks
    for task in tasks:  # ids are made from paths relative to the input root (see item_id)
        for u in task:
            u["root"] = roots.get(u["uri"]) or roots.get(u.get("caption_uri")) or roots.get(u.get("meta_uri")) or ""
    return tasks


def _split_tables(tables: list, rows_per_unit: int, bytes_per_unit: int,
                  sizes: dict[str, int | None]) -> list[list[dict]]:
    """split_table for each table (a list of units already made passes through), PLAN_THREADS at a
    time: each Parquet table costs a footer read, on S3 two or three requests, and the driver plans
    before any executor starts (10,000 tables at ~40 ms a request would be minutes one at a time).
    sizes: what the listing gave (storage.list_sized), so a JSONL table on S3 needs no HEAD request."""
    from concurrent.futures import ThreadPoolExecutor

    def one(t):
        return split_table(t, rows_per_unit, bytes_per_unit, sizes.get(t)) if isinstance(t, str) else t

    if sum(isinstance(t, str) for t in tables) < 2:
        return [one(t) for t in tables]
    with ThreadPoolExecutor(min(PLAN_THREADS, len(tables)), thread_name_prefix="plan") as pool:
        return list(pool.map(one, tables))


def group_units(units: list[dict], cores: int, size: str, least: int, most: int) -> list[list[dict]]:
    """Read tasks for tables (`size` "rows") or tars ("bytes"). Units whose size is known are cut, in
    listing order, into k runs of consecutive units of near-equal size (a unit goes to the run its
    middle falls in): k = TASKS_PER_CORE tasks per core, fewer where that would leave under `least` a
    task, never fewer than the cores (a small corpus on a big cluster keeps its units apart), and
    never over `most` a task where the units allow it. A unit of unknown size (JSONL, CSV,
    img2dataset's shard tables, a tar that cannot be stat'ed) is a task of its own; cores <= 0: every
    unit is. Ids, keys and outputs do not depend on the grouping (tests/pipelines/test_readers.py)."""
    total = sum(u[size] for u in units if u.get(size) is not None)
    if cores <= 0 or total == 0:
        return [[u] for u in units]
    k = task_count(total, cores, least, most)
    tasks: list[list[dict]] = []
    last, held, seen = -1, 0, 0
    for u in units:
        n = u.get(size)
        if n is None:
            tasks.append([u])
            last = -1  # alone: the next unit starts a task
            continue
        run = min(k - 1, int((seen + n / 2) * k / total))
        seen += n
        if run != last or held + n > most:
            tasks.append([])
            last, held = run, 0
        tasks[-1].append(u)
        held += n
    return tasks


def slice_rows(rows: int, size: int, rows_per_unit: int) -> int:
    """Rows per slice of a row group of `rows` rows and `size` uncompressed bytes: near-equal slices of
    at most rows_per_unit rows, at most SLICES_PER_GROUP of them; the whole group (`rows`) where it
    fits in a unit or is too large to decode once per slice."""
    if rows <= rows_per_unit or size > SLICED_GROUP_BYTES:
        return max(rows, 1)
    pieces = min(SLICES_PER_GROUP, -(-rows // rows_per_unit))
    return -(-rows // pieces)


def task_count(total: int, cores: int, least: int, most: int) -> int:
    """Read tasks for units of `total` size (rows or bytes): TASKS_PER_CORE per core, fewer where that
    would leave under `least` a task, never fewer than the cores nor than `total` / `most`."""
    return max(cores, min(TASKS_PER_CORE * cores, -(-total // least)), -(-total // most))


def _size_or_none(uri: str, listed: int | None) -> int | None:
    """_object_size, or None where the file cannot be stat'ed (its reader reports why)."""
    try:
        return _object_size(uri, listed)
    except OSError:
        return None


def input_root(uri: str) -> str:
    """The folder an input URI names: itself for a folder or prefix, the folder of a file, the part of a
    glob before its first wildcard. Item ids use paths relative to it, so a moved corpus keeps its ids."""
    uri = uri.rstrip("/")
    if any(c in uri for c in storage.GLOB_CHARS):
        uri = uri[: min(uri.index(c) for c in storage.GLOB_CHARS if c in uri)]
        return uri.rsplit("/", 1)[0]
    if storage.is_s3(uri) or os.path.isdir(uri):
        return uri
    return uri.rsplit("/", 1)[0]


def _resolve(base: str, path: str) -> str:
    """The file a table row's path names (relative to the table's folder), as plan_units lists it."""
    full = path if storage.is_s3(path) or os.path.isabs(path) else storage.join(base, path)
    if storage.is_s3(full):
        bucket, key = storage.split_s3(full)
        return f"s3://{bucket}/{posixpath.normpath(key)}"
    return _valid_text(os.path.normpath(full), name=True)


def _referenced_paths(uri: str) -> set[str]:
    """Files a table references by path (driver side; only the path columns are read). A table that
    cannot be read owns nothing: its unit reports it, and the files beside it stay items."""
    base = uri.rsplit("/", 1)[0]
    out: set[str] = set()
    try:
        if uri.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            with _open_seekable(uri) as f:
                pf = pq.ParquetFile(f)
                cols = [c for c in PATH_COLUMNS if c in pf.schema_arrow.names]
                if not cols:
                    return out
                rows = (r for b in pf.iter_batches(batch_size=4096, columns=cols) for r in b.to_pylist())
                out.update(_resolve(base, str(p)) for r in rows if (p := _first(r, PATH_COLUMNS)))
            return out
        with _open_seekable(uri) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except (ValueError, UnicodeDecodeError, RecursionError):
                    continue
                if isinstance(r, dict) and (p := _first(r, PATH_COLUMNS)) and isinstance(p, str):
                    out.add(_resolve(base, p))
    except Exception as e:
        if is_transient(e):
            raise
    return out


def split_table(uri: str, rows_per_unit: int, bytes_per_unit: int, listed: int | None = None) -> list[dict]:
    """Read units for one table, from metadata only: Parquet row groups up to rows_per_unit rows per
    unit, a row group above that cut into row slices (slice_rows); JSONL byte ranges of bytes_per_unit
    (a line belongs to the range its first byte is in). A JSONL range's first line number, and the keys
    of rows whose key is not unique on its own, are filled in by resolve_splits, so no key or sample id
    depends on the split. listed: the table's size where the listing gave it."""
    try:
        if uri.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            with _open_seekable(uri) as f:
                md = pq.ParquetFile(f).metadata
                keyed = any(c in md.schema.to_arrow_schema().names for c in KEY_COLUMNS)
                groups = [(md.row_group(g).num_rows, md.row_group(g).total_byte_size) for g in range(md.num_row_groups)]
            step = [slice_rows(n, size, rows_per_unit) for n, size in groups]
            if md.num_rows <= rows_per_unit or (len(groups) < 2 and step[0] >= md.num_rows):
                return [{**_unit("table", uri), "rows": md.num_rows}]  # rows: for group_units only
            units, held, first, rows = [], [], 0, 0
            for g, (n, _) in enumerate(groups):
                if held and (rows + n > rows_per_unit or step[g] < n):
                    units.append({"row_groups": held, "first": first, "rows": rows, "keyed": keyed})
                    held, first, rows = [], first + rows, 0
                if step[g] < n:
                    units += [{"row_groups": [g], "first": first + a, "rows": min(step[g], n - a), "skip": a,
                               "keyed": keyed} for a in range(0, n, step[g])]
                    first += n
                    continue
                held.append(g)
                rows += n
            if held:
                units.append({"row_groups": held, "first": first, "rows": rows, "keyed": keyed})
            return [{**_unit("table", uri, part=p), "rows": p["rows"]} for p in units]
        if uri.lower().endswith(TABLE_EXTS):
            size = _object_size(uri, listed)
            if size <= bytes_per_unit:
                return [_unit("table", uri)]
            return [_unit("table", uri, part={"start": a, "end": min(a + bytes_per_unit, size), "first": None,
                                              "keyed": True})
                    for a in range(0, size, bytes_per_unit)]
    except Exception as e:
        if is_transient(e):
            raise
    return [_unit("table", uri)]


def _object_size(uri: str, listed: int | None = None) -> int:
    """An input file's size: the listing's where it gave one (S3's does), else a stat or a HEAD request."""
    if listed is not None:
        return listed
    uri = _local_path(uri)
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        return storage.s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"]
    return os.path.getsize(uri)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_text(text: str | None, name: bool = False) -> str | None:
    """Text Arrow can encode. Lone surrogates (a tar member or file name whose bytes are not UTF-8, a
    JSON '\\udc00' escape) become '\\udcxx' escapes in names, so distinct names stay distinct, and
    U+FFFD in captions and metadata, which caption clean-up then removes."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        if name:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
        return _SURROGATE.sub("\ufffd", text)


_ID_BASE = {"root": "", "dataset": ""}  # per worker, set by read_unit: what item ids are relative to


def item_id(source: str, key: str) -> str:
    """An item's sample_id: from the dataset name (recipe `read.dataset`, else the input folder's name)
    and the source's path relative to the input root, so moving a corpus does not change its ids."""
    root = _ID_BASE["root"]
    rel = source[len(root):].lstrip("/") if root and source.startswith(root.rstrip("/") + "/") else source
    dataset = _ID_BASE["dataset"] or posixpath.basename(root.rstrip("/"))
    return make_sample_id(S.KIND, f"{dataset}/{rel}", key)


def _row(source: str, key: str, *, url=None, image=None, caption=None, meta=None, error=None, detail=None) -> dict:
    source, key = _valid_text(source, name=True), _valid_text(key, name=True)
    return {
        SAMPLE_ID: item_id(source, key), KIND: S.KIND, SOURCE: source, SOURCE_KEY: key,
        S.URL: _valid_text(url, name=True), S.IMAGE: image, S.CAPTION: _valid_text(caption),
        S.META: _valid_text(meta), ERROR: error,
        ERROR_DETAIL: None if detail is None else _valid_text(str(detail)[:500]),
    }


_ESCAPED_BYTE = re.compile(r"\\udc([89a-f][0-9a-f])")


def _local_path(uri: str) -> str:
    """The file behind a read unit's uri. os.walk hands out a name whose bytes are not UTF-8 with
    surrogates, which neither Spark nor Arrow can carry; plan_units writes them as '\\udcXX' text
    (_valid_text) and this turns them back into the name the file system knows."""
    if storage.is_s3(uri) or "\\udc" not in uri:
        return uri
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), uri)


class _UniqueKeys:
    """Source keys handed out within one tar or table: a key seen before gets '#n' appended (and
    never one that is already taken), so the ledger can hold one row per occurrence."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.taken: set[str] = set()

    def claim(self, key: str) -> tuple[str, bool]:
        """(a source key not handed out before, whether `key` itself was seen before)."""
        n = self.count.get(key, 0)
        self.count[key] = n + 1
        out = key if n == 0 else f"{key}#{n}"
        while out in self.taken:
            n += 1
            out = f"{key}#{n}"
        self.taken.add(out)
        return out, self.count[key] > 1


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def _meta(data: bytes | str | None) -> tuple[str | None, str | None]:
    """(normalised JSON text, error detail)."""
    if data is None:
        return None, None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: '[[[[...' nested too deep
        return None, f"invalid JSON side-car: {type(e).__name__}: {e}"
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str), None


def _pick(parts: dict[str, bytes], exts: tuple[str, ...]) -> bytes | None:
    """The member for a slot: an exact extension ('jpg') first, else a dotted one ('seg.png', 'en.txt')."""
    exact = [e for e in parts if e.lower() in exts]
    dotted = [e for e in parts if e.rsplit(".", 1)[-1].lower() in exts]
    return parts[(exact or dotted)[0]] if exact or dotted else None


def _group_row(source: str, key: str, parts: dict[str, bytes]) -> dict:
    image = _pick(parts, IMAGE_EXTS)
    caption = _text(_pick(parts, CAPTION_EXTS))
    meta, bad = _meta(_pick(parts, META_EXTS))
    if bad:
        return _row(source, key, caption=caption, error="meta_invalid", detail=bad)
    if caption is None and meta:
        doc = json.loads(meta)
        found = doc.get("caption") if isinstance(doc, dict) else None
        caption = found if isinstance(found, str) else None  # {"caption": 42} is not a caption
    if image is None:
        return _row(source, key, caption=caption, meta=meta, error="image_missing", detail=f"members: {sorted(parts)}")
    return _row(source, key, image=image, caption=caption, meta=meta)


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: 'dir/a.b.jpg' -> ('dir/a', 'b.jpg')."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem) if d else stem, ext


class _WatchedTarInfo(tarfile.TarInfo):
    """Remembers why the last header did not parse. After the first member, tarfile ends a stream
    quietly at a damaged or cut-off header, which would drop every later member without a trace."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf.header_error = e
            raise


def _unread_rest(tf: tarfile.TarFile) -> str | None:
    """Why the archive's end is suspicious (a damaged header, data after the end marker), or None."""
    err = getattr(tf, "header_error", None)
    if err is not None and not isinstance(err, (tarfile.EOFHeaderError, tarfile.EmptyHeaderError)):
        return f"damaged tar header at byte {tf.offset} ({type(err).__name__}: {err}); the members after it are unread"
    while True:  # a normal end is zero blocks up to the record size; anything else was never read
        chunk = tf.fileobj.read(1 << 16)
        if not chunk:
            return None
        if chunk.strip(b"\0"):
            return f"data after the end-of-archive marker at byte {tf.offset} was not read (concatenated tars?)"


def read_tar(uri: str, max_member_bytes: int) -> Iterator[dict]:
    """One row per sample (members grouped by key, as webdataset does) and per unusable member.

    Rules: links, devices, FIFOs and names that are absolute or contain '..' are `unsafe_member`;
    a key that returns after other keys, or a second member with the same key and extension, is
    `duplicate_member` (the first copy is used); a member above max_member_bytes makes its sample a
    `read_error`; a tar that stops being readable, or hides members behind a damaged header, ends with
    one `read_error` row keyed '@error' after the rows read before it.
    """
    keys = _UniqueKeys()
    key, parts, problem = None, {}, None

    def alone(name: str, error: str, detail: str) -> dict:
        sk, _ = keys.claim(name)
        return _row(f"{uri}::{sk}", sk, error=error, detail=detail)

    def flush():
        nonlocal key, parts, problem
        if key is not None:
            sk, again = keys.claim(key)
            source = f"{uri}::{sk}"
            if again:
                yield _row(source, sk, error="duplicate_member", detail=f"key {key!r} appears again after other keys")
            elif problem:
                yield _row(source, sk, error="read_error", detail=problem)
            else:
                yield _group_row(source, sk, parts)
        key, parts, problem = None, {}, None

    try:
        with storage.open_read(_local_path(uri)) as stream, \
                tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WatchedTarInfo) as tf:
            for m in tf:
                if m.isdir():
                    continue
                name = m.name
                unsafe = (not m.isfile()) or name.startswith("/") or ".." in name.split("/")
                if unsafe:
                    yield from flush()
                    kind = "link" if (m.issym() or m.islnk()) else "special file" if not m.isfile() else "unsafe path"
                    target = f" -> {m.linkname!r}" if m.linkname else ""
                    yield alone(name, "unsafe_member", f"{kind}: {name!r}{target}")
                    continue
                k, ext = split_key(name)
                if k != key:
                    yield from flush()
                    key = k
                if ext in parts:
                    yield alone(name, "duplicate_member", f"a second {ext!r} member for key {k!r}; the first one is used")
                    continue
                if m.size > max_member_bytes:
                    problem = problem or f"member {name!r} of {m.size} bytes > read.max_member_bytes {max_member_bytes}"
                    parts[ext] = b""
                    continue
                f = tf.extractfile(m)
                parts[ext] = f.read() if f is not None else b""
            yield from flush()
            rest = _unread_rest(tf)
            if rest:
                yield alone("@error", "read_error", rest)
    except Exception as e:
        if is_transient(e) or not isinstance(e, (tarfile.TarError, OSError, EOFError, ValueError)):
            raise  # Spark retries the task: the members not read yet must not vanish behind one row
        why = f"tar stopped being readable: {type(e).__name__}: {e}"
        if key is not None:  # the sample being read when it broke may be missing members
            problem = problem or why
        yield from flush()
        yield alone("@error", "read_error", why)


def _first(row: dict, names: tuple[str, ...]) -> Any:
    return next((row[n] for n in names if n in row and row[n] is not None), None)


def _table_rows(uri: str, part: dict) -> Iterator[tuple[int, str, dict | None, str | None]]:
    """(row position in the whole table, positional key, row dict or None, error detail) for the rows
    of `part` (see split_table; {} is the whole table). A Parquet table that breaks off after its
    metadata was read gives each row not read a row of its own; anything else raises."""
    if uri.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        n = part.get("first") or 0
        total = None if part.get("rows") is None else n + part["rows"]  # a split knows its row count
        path, tmp, f = None, False, None
        try:
            if part.get("row_groups") is not None:  # a split: read only its row groups, by ranged reads
                f = _open_seekable(uri)
            else:
                path, tmp = storage.local_copy(_local_path(uri))
            pf = pq.ParquetFile(f if f is not None else path)
            groups = part.get("row_groups")
            groups = list(range(pf.num_row_groups)) if groups is None else groups
            # (row group, rows to skip in it, rows to read): a slice of one group, or whole groups
            spans = ([(groups[0], part["skip"], part["rows"])] if "skip" in part else
                     [(g, 0, pf.metadata.row_group(g).num_rows) for g in groups])
            total = n + sum(c for _, _, c in spans)
            for g, skip, count in spans:  # one damaged row group costs its own rows, not the ones after it
                end = n + count
                try:
                    for batch in pf.iter_batches(batch_size=256, row_groups=[g]):
                        if skip >= batch.num_rows:
                            skip -= batch.num_rows
                            continue
                        for r in batch.slice(skip, end - n).to_pylist():
                            yield n, f"row{n}", r, None
                            n += 1
                        skip = 0
                        if n >= end:
                            break
                except Exception as e:
                    if is_transient(e):
                        raise
                    why = f"row group {g} stopped being readable at row {n}: {type(e).__name__}: {e}"
                    for m in range(n, end):
                        yield m, f"row{m}", None, why
                n = end
        except Exception as e:
            if total is None or is_transient(e):
                raise
            why = f"table stopped being readable at row {n}: {type(e).__name__}: {e}"
            for m in range(n, total):
                yield m, f"row{m}", None, why
        finally:
            if f is not None:
                f.close()
            if tmp:
                os.remove(path)
        return
    for n, line in _jsonl_lines(uri, part):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if not isinstance(r, dict):
                raise ValueError(f"a JSON {type(r).__name__}, not an object")  # noqa: TRY004 - caught below
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            yield n, f"line{n}", None, f"malformed JSON line: {type(e).__name__}: {e}"
            continue
        yield n, f"line{n}", r, None


def _jsonl_lines(uri: str, part: dict) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a JSONL table, or of the lines that START in part's byte range
    [start, end): the line running into the range belongs to the range before it."""
    start, end, n = part.get("start", 0), part.get("end"), part.get("first") or 0
    if not start and end is None:
        with storage.open_read(_local_path(uri)) as f:
            yield from enumerate(f)
        return
    with _open_seekable(uri) as f:
        pos = start
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                pos += len(f.readline())
        while pos < end:
            line = f.readline()
            if not line:
                return
            yield n, line
            pos += len(line)
            n += 1


def _read_item_bytes(uri: str, max_bytes: int) -> bytes:
    """storage.read_bytes for one item's file, refusing anything but a regular file: a FIFO named
    like an image would block the task forever and a device such as /dev/zero would never end."""
    uri = _local_path(uri)
    if not storage.is_s3(uri):
        mode = os.stat(uri).st_mode  # follows links: a dangling or looping link raises here
        if not stat.S_ISREG(mode):
            kind = "directory" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "device or socket"
            raise ValueError(f"not a regular file ({kind})")
    return storage.read_bytes(uri, max_bytes)


def _raw_key(r: dict | None, pos: str) -> str:
    """A row's key before de-duplication: the first of KEY_COLUMNS, else its position."""
    return pos if r is None else str(_first(r, KEY_COLUMNS) or pos)


def read_table(uri: str, max_member_bytes: int, part: str | dict | None = None) -> Iterator[dict]:
    """One row per table row (of `part`: see split_table). A key (the first of KEY_COLUMNS, else the
    row position) seen before in the table is `duplicate_member`; a row that does not parse, an image
    column of the wrong type or an image above max_member_bytes is `read_error`; a Parquet table that
    breaks off after its metadata gives each unread row a `read_error` row; any other table that stops
    being readable ends with one `read_error` row keyed '@error' ('@error@<first byte>' for a part of
    a JSONL table). A transient error (is_transient) raises, so Spark retries the task.

    With `{"failed_only": true}` (img2dataset's Parquet beside its tar) only rows whose `status` is not
    "success" are items: `download_failed`, with img2dataset's error_message as the detail."""
    part = json.loads(part) if isinstance(part, str) else dict(part or {})
    base = uri.rsplit("/", 1)[0]
    keys = _UniqueKeys()
    split = "row_groups" in part or "start" in part
    resolved = part.get("keys") or {}  # row position -> [source key, seen before], from resolve_splits

    def claim(idx: int, key: str) -> tuple[str, bool]:
        if not split:
            return keys.claim(key)
        sk, again = resolved.get(str(idx), (key, False))
        return sk, bool(again)

    try:
        for idx, pos, r, bad in _table_rows(uri, part):
            if r is None:
                sk, _ = claim(idx, pos)
                yield _row(f"{uri}::{sk}", sk, error="read_error", detail=bad)
                continue
            if part.get("failed_only") and "status" in r:
                if r["status"] == "success":
                    continue  # a sample of the tar beside this table
                key = _raw_key(r, pos)
                sk, again = claim(idx, key)
                caption = _first(r, CAPTION_COLUMNS)
                yield _row(f"{uri}::{sk}", sk, url=_first(r, URL_COLUMNS),
                           caption=caption if isinstance(caption, str) else None,
                           error="duplicate_member" if again else "download_failed",
                           detail=f"key {key!r} appears again ({pos})" if again else
                           f"img2dataset: {r['status']}: {r.get('error_message') or 'no error message'}")
                continue
            key = _raw_key(r, pos)
            sk, again = claim(idx, key)
            source = f"{uri}::{sk}"
            if again:
                yield _row(source, sk, error="duplicate_member", detail=f"key {key!r} appears again ({pos})")
                continue
            key = sk
            caption = _first(r, CAPTION_COLUMNS)
            caption = _text(caption) if isinstance(caption, bytes) else None if caption is None else str(caption)
            image = _first(r, IMAGE_COLUMNS)
            if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
                image = image.get("bytes")
            if image is not None and not isinstance(image, bytes):
                yield _row(source, key, caption=caption, error="read_error", detail=f"image column holds {type(image).__name__}")
                continue
            if image is not None and len(image) > max_member_bytes:
                yield _row(source, key, caption=caption, error="read_error",
                           detail=f"image of {len(image)} bytes > read.max_member_bytes {max_member_bytes}")
                continue
            path, url = _first(r, PATH_COLUMNS), _first(r, URL_COLUMNS)
            meta = json.dumps({k: v for k, v in r.items() if k not in IMAGE_COLUMNS and not isinstance(v, bytes)},
                              sort_keys=True, ensure_ascii=False, default=str)
            if image is None and path:
                full = path if storage.is_s3(path) or os.path.isabs(path) else storage.join(base, path)
                try:
                    image = _read_item_bytes(full, max_member_bytes)
                except Exception as e:
                    if is_transient(e):
                        raise
                    yield _row(source, key, url=url, caption=caption, meta=meta, error="read_error",
                               detail=f"{full}: {type(e).__name__}: {e}")
                    continue
            if image is None and not url:
                yield _row(source, key, caption=caption, meta=meta, error="image_missing", detail="no image, path or url column")
                continue
            yield _row(source, key, url=None if image is not None else str(url), image=image, caption=caption, meta=meta)
    except Exception as e:
        if is_transient(e):
            raise
        sk, _ = keys.claim("@error" if "start" not in part else f"@error@{part['start']}")
        yield _row(f"{uri}::{sk}", sk, error="read_error", detail=f"table stopped being readable: {type(e).__name__}: {e}")


def read_file_item(unit: dict, max_member_bytes: int) -> dict:
    uri = unit["uri"]
    key = os.path.splitext(os.path.basename(uri))[0]
    parts: dict[str, bytes] = {}
    try:
        for slot in ("uri", "caption_uri", "meta_uri"):
            if unit.get(slot):
                ext = unit[slot].rsplit(".", 1)[-1].lower()
                parts[ext] = _read_item_bytes(unit[slot], max_member_bytes)
    except Exception as e:
        if is_transient(e):
            raise
        return _row(uri, key, error="read_error", detail=f"{type(e).__name__}: {e}")
    return _group_row(uri, key, parts)


def read_unit(unit: dict, max_member_bytes: int, dataset: str = "") -> Iterator[dict]:
    _ID_BASE.update(root=unit.get("root") or "", dataset=dataset)
    if unit["format"] == "tar":
        yield from read_tar(unit["uri"], max_member_bytes)
    elif unit["format"] == "table":
        yield from read_table(unit["uri"], max_member_bytes, unit.get("part"))
    else:
        yield read_file_item(unit, max_member_bytes)


def unit_id(unit: dict) -> str:
    """The read unit an item is counted under: a tar, a table (and its part), or the folder of a loose file."""
    if unit["format"] == "file":
        return "files:" + unit["uri"].rsplit("/", 1)[0]
    return unit["uri"] + (f"#{unit['part']}" if unit.get("part") else "")


def in_batches(units: Iterable[dict], read: Callable[[dict], Iterable[list[dict]]], schema: pa.Schema,
               counts: dict[str, int], timing: list[float] | None = None, rows: int = ROWS_PER_BATCH,
               image: str | None = None, unit_of: Callable[[dict], str] = unit_id) -> Iterator[pa.RecordBatch]:
    """A kind's reader loop: Arrow batches of `schema` from a stream of read units. `read(unit)` gives
    the unit's items, each as its rows (kept in one batch); every row is tagged with its unit
    (READ_UNIT, `unit_of`: the kind's name for a unit, by default image_text's) and every item counted
    in `counts[unit]` as it leaves the reader, before any stage can lose one. A batch is cut after an
    item once it holds `rows` rows, or BYTES_PER_BATCH bytes of the `image` column. `timing[0]` adds
    the seconds spent reading, not those the consumer spends between batches."""
    out: list[dict] = []
    size, t0 = 0, time.perf_counter()
    for unit in units:
        uid = unit_of(unit)
        counts.setdefault(uid, 0)
        for item in read(unit):
            counts[uid] += 1
            for row in item:
                row[READ_UNIT] = uid
                size += len(row[image] or b"") if image else 0
            out += item
            if len(out) >= rows or size >= BYTES_PER_BATCH:
                if timing is not None:
                    timing[0] += time.perf_counter() - t0
                yield pa.RecordBatch.from_pylist(out, schema=schema)
                out, size, t0 = [], 0, time.perf_counter()
    if out:
        yield pa.RecordBatch.from_pylist(out, schema=schema)
    if timing is not None:
        timing[0] += time.perf_counter() - t0


def report_counts(counter, counts: dict[str, int]) -> None:
    """Send a task's items read per unit to the driver through `counter` (a ReadCounts accumulator),
    keyed by (task, unit): a retried or speculative attempt reports the same keys."""
    if counter is None:
        return
    from pyspark import TaskContext

    ctx = TaskContext.get()
    task = ctx.partitionId() if ctx is not None else 0
    counter.add({f"{task}|{uid}": n for uid, n in counts.items()})


class ReadCounts(AccumulatorParam):
    """Items read per (task, read unit): a retried or speculative attempt of a task reports the same
    counts under the same keys, so merging is a union, never a sum."""

    def zero(self, value: dict) -> dict:
        return {}

    def addInPlace(self, a: dict, b: dict) -> dict:
        a.update(b)
        return a


def per_unit(counts: dict[str, int]) -> dict[str, int]:
    """(task, unit) counts -> counts per read unit (a folder's loose files span several tasks)."""
    out: dict[str, int] = {}
    for key, n in counts.items():
        uid = key.split("|", 1)[1]
        out[uid] = out.get(uid, 0) + n
    return out


@dataclasses.dataclass(frozen=True)
class UnitReader(Stage):
    """A kind's reader as the first stage of a fused chain (filters.base.apply_stages): read-unit rows
    in, the kind's RAW rows (`raw`) out, so reading and the row-wise stages after it share one Python
    worker pass. A kind says how a unit becomes items (`items`: each item as its rows) and how its units
    are named (`unit_of`); `in_batches` does the rest. With a `counter` (a ReadCounts accumulator), the
    items read per unit are reported to the driver."""

    name: ClassVar[str] = "read"
    raw: ClassVar[pa.Schema] = S.RAW
    rows: ClassVar[int] = ROWS_PER_BATCH  # a batch is cut after an item once it holds this many rows
    image: ClassVar[str | None] = None  # ... or BYTES_PER_BATCH bytes of this column
    dataset: str = ""
    counter: Any = dataclasses.field(default=None, compare=False, hash=False)

    def items(self, unit: dict) -> Iterable[list[dict]]:
        raise NotImplementedError

    def unit_of(self, unit: dict) -> str:
        return unit_id(unit)

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        return self.raw

    def run(self, batches: Iterable[pa.RecordBatch], threads: int = 1,
            timing: list[float] | None = None) -> Iterator[pa.RecordBatch]:
        counts: dict[str, int] = {}
        yield from in_batches((u for b in batches for u in b.to_pylist()), self.items, self.raw, counts, timing,
                              rows=self.rows, image=self.image, unit_of=self.unit_of)
        report_counts(self.counter, counts)


@dataclasses.dataclass(frozen=True)
class ReadUnits(UnitReader):
    """image_text's reader: tars, tables and loose files in, RAW image-text rows out."""

    image: ClassVar[str | None] = S.IMAGE
    max_member_bytes: int = 1 << 30

    def items(self, unit: dict) -> Iterator[list[dict]]:
        return ([row] for row in read_unit(unit, self.max_member_bytes, self.dataset))


def _split_keys(item: tuple[int, str, str]) -> Iterator[tuple[int, int, str | None, bool]]:
    """(unit, row position within the unit, key or None when the key is the position, True) for each
    row of a split unit, then (unit, rows or lines in the unit, None, False)."""
    unit, uri, part = item
    part = {**json.loads(part), "first": 0}
    n = 0
    try:
        if uri.lower().endswith(".parquet"):
            for n, _, r, _ in _table_rows(uri, part):
                k = None if r is None else _first(r, KEY_COLUMNS)
                yield unit, n, str(k) if k else None, True
                n += 1
        else:  # as _table_rows reads it, but blank lines are counted too
            for n, line in _jsonl_lines(uri, part):
                if line.strip():
                    try:
                        r = json.loads(line)
                    except (ValueError, UnicodeDecodeError, RecursionError):
                        r = None
                    k = _first(r, KEY_COLUMNS) if isinstance(r, dict) else None
                    yield unit, n, str(k) if k else None, True
                n += 1
    except Exception as e:
        if is_transient(e):
            raise
    yield unit, n, None, False


def resolve_splits(spark, tasks: list[list[dict]]) -> list[list[dict]]:
    """Fill in what a split unit cannot know alone, with one Spark job over the split units: the first
    line number of a JSONL range, and the source key of every row whose key is not unique in its table
    (or holds a '#'), replayed in table order exactly as one reader of the whole table would claim them
    (_UniqueKeys). Only those few keys come back to the driver; keys and sample ids so do not depend on
    the split."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    todo = [u for t in tasks for u in t if u.get("part") and json.loads(u["part"]).get("keyed")]
    if not todo:
        return tasks
    parts = [json.loads(u["part"]) for u in todo]
    items = [(i, u["uri"], u["part"]) for i, u in enumerate(todo)]
    keys = (spark.sparkContext.parallelize(items, len(items)).flatMap(_split_keys)
            .toDF("unit int, local long, raw string, is_row boolean").cache())
    try:
        counts = dict(keys.filter(~F.col("is_row")).select("unit", "local").collect())
        next_line: dict[str, int] = {}
        for i, (u, p) in enumerate(zip(todo, parts)):  # JSONL ranges are planned in file order
            if p.get("first") is None:
                p["first"] = next_line.get(u["uri"], 0)
                next_line[u["uri"]] = p["first"] + counts.get(i, 0)
        units = spark.createDataFrame(
            [(i, u["uri"], p["first"], "line" if "start" in p else "row") for i, (u, p) in enumerate(zip(todo, parts))],
            "unit int, uri string, first long, prefix string")
        rows = (keys.filter("is_row").join(F.broadcast(units), "unit")
                .withColumn("pos", F.col("first") + F.col("local"))
                .withColumn("key", F.coalesce("raw", F.concat("prefix", F.col("pos").cast("string"))))
                .withColumn("n", F.count(F.lit(1)).over(Window.partitionBy("uri", "key")))
                .filter((F.col("n") > 1) | F.col("key").contains("#"))
                .select("uri", "pos", "key").collect())
    finally:
        keys.unpersist()
    claimed: dict[str, dict[int, list]] = {}
    for uri in sorted({r["uri"] for r in rows}):
        ours, out = _UniqueKeys(), claimed.setdefault(uri, {})
        for r in sorted((r for r in rows if r["uri"] == uri), key=lambda r: r["pos"]):
            sk, again = ours.claim(r["key"])
            if (sk, again) != (r["key"], False):
                out[r["pos"]] = [sk, again]
    for i, (u, p) in enumerate(zip(todo, parts)):
        end = p["first"] + counts.get(i, 0)
        p["keys"] = {str(k): v for k, v in claimed.get(u["uri"], {}).items() if p["first"] <= k < end}
        del p["keyed"]
        u["part"] = json.dumps(p, sort_keys=True)
    return tasks


def read_plan(spark, uris: list[str], files_per_task: int, rows_per_unit: int = TABLE_ROWS_PER_UNIT,
              bytes_per_unit: int = JSONL_BYTES_PER_UNIT):
    """DataFrame of read units (format, uri, caption_uri, meta_uri, part), one Spark partition per task."""
    tasks = resolve_splits(spark, plan_units(uris, files_per_task, rows_per_unit, bytes_per_unit,
                                             spark.sparkContext.defaultParallelism))
    if not tasks:
        raise FileNotFoundError(f"no input files under {uris}")
    return task_table(spark, [[(u["format"], u["uri"], u["caption_uri"], u["meta_uri"], u.get("part"), u.get("root"))
                               for u in task] for task in tasks], UNIT)


def task_table(spark, tasks: list[list[tuple]], schema: pa.Schema):
    """DataFrame of `tasks` (lists of rows in `schema`'s column order), each list exactly one Spark
    partition, rows in their order. No Python process builds it: the rows go to the JVM as Arrow, and
    Spark 4.1+ sends each row to the partition its task names (repartitionById), so an executor gets
    its own tasks' rows only (units that carry data, such as grounding's boxes, are not copied to every
    executor). On Spark 4.0, spark.range(n, numPartitions=n) puts id i alone in partition i and a
    broadcast join with the rows keeps that partitioning. (A Python RDD, parallelize(tasks).flatMap(...)
    .toDF(), ran a Python worker in every read task beside the one that reads, only to unpickle a few
    rows, and its workers, started with other settings than those of SQL's Python UDFs, were a second
    pool of idle processes.)"""
    from pyspark.sql import functions as F

    n = max(1, len(tasks))
    rows = [(i, j, *row) for i, task in enumerate(tasks) for j, row in enumerate(task)]
    full = pa.schema([pa.field("_task", pa.int32()), pa.field("_seq", pa.int32()), *schema])
    table = spark.createDataFrame(pa.Table.from_pylist([dict(zip(full.names, r)) for r in rows], schema=full))
    if hasattr(table, "repartitionById"):
        spread = table.repartitionById(n, "_task")
    else:
        spread = spark.range(0, n, 1, n).join(F.broadcast(table), F.col("id") == F.col("_task"))
    return spread.sortWithinPartitions("_seq").select(*schema.names)


def read_image_text(spark, uris: list[str], files_per_task: int, max_member_bytes: int, stages=(), timer=None,
                    counter=None, dataset: str = ""):
    """DataFrame of RAW rows, one per input item (or per unreadable container), with the row-wise
    `stages` applied in the same pass. `counter`: a ReadCounts accumulator the reader reports to."""
    return apply_stages(read_plan(spark, uris, files_per_task),
                        [ReadUnits(dataset, counter, max_member_bytes), *stages], timer)
