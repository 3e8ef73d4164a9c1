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
import json
import os
import posixpath
import re
import stat
import tarfile
import time
from typing import Any, ClassVar, Iterable, Iterator

import pyarrow as pa

from filters.base import Stage, apply_stages
from pipelines.io import storage
from schemas import image_text as S
from schemas.common import (
    ERROR,
    ERROR_DETAIL,
    KIND,
    SAMPLE_ID,
    SOURCE,
    SOURCE_KEY,
    make_sample_id,
    spark_type,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
CAPTION_EXTS = ("txt",)
META_EXTS = ("json",)
TABLE_EXTS = (".parquet", ".jsonl", ".ndjson")

CAPTION_COLUMNS = ("caption", "text", "txt", "alt", "TEXT", "alt_text")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "image_bytes", "bytes")
PATH_COLUMNS = ("image_path", "path", "file", "filepath")
URL_COLUMNS = ("url", "URL", "image_url")
KEY_COLUMNS = ("key", "id", "sample_id", "__key__", "uid")

UNIT = pa.schema([
    pa.field("format", pa.string()), pa.field("uri", pa.string()),
    pa.field("caption_uri", pa.string()), pa.field("meta_uri", pa.string()),
])
ROWS_PER_BATCH = 64
BYTES_PER_BATCH = 64 << 20


def plan_units(uris: Iterable[str], files_per_task: int) -> list[list[dict]]:
    """Group input files into read units (one list per Spark task)."""
    tars, tables, loose = [], [], {}
    listed: set[str] = set()
    for uri in uris:
        for f in storage.list_files(uri):
            f = _valid_text(f, name=True)  # undecodable bytes in a name: '\\udcXX', see _local_path
            if f in listed:  # overlapping inputs (a folder and a file inside it): one item, not two
                continue
            listed.add(f)
            name = f.rsplit("/", 1)[-1]
            lower = name.lower()
            if lower.endswith(".tar"):
                tars.append([{"format": "tar", "uri": f, "caption_uri": None, "meta_uri": None}])
            elif lower.endswith(TABLE_EXTS):
                tables.append([{"format": "table", "uri": f, "caption_uri": None, "meta_uri": None}])
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
    # a table owns its folder: images it references by path are not also items of their own
    table_dirs = tuple(t[0]["uri"].rsplit("/", 1)[0] + "/" for t in tables)
    loose = {stem: g for stem, g in loose.items() if not stem.startswith(table_dirs)}
    items = []
    for stem in sorted(loose):
        g = loose[stem]
        items.append({"format": "file", "uri": g.get("image") or g.get("caption") or g.get("meta"),
                      "caption_uri": g.get("caption"), "meta_uri": g.get("meta") if "image" in g or "caption" in g else None})
    chunks = [items[i : i + files_per_task] for i in range(0, len(items), files_per_task)]
    return tars + tables + chunks


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


