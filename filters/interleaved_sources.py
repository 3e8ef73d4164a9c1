"""Interleaved documents from WARC archives and from tables (OBELICS-style rows, MMC4 documents).

WARC (FastWARC 2.x): every `response` record with HTTP 200 and an HTML content type is a page; its main
content is extracted as for an HTML file (filters.html_extract). An `<img>` src is resolved against the
page URL and looked up among the WARC's own 200 responses (by URL; read back by the record's offset, so
the image bytes are never all held at once); else in a wget mirror beside the WARC
(`<warc folder>/<host[:port]>/<path>`, what `wget -p --warc-file` leaves); else the URL goes to the
download stage (`fetch_remote`). A page's source_key is `<warc relative path>#<target URI>`.

OBELICS rows (Parquet or JSONL): `texts` and `images` lists of the same length, exactly one non-null at
each position (`""` counts as null), `metadata` a JSON string (a list aligned with the positions; alt
text from its `alt_text`), `general_metadata` a JSON string with the document `url`; an image is a URL
(downloaded), bytes, `{"bytes": ...}` or `{"path": ...}` (relative to the table). MINT-1T's HTML parquet
reads the same. MMC4 documents (JSONL): `text_list` sentences and `image_info[]` with `raw_url` or
`image_name` (a file beside the table), `matched_text_index` (each image goes right after its sentence)
and `matched_sim` (kept as the image's `matched_sim`). A row's key is its `id`/`key`/`doc_id`/`url`
field, else `row<N>`/`line<N>`; its images are `<row key>::<position>`.
"""
from __future__ import annotations

import json
import posixpath
import re
import urllib.parse
from collections.abc import Iterator
from typing import Any

from filters.html_extract import MMC4, OBELICS, PageImage, _detail, _Doc, decode_html, relative, resolve_src
from pipelines.io import storage

HTML_TYPES = ("text/html", "application/xhtml+xml")
ROW_KEYS = ("id", "key", "doc_id", "document_id", "uid")


def _target(record) -> str:
    return (record.headers.get("WARC-Target-URI") or "").strip().strip("<>")


def _index(uri: str) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """(pages: (url, offset) of HTML 200 responses; images: url -> offset of the other 200 responses)."""
    from fastwarc import ArchiveIterator, WarcRecordType

    pages, others = [], {}
    with storage.open_read(uri) as f:
        for record in ArchiveIterator(f, record_types=WarcRecordType.response, parse_http=True):
            http = record.http_headers
            if http is None or http.status_code != 200:
                continue
            ctype = (record.http_content_type or "").split(";")[0].strip().lower()
            url = _target(record)
            if ctype in HTML_TYPES:
                pages.append((url, record.stream_pos))
            else:
                others.setdefault(_norm_url(url), record.stream_pos)
    return pages, others


def _norm_url(url: str) -> str:
    """The form a WARC target and a resolved src are compared in: scheme and host lower case, no fragment,
    repeated slashes collapsed (urljoin collapses them in a src, crawlers keep them in the target)."""
    parts = urllib.parse.urlsplit(url)
    path = re.sub(r"/{2,}", "/", parts.path or "/")
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, ""))


def read_warc_record(uri: str, offset: int) -> bytes:
    """The HTTP payload of the record at `offset` (a gzip member boundary in a .warc.gz)."""
    from fastwarc import ArchiveIterator

    with storage.open_read(uri) as f:
        f.seek(offset)
        for record in ArchiveIterator(f, parse_http=True):
            return record.reader.read()
    raise OSError(f"no WARC record at {uri}@{offset}")


def warc_documents(uri: str, root: str, reader) -> Iterator[_Doc]:
    """The pages of one WARC, a document at a time (an s3:// WARC is copied to a local temp file first:
    its records are read back by offset)."""
    rel = relative(uri, root)
    try:
        local, tmp = storage.local_copy(uri)
    except Exception as e:  # noqa: BLE001 - a WARC that cannot be read is one quarantined row
        yield _Doc(f"{rel}#@error", error=("read_error", _detail(e)))
        return
    try:
        try:
            pages, images = _index(local)
        except Exception as e:  # noqa: BLE001
            yield _Doc(f"{rel}#@error", error=("read_error", _detail(e)))
            return
        beside = uri.rsplit("/", 1)[0]
        seen: dict[str, int] = {}
        for url, offset in pages:
            seen[url] = seen.get(url, 0) + 1  # a URL crawled twice: the later copies get #2, #3, ...
            doc = _Doc(f"{rel}#{url}" + (f"#{seen[url]}" if seen[url] > 1 else ""), page_url=url)
            try:
                html = decode_html(read_warc_record(local, offset))
            except Exception as e:  # noqa: BLE001
                doc.error = ("read_error", _detail(e))
                yield doc
                continue
            reader.parse_into(doc, html)
            for im in doc.images:
                doc.sources[im.position] = _warc_source(url, im.src, images, local, beside)
            yield doc  # the caller reads the images while the local copy still exists
    finally:
        if tmp:
            import os

            os.remove(local)


