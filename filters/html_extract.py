"""HTML pages -> interleaved documents: main content with its images in place (Resiliparse).

`extract_page` parses a page with Resiliparse's HTMLTree, writes a unique marker into the `alt` of every
`<img>` and runs Resiliparse's main-content extraction (`extract_plain_text(main_content=True,
alt_texts=True)`): the markers that survive give each kept image its position in the text; an image
whose marker is gone sat in the boilerplate (navigation, header, footer, sidebars) that the extraction
removed. Every `<img>` is returned, kept or not, so the ledger accounts for all of them.

`ReadPages` is the reader as the first stage of the fused read pass: page rows in (`uri`, `root`,
`read_unit`), one document row per page and one image row per `<img>` out (schemas.interleaved.RAW),
the image bytes read from the file its `src` names relative to the page (or from a `data:` URI; an
http(s) src becomes the row's `url` for the shared download stage).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import posixpath
import re
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import pyarrow as pa

from filters.base import Stage
from pipelines.io import storage
from schemas import interleaved as S
from schemas import ledger as L
from schemas.common import ERROR, ERROR_DETAIL, READ_UNIT, SAMPLE_ID, make_sample_id

PAGE_EXTS = (".html", ".htm", ".xhtml")
CONTEXT_CHARS = 300  # text around an image handed to CLIP (with its alt text)
_BLANKS = re.compile(r"\n\s*\n\s*\n+")
_SPACES = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")  # NBSP and kin -> one space


@dataclasses.dataclass
class PageImage:
    position: int
    src: str | None
    alt: str | None
    link: str | None
    declared_width: int | None
    declared_height: int | None
    in_main: bool = False


@dataclasses.dataclass
class Page:
    title: str | None
    segments: list[dict]  # {"text": str} | {"image": position}, reading order
    images: list[PageImage]


def _int_attr(value: str | None) -> int | None:
    m = re.match(r"\s*(\d{1,5})\s*(px)?\s*$", value or "")
    return int(m.group(1)) if m else None


def decode_html(data: bytes) -> str:
    """Page bytes -> text, with the encoding Resiliparse detects (meta charset, BOM, content)."""
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    return bytes_to_str(data, detect_encoding(data))


def extract_page(html: str, skip_elements: tuple[str, ...] = ()) -> Page:
    """Main content of one page with its images in place (see the module docstring)."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(html)
    nonce = hashlib.sha1(html.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    images = []
    doc = tree.document
    for i, node in enumerate(doc.query_selector_all("img") if doc is not None else []):
        link, parent = None, node.parent
        while parent is not None and parent.tag not in ("body", "html"):
            if parent.tag == "a":
                link = parent.getattr("href")
                break
            parent = parent.parent
        src = node.getattr("src") or node.getattr("data-src")
        images.append(PageImage(i, src, node.getattr("alt"), link, _int_attr(node.getattr("width")),
                                _int_attr(node.getattr("height"))))
        node.setattr("alt", f" xximg{nonce}n{i}xx ")
    text = extract_plain_text(tree, preserve_formatting=True, main_content=True, alt_texts=True, links=False,
                              list_bullets=True, skip_elements=list(skip_elements) or None)
    marker = re.compile(rf"xximg{nonce}n(\d+)xx")
    segments: list[dict] = []
    pos = 0
    for m in marker.finditer(text):
        _add_text(segments, text[pos:m.start()])
        i = int(m.group(1))
        if i < len(images) and not images[i].in_main:
            images[i].in_main = True
            segments.append({"image": i})
        pos = m.end()
    _add_text(segments, text[pos:])
    title = _SPACES.sub(" ", tree.title).strip() if tree.title else None
    return Page(title or None, segments, images)


def _add_text(segments: list[dict], chunk: str) -> None:
    lines = [_SPACES.sub(" ", ln).strip() for ln in chunk.replace("\r", "").split("\n")]
    chunk = _BLANKS.sub("\n\n", "\n".join(lines)).strip()
    if chunk:
        segments.append({"text": chunk})


def document_text(segments: list[dict]) -> str:
    return "\n\n".join(s["text"] for s in segments if "text" in s)


def image_context(segments: list[dict], position: int, alt: str | None, chars: int = CONTEXT_CHARS) -> str:
    """Alt text, then the text just before and after the image: what CLIP compares it with."""
    idx = next((k for k, s in enumerate(segments) if s.get("image") == position), None)
    before = after = ""
    if idx is not None:
        before = next((s["text"] for s in reversed(segments[:idx]) if "text" in s), "")
        after = next((s["text"] for s in segments[idx + 1:] if "text" in s), "")
    parts = [alt or "", before[-chars // 2:], after[: chars // 2]]
    return " ".join(p.strip() for p in parts if p and p.strip())[: chars + 100]


# --- resolving an image's src ---------------------------------------------------------------------------

def resolve_src(page_uri: str, root: str, src: str | None) -> tuple[str, str]:
    """(how, where) for an image src: ("file", uri) under the input root; ("url", http url); ("data", the
    data: URI); ("error:<reason>", detail)."""
    if src is None or not src.strip():
        return "error:image_missing", "the <img> has no src"
    src = src.strip()
    low = src.lower()
    if low.startswith("data:"):
        return "data", src
    if low.startswith(("http://", "https://")):
        return "url", src
    if low.startswith("//"):
        return "url", "https:" + src
    if re.match(r"^[a-z][a-z0-9+.-]*:", low):
        return "error:image_outside_input", f"scheme not fetched: {src[:80]}"
    path = urllib.parse.unquote(src.split("#", 1)[0].split("?", 1)[0])
    prefix = "/".join(page_uri.split("/", 3)[:3]) if storage.is_s3(page_uri) else ""  # s3://bucket
    root = root.rstrip("/")[len(prefix):] or "/"
    page_dir = page_uri.rsplit("/", 1)[0][len(prefix):] or "/"
    full = posixpath.normpath(posixpath.join(root if path.startswith("/") else page_dir, path.lstrip("/")))
    if not (full == root or full.startswith(root.rstrip("/") + "/")):
        return "error:image_outside_input", f"{src[:80]} resolves outside the input root"
    full = prefix + full
    return "file", full


def read_data_uri(uri: str) -> bytes:
    head, _, body = uri.partition(",")
    if head.lower().endswith(";base64"):
        return base64.b64decode(body, validate=False)
    return urllib.parse.unquote_to_bytes(body)


# --- the reader stage ---------------------------------------------------------------------------------

# one row per read unit: an HTML page, a WARC file, a PDF, a MINT-1T PDF tar, or a table (OBELICS-style
# rows, MMC4 documents)
UNITS = pa.schema([pa.field("format", pa.string()), pa.field("uri", pa.string()), pa.field("root", pa.string()),
                   pa.field(READ_UNIT, pa.string()), pa.field("dataset", pa.string())])
HTML, WARC, OBELICS, MMC4, PDF = "html", "warc", "obelics", "mmc4", "pdf"
MINT = "mint_pdf"  # a webdataset tar of MINT-1T's PDF subset: {key}.json + a multi-frame {key}.tiff
WARC_EXTS = (".warc", ".warc.gz", ".warc.zst", ".warc.lz4")
TABLE_EXTS = (".parquet", ".jsonl", ".jsonl.gz", ".json")


def relative(uri: str, root: str) -> str:
    root = root.rstrip("/")
    return uri[len(root) + 1:] if root and uri.startswith(root + "/") else uri.rsplit("/", 1)[-1]


def image_key(page_key: str, src: str | None, seen: dict[str, int]) -> str:
    """`page::src` exactly as written; the n-th repeat of the same src in a page gets `#n` (n >= 2)."""
    key = f"{page_key}::{src if src is not None else ''}"
    seen[key] = seen.get(key, 0) + 1
    return key if seen[key] == 1 else f"{key}#{seen[key]}"


def _detail(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def _missing(e: BaseException) -> bool:
    return isinstance(e, FileNotFoundError) or "NoSuchKey" in type(e).__name__ + str(e)[:200]


@dataclasses.dataclass
class _Doc:
    """What a reader hands to `ReadDocuments.rows`: one document, its images by position."""

    key: str
    title: str | None = None
    segments: list[dict] = dataclasses.field(default_factory=list)
    images: list[PageImage] = dataclasses.field(default_factory=list)
    page_url: str | None = None
    error: tuple[str, str] | None = None
    sources: dict[int, tuple[str, Any]] = dataclasses.field(default_factory=dict)  # position -> (how, where)
    extra: dict[int, dict] = dataclasses.field(default_factory=dict)  # position -> more image columns
    by_position: bool = False  # image keys are `doc::position` (table rows), not `doc::src` (pages)


@dataclasses.dataclass(frozen=True)
class ReadDocuments(Stage):
    """Read-unit rows (UNITS) in; document and image rows (schemas.interleaved.RAW) out: one document row
    per page (a file, a WARC response, a table row) and one image row per image it names. A document that
    cannot be read or parsed is one row with `error`; its images are then unknown (none listed). The
    reader counts the documents of every read unit (`counter`: a readers.ReadCounts accumulator)."""

    name: ClassVar[str] = "read"
    max_member_bytes: int = 64_000_000
    skip_elements: tuple[str, ...] = ()
    fetch_remote: bool = True  # an image only reachable by http(s) URL goes to the download stage
    counter: Any = dataclasses.field(default=None, compare=False, hash=False)
    pdf_layout: bool = False  # PDFs: rapid-layout's regions order the blocks and crop vector figures (the recipe's
    # extract.pdf_layout turns it on; off, the stage reads top to bottom without the model)
    pdf_render_scale: float = 2.0  # PDFs: pixels per point of the page render the layout and crops use

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        return S.RAW

    def run(self, batches: Iterable[pa.RecordBatch], threads: int = 1,
            timing: list[float] | None = None) -> Iterator[pa.RecordBatch]:
        import time

        counts: dict[str, int] = {}
        task = _task_id()
        for batch in batches:
            for unit in batch.to_pylist():
                t0 = time.perf_counter()
                rows: list[dict] = []
                for doc_rows in self.read_unit(unit):
                    counts[unit[READ_UNIT]] = counts.get(unit[READ_UNIT], 0) + 1
                    rows += doc_rows
                    if len(rows) >= 256:
                        yield pa.RecordBatch.from_pylist(rows, schema=S.RAW)
                        rows = []
                if rows:
                    yield pa.RecordBatch.from_pylist(rows, schema=S.RAW)
                if timing is not None:
                    timing[0] += time.perf_counter() - t0
        if self.counter is not None:
            self.counter.add({f"{task}|{u}": n for u, n in counts.items()})

    def read_unit(self, unit: dict) -> Iterator[list[dict]]:
        """The rows of each document of one read unit, a document at a time."""
        fmt, uri, root = unit["format"], unit["uri"], unit["root"]
        base = f"{unit['dataset'] or posixpath.basename(root.rstrip('/'))}/{relative(uri, root)}"
        if fmt == HTML:
            yield self.read_page(uri, root, unit["dataset"], unit[READ_UNIT])
        elif fmt in (WARC, PDF, MINT):
            from filters.interleaved_sources import mint_documents, pdf_documents, warc_documents

            read = {WARC: warc_documents, PDF: pdf_documents, MINT: mint_documents}[fmt]
            for doc in read(uri, root, self):
                yield self.rows(doc, uri, base, unit[READ_UNIT])
        else:
            from filters.interleaved_sources import table_documents

            for doc in table_documents(uri, root, fmt, self):
                yield self.rows(doc, uri, base, unit[READ_UNIT])

    def read_page(self, uri: str, root: str, dataset: str, read_unit: str) -> list[dict]:
        """The rows of one HTML page file: its images come from files relative to it (or data: URIs, or
        http(s) URLs for the download stage)."""
        key = relative(uri, root)
        base = f"{dataset or posixpath.basename(root.rstrip('/'))}/{key}"
        doc = _Doc(key)
        try:
            html = decode_html(storage.read_bytes(uri, self.max_member_bytes))
        except Exception as e:  # noqa: BLE001 - a page that cannot be read is that page's problem
            doc.error = ("read_error", _detail(e))
            return self.rows(doc, uri, base, read_unit)
        self.parse_into(doc, html)
        for im in doc.images:
            doc.sources[im.position] = resolve_src(uri, root, im.src)
        return self.rows(doc, uri, base, read_unit)

    def parse_into(self, doc: _Doc, html: str) -> None:
        try:
            page = extract_page(html, self.skip_elements)
        except Exception as e:  # noqa: BLE001
            doc.error = ("html_unparsable", _detail(e))
            return
        doc.title, doc.segments, doc.images = page.title, page.segments, page.images

    def rows(self, doc: _Doc, source: str, base: str, read_unit: str) -> list[dict]:
        """The document row and one row per image; ids from (dataset/source relative to the root, key)."""
        doc_id = make_sample_id(S.KIND, base, doc.key)
        row = _row(doc_id, source, doc.key, S.DOCUMENT, None, read_unit) | {S.PAGE_URL: doc.page_url}
        if doc.error is not None:
            return [row | {ERROR: doc.error[0], ERROR_DETAIL: doc.error[1]}]
        row |= {S.TITLE: doc.title, S.SEGMENTS: S.segments_json(doc.segments)}
        if not any("text" in s for s in doc.segments):
            row |= {ERROR: "no_main_content", ERROR_DETAIL: "no text (after main-content extraction)"}
        rows = [row]
        seen: dict[str, int] = {}
        last_text = max((k for k, s in enumerate(doc.segments) if "text" in s), default=-1)
        after = {s["image"] for s in doc.segments[last_text + 1:] if "image" in s}
        host = (urllib.parse.urlsplit(doc.page_url).hostname or "") if doc.page_url else ""
        for im in doc.images:
            label = str(im.position) if doc.by_position or im.src is None else im.src
            ikey = image_key(doc.key, label, seen)
            irow = _row(make_sample_id(S.KIND, base, ikey), source, ikey, S.IMAGE_UNIT, doc_id, read_unit) | {
                S.POSITION: im.position, S.SRC: im.src, S.ALT: im.alt, S.LINK: im.link,
                S.DECLARED_WIDTH: im.declared_width, S.DECLARED_HEIGHT: im.declared_height,
                S.IS_LAST: im.position in after, S.PAGE_HOST: host} | doc.extra.get(im.position, {})
            if not im.in_main:
                rows.append(irow | {ERROR: "image_boilerplate", ERROR_DETAIL: "removed with the boilerplate"})
                continue
            irow[S.CAPTION] = image_context(doc.segments, im.position, im.alt)
            rows.append(irow | self.fetch(*doc.sources.get(im.position, ("error:image_missing", "no source"))))
        return rows

    def fetch(self, how: str, where: Any) -> dict:
        """The image columns for one source: bytes, a URL for the download stage, or an error."""
        if how.startswith("error:"):
            return {ERROR: how.split(":", 1)[1], ERROR_DETAIL: str(where)}
        if how == "url":
            if self.fetch_remote:
                return {S.URL: where}
            return {ERROR: "image_missing", ERROR_DETAIL: f"only a remote URL ({where[:100]}), and fetch_remote is off"}
        try:
            if how == "bytes":
                data = where
            elif how == "data":
                data = read_data_uri(where)
            elif how == "warc":
                from filters.interleaved_sources import read_warc_record

                data = read_warc_record(*where)
            else:
                data = storage.read_bytes(where, self.max_member_bytes)
        except Exception as e:  # noqa: BLE001 - an unreadable image removes that image only
            if _missing(e):
                return {ERROR: "image_missing", ERROR_DETAIL: f"no file {str(where)[-200:]}"}
            return {ERROR: "read_error", ERROR_DETAIL: _detail(e)}
        if data is not None and len(data) > self.max_member_bytes:
            return {ERROR: "read_error", ERROR_DETAIL: f"{len(data)} bytes > read.max_member_bytes"}
        return {S.IMAGE: data}


def _row(sample_id: str, source: str, key: str, unit: str, parent: str | None, read_unit: str) -> dict:
    return {SAMPLE_ID: sample_id, "kind": S.KIND, "source": source, "source_key": key, L.UNIT: unit,
            L.PARENT_ID: parent, READ_UNIT: read_unit}


def _task_id() -> str:
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        return str(ctx.partitionId()) if ctx is not None else "local"
    except ImportError:
        return "local"