def _row(source: str, key: str, *, url=None, image=None, caption=None, meta=None, error=None, detail=None) -> dict:
    source, key = _valid_text(source, name=True), _valid_text(key, name=True)
    return {
        SAMPLE_ID: make_sample_id(S.KIND, source, key), KIND: S.KIND, SOURCE: source, SOURCE_KEY: key,
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
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        why = f"tar stopped being readable: {type(e).__name__}: {e}"
        if key is not None:  # the sample being read when it broke may be missing members
            problem = problem or why
        yield from flush()
        yield alone("@error", "read_error", why)


def _first(row: dict, names: tuple[str, ...]) -> Any:
    return next((row[n] for n in names if n in row and row[n] is not None), None)


def _table_rows(uri: str) -> Iterator[tuple[str, dict | None, str | None]]:
    """(row key, row dict or None, error detail)."""
    if uri.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        path, tmp = storage.local_copy(_local_path(uri))
        try:
            n = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                for r in batch.to_pylist():
                    yield f"row{n}", r, None
                    n += 1
        finally:
            if tmp:
                os.remove(path)
        return
    with storage.open_read(_local_path(uri)) as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                if not isinstance(r, dict):
                    raise ValueError(f"a JSON {type(r).__name__}, not an object")
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                yield f"line{n}", None, f"malformed JSON line: {type(e).__name__}: {e}"
                continue
            yield f"line{n}", r, None


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


def read_table(uri: str, max_member_bytes: int) -> Iterator[dict]:
    """One row per table row. A key (the first of KEY_COLUMNS, else the row position) seen before in
    the table is `duplicate_member`; a row that does not parse, an image column of the wrong type or
    an image above max_member_bytes is `read_error`; a table that stops being readable ends with one
    `read_error` row keyed '@error'."""
    base = uri.rsplit("/", 1)[0]
    keys = _UniqueKeys()
    try:
        for pos, r, bad in _table_rows(uri):
            if r is None:
                sk, _ = keys.claim(pos)
                yield _row(f"{uri}::{sk}", sk, error="read_error", detail=bad)
                continue
            key = str(_first(r, KEY_COLUMNS) or pos)
            sk, again = keys.claim(key)
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
                except Exception as e:  # noqa: BLE001 - missing or unreadable file: this row only
                    yield _row(source, key, url=url, caption=caption, meta=meta, error="read_error",
                               detail=f"{full}: {type(e).__name__}: {e}")
                    continue
            if image is None and not url:
                yield _row(source, key, caption=caption, meta=meta, error="image_missing", detail="no image, path or url column")
                continue
            yield _row(source, key, url=None if image is not None else str(url), image=image, caption=caption, meta=meta)
    except Exception as e:  # noqa: BLE001 - a corrupt table: account for it, keep the rows read so far
        sk, _ = keys.claim("@error")
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
    except Exception as e:  # noqa: BLE001 - unreadable, vanished, too large: this item only
        return _row(uri, key, error="read_error", detail=f"{type(e).__name__}: {e}")
    return _group_row(uri, key, parts)


def read_unit(unit: dict, max_member_bytes: int) -> Iterator[dict]:
    if unit["format"] == "tar":
        yield from read_tar(unit["uri"], max_member_bytes)
    elif unit["format"] == "table":
        yield from read_table(unit["uri"], max_member_bytes)
    else:
        yield read_file_item(unit, max_member_bytes)


def read_units(units: Iterable[dict], max_member_bytes: int) -> Iterator[pa.RecordBatch]:
    """Arrow batches of RAW rows for a stream of read units, bounded in rows and bytes."""
    rows, size = [], 0
    for unit in units:
        for row in read_unit(unit, max_member_bytes):
            rows.append(row)
            size += len(row[S.IMAGE] or b"")
            if len(rows) >= ROWS_PER_BATCH or size >= BYTES_PER_BATCH:
                yield pa.RecordBatch.from_pylist(rows, schema=S.RAW)
                rows, size = [], 0
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=S.RAW)


@dataclasses.dataclass(frozen=True)
class ReadUnits(Stage):
    """The reader as the first stage of a fused chain (filters.base.apply_stages): read-unit rows in,
    RAW rows out, so reading and the row-wise stages after it share one Python worker pass."""

    name: ClassVar[str] = "read"
    max_member_bytes: int = 1 << 30

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        return S.RAW

    def run(self, batches: Iterable[pa.RecordBatch], threads: int = 1,
            timing: list[float] | None = None) -> Iterator[pa.RecordBatch]:
        out = read_units((u for b in batches for u in b.to_pylist()), self.max_member_bytes)
        while True:
            t0 = time.perf_counter()
            batch = next(out, None)
            if timing is not None:
                timing[0] += time.perf_counter() - t0
            if batch is None:
                return
            yield batch


def read_plan(spark, uris: list[str], files_per_task: int):
    """DataFrame of read units (format, uri, caption_uri, meta_uri), one Spark partition per task."""
    tasks = plan_units(uris, files_per_task)
    if not tasks:
        raise FileNotFoundError(f"no input files under {uris}")
    # one element per partition: each read unit list becomes exactly one task
    return (spark.sparkContext.parallelize(tasks, len(tasks))
            .flatMap(lambda task: [(u["format"], u["uri"], u["caption_uri"], u["meta_uri"]) for u in task])
            .toDF(spark_type(UNIT)))


def read_image_text(spark, uris: list[str], files_per_task: int, max_member_bytes: int, stages=(), timer=None):
    """DataFrame of RAW rows, one per input item (or per unreadable container), with the row-wise
    `stages` applied in the same pass."""
    return apply_stages(read_plan(spark, uris, files_per_task), [ReadUnits(max_member_bytes), *stages], timer)