def _warc_source(page_url: str, src: str | None, images: dict[str, int], uri: str, beside: str) -> tuple[str, Any]:
    if src is None or not src.strip():
        return "error:image_missing", "the <img> has no src"
    if src.strip().lower().startswith("data:"):
        return "data", src.strip()
    full = urllib.parse.urljoin(page_url, src.strip())
    if not full.lower().startswith(("http://", "https://")):
        return "error:image_outside_input", f"scheme not fetched: {src[:80]}"
    offset = images.get(_norm_url(full))
    if offset is not None:
        return "warc", (uri, offset)
    parts = urllib.parse.urlsplit(full)
    path = posixpath.normpath("/" + urllib.parse.unquote(parts.path)).lstrip("/")  # no way above the host folder
    mirrored = storage.join(beside, parts.netloc, path)
    if path and storage.exists(mirrored):
        return "file", mirrored
    return "url", full


# --- tables -----------------------------------------------------------------------------------------------

def detect_table(uri: str) -> str | None:
    """OBELICS or MMC4 from a table's columns (first row of a JSONL, the schema of a Parquet file)."""
    from pipelines.io import readers

    try:
        for _, _, row, _ in readers._table_rows(uri, {}):
            if row is None:
                continue
            cols = set(row)
            if {"texts", "images"} <= cols:
                return OBELICS
            if {"text_list", "image_info"} <= cols:
                return MMC4
            return None
    except Exception:  # noqa: BLE001 - not a table we can read: not one of ours
        return None
    return None


def _null(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v == "")


def _row_key(row: dict, pos_key: str) -> str:
    return next((str(row[k]) for k in ROW_KEYS if row.get(k) not in (None, "")), pos_key)


def _image_source(value: Any, base: str, root: str) -> tuple[str, Any]:
    if isinstance(value, (bytes, bytearray)):
        return "bytes", bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return "bytes", bytes(value["bytes"])
        value = value.get("path") or value.get("url")
    if not isinstance(value, str) or not value.strip():
        return "error:image_missing", "no image bytes, path or URL"
    return resolve_src(base + "/_", root, value)


def table_documents(uri: str, root: str, fmt: str, reader) -> Iterator[_Doc]:
    from pipelines.io import readers

    rel = relative(uri, root)
    base = uri.rsplit("/", 1)[0]
    seen: set[str] = set()
    try:
        for _, pos_key, row, error in readers._table_rows(uri, {}):
            key = _row_key(row or {}, pos_key)
            key = key if key not in seen else f"{key}@{pos_key}"
            seen.add(key)
            doc = _Doc(f"{rel}#{key}", by_position=True)
            if row is None:
                doc.error = ("read_error", error or "unreadable row")
            else:
                try:
                    (_obelics if fmt == OBELICS else _mmc4)(doc, row, base, root)
                except (TypeError, ValueError, KeyError, AttributeError) as e:
                    doc.error = ("row_invalid", _detail(e))
            yield doc
    except Exception as e:  # noqa: BLE001 - a table that cannot be read is one quarantined row
        yield _Doc(f"{rel}#@error", error=("read_error", _detail(e)))


def _json_field(value: Any) -> Any:
    if isinstance(value, str):
        return json.loads(value) if value.strip() else None
    return value


def _obelics(doc: _Doc, row: dict, base: str, root: str) -> None:
    texts, images = row["texts"], row["images"]
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise ValueError("texts and images must be lists of the same length")
    meta = _json_field(row.get("metadata"))
    meta = meta if isinstance(meta, list) and len(meta) == len(texts) else [None] * len(texts)
    general = _json_field(row.get("general_metadata")) or {}
    doc.page_url = (general.get("url") if isinstance(general, dict) else None) or row.get("url")
    for i, (t, im) in enumerate(zip(texts, images)):
        if not _null(t) and not _null(im):
            raise ValueError(f"position {i} has both a text and an image")
        if not _null(t):
            doc.segments.append({"text": str(t).strip()})
        elif not _null(im):
            m = meta[i] if isinstance(meta[i], dict) else {}
            src = im if isinstance(im, str) else m.get("src")
            doc.images.append(PageImage(i, src, m.get("alt_text"), None, m.get("rendered_width"),
                                        m.get("rendered_height"), in_main=True))
            doc.segments.append({"image": i})
            doc.sources[i] = _image_source(im, base, root)
    doc.segments = [s for s in doc.segments if "image" in s or s["text"]]


