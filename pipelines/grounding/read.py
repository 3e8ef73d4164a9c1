"""Readers of grounding inputs: COCO detection JSON, RefCOCO refs, GRIT-style Parquet.

Planning (`plan_units`, driver) handles only names: a `.parquet` file is a GRIT table; a folder holding
a refs file (`refs(<by>).p` or `refs*.json`) and `instances.json` is RefCOCO; any other `.json` file is
a COCO detection file. Image files are not items of their own (the annotations name them).

Reading (`ReadGrounding`, executors, one unit per task) yields one row per image (unit `image`), with
its candidate boxes as the reader found them (`candidates`, see schemas.grounding), and turns every
problem into a quarantined row: a file that does not parse (`read_error`, key `@error`), an image id
seen twice (`duplicate_member`), an annotation naming an image the file does not list (`read_error`,
key `@orphan:<id>`). The RefCOCO refs pickle is read with an unpickler that refuses every global, so
it can build only plain lists, dicts, strings and numbers.
"""
from __future__ import annotations

import dataclasses
import io
import json
import pickle
import posixpath
import re
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import pyarrow as pa

from pipelines.io import storage
from pipelines.io.readers import UnitReader, input_root, is_transient
from schemas import grounding as S
from schemas import ledger as L
from schemas.common import ERROR_DETAIL, KIND, READ_UNIT, SAMPLE_ID, SOURCE, SOURCE_KEY, make_sample_id

UNIT_SCHEMA = "format string, uri string, instances string, root string"
REFS_FILE = re.compile(r"^refs(\(.*\))?(\.p|\.json)$")
IMAGE_BYTES_COLUMNS = ("jpg", "image", "img", "png", "webp", "jpeg")
KEY_COLUMNS = ("key", "id", "image_id")


def plan_units(uris: Iterable[str]) -> list[dict]:
    """Read units (one per Spark task): {format, uri, instances, root}."""
    units, seen = [], set()
    for uri in uris:
        root = input_root(uri)
        files = [f for f in storage.list_files(uri) if f not in seen]
        seen.update(files)
        by_dir: dict[str, list[str]] = {}
        for f in files:
            by_dir.setdefault(f.rsplit("/", 1)[0], []).append(f)
        for folder, names in sorted(by_dir.items()):
            base = {f.rsplit("/", 1)[-1]: f for f in names}
            refs = sorted(f for n, f in base.items() if REFS_FILE.match(n))
            instances = base.get("instances.json")
            for f in sorted(names):
                n = f.rsplit("/", 1)[-1]
                if n.lower().endswith(".parquet"):
                    units.append({"format": "grit", "uri": f, "instances": None, "root": root})
                elif refs and instances and f in refs:
                    units.append({"format": "refcoco", "uri": f, "instances": instances, "root": root})
                elif n.lower().endswith(".json") and not (refs and f == instances) and not REFS_FILE.match(n):
                    units.append({"format": "coco", "uri": f, "instances": None, "root": root})
    return units


def unit_id(unit: dict) -> str:
    return unit["uri"]


# --- ids ---------------------------------------------------------------------------------------------
def id_source(uri: str, root: str, dataset: str) -> str:
    """The identity of a file: the dataset name (recipe read.dataset, else the input folder's name) and
    the file's path relative to the input root, so a moved corpus keeps its ids."""
    rel = uri[len(root):].lstrip("/") if root and uri.startswith(root.rstrip("/") + "/") else uri.rsplit("/", 1)[-1]
    return f"{dataset or posixpath.basename(root.rstrip('/'))}/{rel}"


def image_row(uri: str, ident: str, key: str, fmt: str, read_unit: str, **kw) -> dict:
    row = {f.name: None for f in S.RAW}
    row.update({SAMPLE_ID: make_sample_id(S.KIND, ident, key), KIND: S.KIND, SOURCE: uri, SOURCE_KEY: key,
                L.UNIT: "image", S.FORMAT: fmt, READ_UNIT: read_unit})
    row.update(kw)
    if row.get(ERROR_DETAIL):
        row[ERROR_DETAIL] = str(row[ERROR_DETAIL])[:500]
    return row


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refs pickle names {module}.{name}: only plain data is read")


def load_refs(data: bytes, name: str) -> list:
    if name.endswith(".p"):
        return _NoGlobals(io.BytesIO(data)).load()
    return json.loads(data)


