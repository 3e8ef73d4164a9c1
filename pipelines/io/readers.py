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
"""
from __future__ import annotations

import json
import os
import posixpath
import tarfile
from typing import Any, Iterable, Iterator

import pyarrow as pa

from pipelines.io import storage
from schemas import image_text as S
from schemas.common import ERROR, ERROR_DETAIL, KIND, SAMPLE_ID, SOURCE, SOURCE_KEY, make_sample_id, spark_type

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
    for uri in uris:
        for f in storage.list_files(uri):
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


def _row(source: str, key: str, *, url=None, image=None, caption=None, meta=None, error=None, detail=None) -> dict:
    return {
        SAMPLE_ID: make_sample_id(S.KIND, source, key), KIND: S.KIND, SOURCE: source, SOURCE_KEY: key,
        S.URL: url, S.IMAGE: image, S.CAPTION: caption, S.META: meta, ERROR: error,
        ERROR_DETAIL: None if detail is None else str(detail)[:500],
    }


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def _meta(data: bytes | str | None) -> tuple[str | None, str | None]:
    """(normalised JSON text, error detail)."""
    if data is None:
        return None, None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"invalid JSON side-car: {e}"
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str), None


def _group_row(source: str, key: str, parts: dict[str, bytes]) -> dict:
    image = next((parts[e] for e in parts if e.rsplit(".", 1)[-1].lower() in IMAGE_EXTS), None)
    caption = next((_text(parts[e]) for e in parts if e.rsplit(".", 1)[-1].lower() in CAPTION_EXTS), None)
    meta_raw = next((parts[e] for e in parts if e.rsplit(".", 1)[-1].lower() in META_EXTS), None)
    meta, bad = _meta(meta_raw)
    if bad:
        return _row(source, key, caption=caption, error="meta_invalid", detail=bad)
    if caption is None and meta:
        caption = json.loads(meta).get("caption") if isinstance(json.loads(meta), dict) else None
    if image is None:
        return _row(source, key, caption=caption, meta=meta, error="image_missing", detail=f"members: {sorted(parts)}")
    return _row(source, key, image=image, caption=caption, meta=meta)


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: 'dir/a.b.jpg' -> ('dir/a', 'b.jpg')."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem) if d else stem, ext


def read_tar(uri: str, max_member_bytes: int) -> Iterator[dict]:
    seen: dict[str, int] = {}
    key, parts = None, {}

    def flush():
        nonlocal key, parts
        if key is not None:
            n = seen.get(key, 0)
            seen[key] = n + 1
            source_key = key if n == 0 else f"{key}#{n}"
            source = f"{uri}::{source_key}"
            if n:
                yield _row(source, source_key, error="duplicate_member", detail=f"key {key!r} appears again")
            else:
                yield _group_row(source, source_key, parts)
        key, parts = None, {}

    try:
        with storage.open_read(uri) as stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
            for m in tf:
                if m.isdir():
                    continue
                name = m.name
                unsafe = (not m.isfile()) or name.startswith("/") or ".." in name.split("/")
                if unsafe:
                    yield from flush()
                    kind = "link" if (m.issym() or m.islnk()) else "special file" if not m.isfile() else "unsafe path"
                    yield _row(f"{uri}::{name}", name, error="unsafe_member", detail=f"{kind}: {name!r}")
                    continue
                k, ext = split_key(name)
                if k != key:
                    yield from flush()
                    key = k
                if ext in parts:
                    parts[ext + f"#{len(parts)}"] = b""  # keep the first copy of an extension, note the second
                    continue
                if m.size > max_member_bytes:
                    yield _row(f"{uri}::{name}", name, error="read_error", detail=f"member of {m.size} bytes > {max_member_bytes}")
                    continue
                f = tf.extractfile(m)
                parts[ext] = f.read() if f is not None else b""
            yield from flush()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        yield from flush()
        yield _row(f"{uri}::@error", "@error", error="read_error", detail=f"tar stopped being readable: {type(e).__name__}: {e}")


def _first(row: dict, names: tuple[str, ...]) -> Any:
    return next((row[n] for n in names if n in row and row[n] is not None), None)


def _table_rows(uri: str) -> Iterator[tuple[str, dict | None, str | None]]:
    """(row key, row dict or None, error detail)."""
    if uri.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        path, tmp = storage.local_copy(uri)
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
    with storage.open_read(uri) as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                if not isinstance(r, dict):
                    raise ValueError(f"a JSON {type(r).__name__}, not an object")
            except (ValueError, UnicodeDecodeError) as e:
                yield f"line{n}", None, f"malformed JSON line: {e}"
                continue
            yield f"line{n}", r, None


def read_table(uri: str, max_member_bytes: int) -> Iterator[dict]:
    base = uri.rsplit("/", 1)[0]
    try:
        for pos, r, bad in _table_rows(uri):
            if r is None:
                yield _row(f"{uri}::{pos}", pos, error="read_error", detail=bad)
                continue
            key = str(_first(r, KEY_COLUMNS) or pos)
            source = f"{uri}::{key}"
            caption = _first(r, CAPTION_COLUMNS)
            caption = _text(caption) if isinstance(caption, bytes) else None if caption is None else str(caption)
            image = _first(r, IMAGE_COLUMNS)
            if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
                image = image.get("bytes")
            if image is not None and not isinstance(image, bytes):
                yield _row(source, key, caption=caption, error="read_error", detail=f"image column holds {type(image).__name__}")
                continue
            path, url = _first(r, PATH_COLUMNS), _first(r, URL_COLUMNS)
            meta = json.dumps({k: v for k, v in r.items() if k not in IMAGE_COLUMNS and not isinstance(v, bytes)},
                              sort_keys=True, ensure_ascii=False, default=str)
            if image is None and path:
                full = path if storage.is_s3(path) or os.path.isabs(path) else storage.join(base, path)
                try:
                    image = storage.read_bytes(full, max_member_bytes)
                except Exception as e:  # noqa: BLE001 - missing or unreadable file: this row only
                    yield _row(source, key, url=url, caption=caption, meta=meta, error="read_error", detail=f"{full}: {e}")
                    continue
            if image is None and not url:
                yield _row(source, key, caption=caption, meta=meta, error="image_missing", detail="no image, path or url column")
                continue
            yield _row(source, key, url=None if image is not None else str(url), image=image, caption=caption, meta=meta)
    except Exception as e:  # noqa: BLE001 - a corrupt table: account for it, keep the rows read so far
        yield _row(f"{uri}::@error", "@error", error="read_error", detail=f"table stopped being readable: {type(e).__name__}: {e}")


def read_file_item(unit: dict, max_member_bytes: int) -> dict:
    uri = unit["uri"]
    key = os.path.splitext(os.path.basename(uri))[0]
    parts: dict[str, bytes] = {}
    try:
        for slot in ("uri", "caption_uri", "meta_uri"):
            if unit.get(slot):
                ext = unit[slot].rsplit(".", 1)[-1].lower()
                parts[ext] = storage.read_bytes(unit[slot], max_member_bytes)
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


def read_image_text(spark, uris: list[str], files_per_task: int, max_member_bytes: int):
    """DataFrame of RAW rows: one per input item (or per unreadable container)."""
    tasks = plan_units(uris, files_per_task)
    if not tasks:
        raise FileNotFoundError(f"no input files under {uris}")
    # one element per partition: each read unit list becomes exactly one task
    units = (spark.sparkContext.parallelize(tasks, len(tasks))
             .flatMap(lambda task: [(u["format"], u["uri"], u["caption_uri"], u["meta_uri"]) for u in task])
             .toDF(spark_type(UNIT)))

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        yield from read_units((u for b in batches for u in b.to_pylist()), max_member_bytes)

    return units.mapInArrow(run, spark_type(S.RAW))