def _mmc4(doc: _Doc, row: dict, base: str, root: str) -> None:
    sentences, info = row["text_list"], row["image_info"] or []
    if not isinstance(sentences, list) or not isinstance(info, list):
        raise TypeError("text_list and image_info must be lists")
    doc.page_url = row.get("url")
    after: dict[int, list[int]] = {}
    for k, im in enumerate(info):
        idx = int(im["matched_text_index"])
        if not 0 <= idx < len(sentences):
            raise ValueError(f"image {k}: matched_text_index {idx} outside text_list")
        after.setdefault(idx, []).append(k)
    run: list[str] = []
    for i, sentence in enumerate(sentences):
        if sentence:
            run.append(str(sentence).strip())
        for k in after.get(i, []):
            if run:
                doc.segments.append({"text": " ".join(run)})
                run = []
            im = info[k]
            name, url = im.get("image_name"), im.get("raw_url")
            if name and storage.exists(storage.join(base, name)):
                doc.sources[k] = _image_source(name, base, root)
            else:
                doc.sources[k] = _image_source(url, base, root) if url else ("error:image_missing", "no raw_url")
            doc.images.append(PageImage(k, url or name, None, None, None, None, in_main=True))
            doc.extra[k] = {"matched_sim": None if im.get("matched_sim") is None else float(im["matched_sim"])}
            doc.segments.append({"image": k})
    if run:
        doc.segments.append({"text": " ".join(run)})


# --- PDF ---------------------------------------------------------------------------------------------------

def _lines(textpage) -> list[tuple[float, float, float, str]]:
    """(top, bottom, left, text) per text line of a page, in pdfium's text order (lines end in CRLF);
    a line's place is its first character's box."""
    text = textpage.get_text_range()
    count = textpage.count_chars()
    out, pos = [], 0
    for line in text.split("\r\n"):
        words = " ".join(line.split())
        if words:
            first = min(pos + len(line) - len(line.lstrip()), max(count - 1, 0))
            left, bottom, _, top = textpage.get_charbox(first)
            out.append((top, bottom, left, words))
        pos += len(line) + 2
    return out


def pdf_documents(uri: str, root: str, reader) -> Iterator[_Doc]:
    """A PDF is one document: text lines and embedded images of every page in reading order (top to
    bottom; pypdfium2), lines joined into paragraphs unless a vertical gap above 0.9 line heights parts them. An image is
    `<pdf>::p<page>.<n>` (n-th image object of the page), read as decoded pixels (PNG)."""
    import io

    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    rel = relative(uri, root)
    doc = _Doc(rel)
    try:
        local, tmp = storage.local_copy(uri)
    except Exception as e:  # noqa: BLE001
        doc.error = ("read_error", _detail(e))
        yield doc
        return
    try:
        pdf = pdfium.PdfDocument(local)
        items: list[tuple] = []  # (page, -top, left, kind, payload)
        for p in range(len(pdf)):
            page = pdf[p]
            for top, bottom, left, text in _lines(page.get_textpage()):
                items.append((p, -top, left, "text", (text, top - bottom)))
            for n, obj in enumerate(page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE], max_depth=3)):
                left, bottom, _, top = obj.get_bounds()
                try:
                    buf = io.BytesIO()
                    obj.get_bitmap(render=True).to_pil().save(buf, format="PNG")
                    src = ("bytes", buf.getvalue())
                except Exception as e:  # noqa: BLE001 - one image that cannot be rendered
                    src = ("error:image_undecodable", _detail(e))
                items.append((p, -top, left, "image", (f"p{p}.{n}", src)))
        items.sort(key=lambda it: it[:3])
        para: list[str] = []
        last = None  # (page, bottom y) of the previous line
        heights = sorted(it[4][1] for it in items if it[3] == "text") or [10.0]
        line_h = heights[len(heights) // 2]
        for page_no, neg_top, _, kind, payload in items:
            if kind == "text":
                text, height = payload
                if para and last is not None and (last[0] != page_no or (last[1] - (-neg_top)) > 0.9 * line_h):
                    doc.segments.append({"text": " ".join(para)})
                    para = []
                para.append(text)
                last = (page_no, -neg_top - height)
            else:
                if para:
                    doc.segments.append({"text": " ".join(para)})
                    para = []
                k = len(doc.images)
                doc.images.append(PageImage(k, payload[0], None, None, None, None, in_main=True))
                doc.sources[k] = payload[1]
                doc.segments.append({"image": k})
                last = None
        if para:
            doc.segments.append({"text": " ".join(para)})
        pdf.close()
    except Exception as e:  # noqa: BLE001 - a PDF that cannot be parsed is that document's problem
        doc = _Doc(rel, error=("read_error", _detail(e)))
    finally:
        if tmp:
            import os

            os.remove(local)
    yield doc