def _image_root(uri: str, images: list[dict], configured: str) -> str:
    """The folder image file names are relative to: the recipe's image_root, else the first of the
    annotation file's folder, its images/ folder, or the COCO split folder (instances_val2017.json ->
    ../val2017 or ./val2017) that holds the first image."""
    if configured:
        return configured
    folder = uri.rsplit("/", 1)[0]
    stem = uri.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    split = stem.split("_", 1)[1] if "_" in stem else stem
    parent = folder.rsplit("/", 1)[0]
    candidates = [folder, storage.join(folder, "images"), storage.join(folder, split), storage.join(parent, split),
                  storage.join(parent, "images")]
    names = [str(i.get("file_name")) for i in images[:3] if isinstance(i, dict) and i.get("file_name")]
    for c in candidates:
        if names and any(storage.exists(storage.join(c, n)) for n in names):
            return c
    return folder


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --- COCO ------------------------------------------------------------------------------------------------
def read_coco(unit: dict, cfg: Any, dataset: str) -> Iterator[dict]:
    uri = unit["uri"]
    ident = id_source(uri, unit["root"], dataset)
    doc = json.loads(storage.read_bytes(uri))
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(doc.get("annotations"), list):
        raise TypeError("not a COCO detection file (want a mapping with 'images' and 'annotations' lists)")
    cats = {c.get("id"): str(c.get("name")) for c in doc.get("categories") or [] if isinstance(c, dict)}
    images = doc["images"]
    root = _image_root(uri, images, getattr(cfg, "image_root", ""))
    anns: dict[Any, list[dict]] = {}
    for j, a in enumerate(doc["annotations"]):
        if isinstance(a, dict):
            anns.setdefault(a.get("image_id"), []).append({**a, "_pos": j})
    seen: set[str] = set()
    for pos, img in enumerate(images):
        if not isinstance(img, dict) or img.get("id") is None:
            yield image_row(uri, ident, f"@image{pos}", "coco", uri, error="read_error",
                            error_detail=f"images[{pos}] has no id")
            continue
        key = str(img["id"])
        if key in seen:
            yield image_row(uri, ident, f"{key}#{pos}", "coco", uri, error="duplicate_member",
                            error_detail=f"image id {key} appears again (images[{pos}])")
            continue
        seen.add(key)
        cands = []
        for a in anns.pop(img["id"], []):
            cid = a.get("category_id")
            cands.append({"key": str(a.get("id", f"@{a['_pos']}")), "text": cats.get(cid), "span": None,
                          "box": a.get("bbox"), "coords": "xywh",
                          "score": float(a["score"]) if _num(a.get("score")) else None,
                          "error": "unknown_category" if cid not in cats else
                          "crowd_box" if a.get("iscrowd") and not getattr(cfg, "keep_crowd", False) else None})
        fname = img.get("file_name")
        w, h = img.get("width"), img.get("height")
        yield image_row(uri, ident, key, "coco", uri, path=storage.join(root, str(fname)) if fname else None,
                        url=None if fname else img.get("coco_url") or img.get("flickr_url"),
                        candidates=json.dumps(cands),
                        declared_width=int(w) if _num(w) and w > 0 else None,
                        declared_height=int(h) if _num(h) and h > 0 else None,
                        error=None if fname or img.get("coco_url") or img.get("flickr_url") else "image_missing",
                        error_detail=None if fname or img.get("coco_url") else "no file_name or url")
    for image_id, rest in sorted(anns.items(), key=lambda kv: str(kv[0])):
        for a in rest:  # annotations of an image the file does not list: accounted for, never a sample
            k = f"@orphan:{a.get('id', a['_pos'])}"
            yield image_row(uri, ident, k, "coco", uri, error="read_error",
                            error_detail=f"annotation {a.get('id')} names image_id {image_id}, which 'images' lacks")


# --- RefCOCO ---------------------------------------------------------------------------------------------
def read_refcoco(unit: dict, cfg: Any, dataset: str) -> Iterator[dict]:
    uri, inst_uri = unit["uri"], unit["instances"]
    ident = id_source(uri, unit["root"], dataset)
    refs = load_refs(storage.read_bytes(uri), uri)
    inst = json.loads(storage.read_bytes(inst_uri))
    if not isinstance(refs, list) or not isinstance(inst, dict):
        raise TypeError("want a list of refs and an instances mapping")
    anns = {a.get("id"): a for a in inst.get("annotations") or [] if isinstance(a, dict)}
    images = {i.get("id"): i for i in inst.get("images") or [] if isinstance(i, dict)}
    root = _image_root(inst_uri, list(images.values()), getattr(cfg, "image_root", ""))
    allowed = set(getattr(cfg, "refcoco_splits", ("train",)))
    by_image: dict[Any, list[dict]] = {}
    for r in refs:
        if isinstance(r, dict):
            by_image.setdefault(r.get("image_id"), []).append(r)
    for image_id in sorted(by_image, key=str):
        key = str(image_id)
        img = images.get(image_id)
        refs_here = sorted(by_image[image_id], key=lambda r: str(r.get("ref_id")))
        cands, parts, at = [], [], 0
        for r in refs_here:
            ann = anns.get(r.get("ann_id"))
            for s in r.get("sentences") or []:
                text = str(s.get("sent") or s.get("raw") or "").strip() if isinstance(s, dict) else ""
                ckey = f"{r.get('ref_id')}:{s.get('sent_id') if isinstance(s, dict) else len(cands)}"
                error = ("eval_split" if r.get("split") not in allowed else
                         "box_invalid" if ann is None or not text else None)
                span = None
                if error is None:
                    at += 2 if parts else 0
                    span = [at, at + len(text)]
                    at += len(text)
                    parts.append(text)
                cands.append({"key": ckey, "text": text, "span": span, "box": ann.get("bbox") if ann else None,
                              "coords": "xywh", "score": None, "error": error})
        split = refs_here[0].get("split")
        if img is None:
            yield image_row(uri, ident, key, "refcoco", uri, split=split, candidates=json.dumps(cands),
                            error="image_missing", error_detail=f"image_id {image_id} is not in instances.json")
            continue
        fname = img.get("file_name")
        w, h = img.get("width"), img.get("height")
        yield image_row(uri, ident, key, "refcoco", uri, split=split, caption=". ".join(parts),
                        path=storage.join(root, str(fname)) if fname else None, candidates=json.dumps(cands),
                        declared_width=int(w) if _num(w) and w > 0 else None,
                        declared_height=int(h) if _num(h) and h > 0 else None,
                        error=None if fname else "image_missing", error_detail=None if fname else "no file_name")


# --- GRIT -----------------------------------------------------------------------------------------------
def _chunks(value: Any, caption: str, which: str) -> list[dict]:
    out = []
    for i, c in enumerate(value if isinstance(value, (list, tuple)) else []):
        c = list(c) if isinstance(c, (list, tuple)) or hasattr(c, "__len__") else None
        ok = c is not None and len(c) == 7 and all(_num(v) for v in c)
        s, e = (int(c[0]), int(c[1])) if ok else (0, 0)
        out.append({"key": f"{which}:{i}", "text": caption[s:e] if ok else None, "span": [s, e] if ok else None,
                    "box": [float(v) for v in c[2:6]] if ok else None, "coords": "unit",
                    "score": float(c[6]) if ok else None, "error": None if ok else "box_invalid"})
    return out


def read_grit(unit: dict, cfg: Any, dataset: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    uri = unit["uri"]
    ident = id_source(uri, unit["root"], dataset)
    which = getattr(cfg, "grit_phrases", "noun_chunks")
    seen: set[str] = set()
    n = 0
    with storage.open_read(uri) if not storage.is_s3(uri) else io.BytesIO(storage.read_bytes(uri)) as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=1024):
            for r in batch.to_pylist():
                pos, n = n, n + 1
                raw_key = next((str(r[k]) for k in KEY_COLUMNS if r.get(k) is not None), f"row{pos}")
                key = raw_key if raw_key not in seen else f"{raw_key}#{pos}"
                if raw_key in seen:
                    yield image_row(uri, ident, key, "grit", uri, error="duplicate_member",
                                    error_detail=f"key {raw_key!r} appears again (row {pos})")
                    continue
                seen.add(raw_key)
                caption = r.get("caption")
                if not isinstance(caption, str):
                    yield image_row(uri, ident, key, "grit", uri, error="read_error", error_detail="no caption")
                    continue
                image = next((r[k] for k in IMAGE_BYTES_COLUMNS if r.get(k) is not None), None)
                if isinstance(image, dict):  # Hugging Face datasets' Image feature
                    image = image.get("bytes")
                url = r.get("url")
                # a caption table without span columns: its phrases are boxed by the detector (filters.grounding_detect)
                cands = _chunks(r.get(which), caption, which) if which in r else None
                fmt = "grit" if which in r else "captions"
                bad = image is not None and not isinstance(image, bytes)
                yield image_row(uri, ident, key, fmt, uri, caption=caption,
                                image=image if isinstance(image, bytes) else None,
                                url=str(url) if url and image is None else None,
                                candidates=None if cands is None else json.dumps(cands),
                                error="read_error" if bad else None if image is not None or url else "image_missing",
                                error_detail=(f"image column holds {type(image).__name__}" if bad else
                                              None if image is not None or url else "no image bytes or url"))


READERS = {"coco": read_coco, "refcoco": read_refcoco, "grit": read_grit}


def span_columns(uri: str) -> list[str]:
    """Driver side: the GRIT span columns a Parquet file has (from its schema only)."""
    import pyarrow.parquet as pq

    with storage.open_read(uri) if not storage.is_s3(uri) else io.BytesIO(storage.read_bytes(uri)) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return [c for c in ("noun_chunks", "ref_exps") if c in names]


def read_unit(unit: dict, cfg: Any, dataset: str) -> Iterator[dict]:
    """Rows of one unit; a unit that stops being readable ends with one `read_error` row ('@error')."""
    uid = unit_id(unit)
    ident = id_source(unit["uri"], unit["root"], dataset)
    try:
        yield from READERS[unit["format"]](unit, cfg, dataset)
    except Exception as e:
        if is_transient(e):
            raise
        yield image_row(unit["uri"], ident, "@error", unit["format"], uid, error="read_error",
                        error_detail=f"{type(e).__name__}: {e}")


@dataclasses.dataclass(frozen=True)
class ReadGrounding(UnitReader):
    """Read units in, RAW grounding rows out (see filters.base: a stage that changes the row count)."""

    raw: ClassVar[pa.Schema] = S.RAW
    rows: ClassVar[int] = 256
    cfg: Any = None

    def items(self, unit: dict) -> Iterator[list[dict]]:
        return ([row] for row in read_unit(unit, self.cfg, self.dataset))

