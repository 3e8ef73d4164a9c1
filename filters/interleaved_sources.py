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
import statistics
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


# --- MINT-1T PDF shards -----------------------------------------------------------------------------------

TIFF_EXTS = ("tiff", "tif")
_PEEK_MEMBERS = 16  # members looked at to tell a MINT-1T PDF tar from another tar
_PEEK_JSON_BYTES = 8 << 20


def is_mint_tar(uri: str) -> bool:
    """A webdataset tar of MINT-1T's PDF (or ArXiv) subset: among its first members, a key with both a
    `.json` and a `.tiff`, or a `.json` holding `texts` and `images`."""
    import tarfile

    from pipelines.io.readers import split_key

    exts: dict[str, set[str]] = {}
    try:
        with storage.open_read(uri) as stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
            for n, m in enumerate(tf):
                if n >= _PEEK_MEMBERS:
                    break
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                ext = ext.lower()
                exts.setdefault(key, set()).add(ext)
                if "json" in exts[key] and exts[key] & set(TIFF_EXTS):
                    return True
                if ext == "json" and m.size <= _PEEK_JSON_BYTES:
                    f = tf.extractfile(m)
                    try:
                        doc = json.loads(f.read()) if f is not None else None
                    except ValueError:
                        continue
                    if isinstance(doc, dict) and {"texts", "images"} <= set(doc):
                        return True
    except Exception:  # noqa: BLE001 - not a tar we can read: not one of ours
        return False
    return False


def mint_documents(uri: str, root: str, reader) -> Iterator[_Doc]:
    """The samples of one MINT-1T PDF tar, a document each: `{key}.json` holds OBELICS-style `texts` and
    `images` (aligned; an image is a token such as `page_5_image_131`), `image_metadata` (one entry per
    image, in image order: page, xref, width, height) and the PDF's `url` / `pdf_name`; `{key}.tiff` holds
    one frame per image, in the order the images appear. Each frame is re-encoded losslessly (PNG) as that
    image's bytes. A document is `<tar>::<key>`, its images `<tar>::<key>::<position>`.

    The tar is walked by readers.read_tar (unsafe members, repeated keys, oversized members, a damaged
    tar: their reasons); then: no json -> `read_error`; a json that does not parse -> `meta_invalid`; no
    `texts` list, lists of different lengths, a position with both -> `row_invalid`; images but no TIFF
    -> those images `image_missing`; a TIFF that cannot be read -> its images `image_undecodable`; fewer
    frames than images -> the images without one `image_missing`."""
    from pipelines.io.readers import read_tar
    from schemas.image_text import META

    rel = relative(uri, root)
    for row in read_tar(uri, reader.max_member_bytes):
        doc = _Doc(f"{rel}::{row['source_key']}", by_position=True)
        error, detail, meta, tiff = row["error"], row["error_detail"], row[META], row["image"]
        if error == "image_missing" and meta is not None:
            error = None  # a document without images has no TIFF: whether one is missing is decided below
        elif error is None and meta is None:
            error, detail = "read_error", "the sample has a TIFF but no .json member"
        elif error == "image_missing":
            error, detail = "read_error", f"not a MINT-1T sample: no .json member ({detail})"
        if error is not None:
            doc.error = (error, detail or error)
            yield doc
            continue
        try:
            _mint_sample(doc, json.loads(meta), tiff)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            doc.error = ("row_invalid", _detail(e))
        yield doc


def _mint_sample(doc: _Doc, data: Any, tiff: bytes | None) -> None:
    if not isinstance(data, dict):
        raise TypeError(f"the json is a {type(data).__name__}, not an object")
    if not isinstance(data.get("texts"), list):
        raise TypeError("the json has no 'texts' list")
    if not isinstance(data.get("images"), list):
        raise TypeError("the json has no 'images' list")
    _obelics(doc, {"texts": data["texts"], "images": data["images"], "url": data.get("url")}, "", "")
    doc.title = data.get("pdf_name") if isinstance(data.get("pdf_name"), str) else None
    meta = data.get("image_metadata")
    meta = meta if isinstance(meta, list) else []
    frames = _tiff_frames(tiff, len(doc.images))
    for k, im in enumerate(doc.images):  # the k-th image of the document is the TIFF's k-th frame
        m = meta[k] if k < len(meta) and isinstance(meta[k], dict) else {}
        im.declared_width = m.get("width") if isinstance(m.get("width"), int) else None
        im.declared_height = m.get("height") if isinstance(m.get("height"), int) else None
        doc.sources[im.position] = frames[k]


def _tiff_frames(tiff: bytes | None, n: int) -> list[tuple[str, Any]]:
    """The sources of the first n frames of a multi-frame TIFF: ("bytes", PNG) or ("error:<reason>", why)."""
    import io
    import warnings

    from PIL import Image

    if n == 0:
        return []
    if not tiff:
        return [("error:image_missing", f"the json names {n} image(s) and the sample has no TIFF")] * n
    try:
        with warnings.catch_warnings():  # PIL warns on each damaged tag; the reason below says it once
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(tiff))
            count = getattr(im, "n_frames", 1)
    except Exception as e:  # noqa: BLE001 - a TIFF that cannot be read: none of its images
        return [("error:image_undecodable", f"the sample's TIFF cannot be read: {_detail(e)}")] * n
    out: list[tuple[str, Any]] = []
    for k in range(n):
        if k >= count:
            out.append(("error:image_missing", f"the TIFF has {count} frames; image {k + 1} of {n} has none"))
            continue
        try:
            im.seek(k)
            frame = im.copy()  # loads the frame
            if frame.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
                frame = frame.convert("RGBA" if "A" in frame.mode else "RGB")
            buf = io.BytesIO()
            frame.save(buf, format="PNG")
            out.append(("bytes", buf.getvalue()))
        except Exception as e:  # noqa: BLE001 - one frame that does not decode
            why = "image_truncated" if "truncated" in str(e).lower() else "image_undecodable"
            out.append((f"error:{why}", f"TIFF frame {k}: {_detail(e)}"))
    return out


# --- PDF ---------------------------------------------------------------------------------------------------

def _lines(textpage, origin: tuple[float, float]) -> list:
    """The text lines of a page in pdfium's text order (it ends a line with a generated CR LF), each with
    the box of its characters in page points, top-down from the crop box's top-left corner `origin`
    (left and right: the outermost characters; top and bottom: the median character's loose box, the
    font's ascent to descent). Characters are read one by one: get_text_range leaves out a glyph without
    a code point, so its string does not line up with the character indices."""
    import pypdfium2.raw as pdfium_c

    from filters.pdf_layout import Line

    left, top = origin
    out: list = []
    text: list[str] = []
    xs0, ys0, xs1, ys1, char_area = [], [], [], [], 0.0

    def end_line():
        nonlocal text, xs0, ys0, xs1, ys1, char_area
        words = " ".join("".join(text).split())
        if words and xs0:  # top and bottom: the median character's (a superscript or an odd glyph is an outlier)
            box = (min(xs0) - left, top - statistics.median(ys1), max(xs1) - left, top - statistics.median(ys0))
            out.append(Line(box, words, len(xs0), char_area))
        text, xs0, ys0, xs1, ys1, char_area = [], [], [], [], [], 0.0

    for i in range(textpage.count_chars()):
        code = pdfium_c.FPDFText_GetUnicode(textpage.raw, i)
        if code in (0x0D, 0x0A):
            if code == 0x0A or not text:
                end_line()
            continue
        if (code < 0x20 and code != 0x09) or code == 0x7F or 0xD800 <= code <= 0xDFFF:
            continue  # no code point, a control character or half a surrogate pair: nothing to write
        ch = "-" if code == 0xFFFE else chr(code)  # pdfium's mark for a hyphen that ends a line
        text.append(ch)
        if ch.isspace():
            continue
        l_, b_, r_, t_ = textpage.get_charbox(i)
        char_area += max(0.0, r_ - l_) * max(0.0, t_ - b_)
        l_, b_, r_, t_ = textpage.get_charbox(i, loose=True)  # the font's ascent to descent
        xs0.append(l_), ys0.append(b_), xs1.append(r_), ys1.append(t_)
    end_line()
    return out


def _plain_blocks(lines: list, images: list) -> list:
    """The fallback order of one page (no layout): lines and image objects top to bottom (then left to
    right); the lines between two images are one block."""
    from filters.pdf_layout import Block

    items = sorted([(ln.box[1], ln.box[0], 0, ln) for ln in lines] + [(im.box[1], im.box[0], 1, im) for im in images],
                   key=lambda it: it[:3])
    blocks: list = []
    for _, _, is_image, item in items:
        if is_image:
            blocks.append(Block(item.box, image=item))
        elif blocks and blocks[-1].image is None:
            blocks[-1].lines.append(item)
        else:
            blocks.append(Block(item.box, lines=[item]))
    return blocks


def pdf_documents(uri: str, root: str, reader) -> Iterator[_Doc]:
    """A PDF is one document: text and images of every page in reading order (pypdfium2), lines joined
    into paragraphs unless a vertical gap above 0.9 line heights (or a block boundary) parts them. An
    image object is `<pdf>::p<page>.<n>` (the n-th image object of the page), read as decoded pixels (PNG).

    With `reader.pdf_layout` (filters/pdf_layout.py), each page is rendered at `reader.pdf_render_scale`
    pixels per point and rapid-layout's model finds its regions: blocks are read column-aware (the left
    column before the right), text in header/footer regions is left out (their image objects are
    `image_boilerplate`), and a figure region that holds no image object and little text (a vector
    drawing) is cropped from the render as the image `<pdf>::p<page>.figure<n>`. A rotated page, or a
    page the model fails on, is read without layout: top to bottom."""
    import io
    import logging

    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    from filters.pdf_layout import PageImage as PdfImage

    layout = bool(getattr(reader, "pdf_layout", False))
    scale = float(getattr(reader, "pdf_render_scale", 2.0))
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
        pages = []  # (lines, image objects) per page
        for p in range(len(pdf)):
            page = pdf[p]
            left, _, _, top = page.get_bbox()
            images = []
            for n, obj in enumerate(page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE], max_depth=3)):
                l_, b_, r_, t_ = obj.get_bounds()
                try:
                    buf = io.BytesIO()
                    obj.get_bitmap(render=True).to_pil().save(buf, format="PNG")
                    src = ("bytes", buf.getvalue())
                except Exception as e:  # noqa: BLE001 - one image that cannot be rendered
                    src = ("error:image_undecodable", _detail(e))
                images.append(PdfImage((l_ - left, top - t_, r_ - left, top - b_), f"p{p}.{n}", src))
            pages.append((_lines(page.get_textpage(), (left, top)), images))
        heights = sorted(ln.box[3] - ln.box[1] for lines, _ in pages for ln in lines) or [10.0]
        line_h = heights[len(heights) // 2]
        for p, (lines, images) in enumerate(pages):
            blocks, boiler = None, []
            if layout and pdf[p].get_rotation() == 0:
                try:
                    from filters import pdf_layout

                    s = pdf_layout.render_scale(*pdf[p].get_size(), scale)
                    render = pdf[p].render(scale=s).to_pil()
                    regions = pdf_layout.detect(render, s)
                    blocks, boiler = pdf_layout.arrange_page(regions, lines, images, render, s, p, line_h)
                except Exception as e:  # noqa: BLE001 - the page is read without layout
                    logging.getLogger(__name__).warning("%s page %d: layout failed, read top to bottom (%s)",
                                                        rel, p, _detail(e))
                    blocks, boiler = None, []
            for im in boiler:
                k = len(doc.images)
                doc.images.append(PageImage(k, im.name, None, None, None, None, in_main=False))
                doc.sources[k] = im.source
            _add_blocks(doc, blocks if blocks is not None else _plain_blocks(lines, images), line_h)
        pdf.close()
    except Exception as e:  # noqa: BLE001 - a PDF that cannot be parsed is that document's problem
        doc = _Doc(rel, error=("read_error", _detail(e)))
    finally:
        if tmp:
            import os

            os.remove(local)
    yield doc


def _add_blocks(doc: _Doc, blocks: list, line_h: float) -> None:
    """One page's blocks into the document's segments: lines are one paragraph unless a vertical gap
    above 0.9 line heights parts them; an image, a layout region and the page start a new paragraph (a
    block of lines no region holds continues one such block before it, unless it starts higher up: a
    new column)."""
    para: list[str] = []
    prev = None  # the previous line of the paragraph being built

    def flush():
        nonlocal para, prev
        if para:
            doc.segments.append({"text": " ".join(para)})
        para, prev = [], None

    loose_before = False
    for block in blocks:
        if block.image is not None:
            flush()
            k = len(doc.images)
            doc.images.append(PageImage(k, block.image.name, None, None, None, None, in_main=True))
            doc.sources[k] = block.image.source
            doc.segments.append({"image": k})
            loose_before = False
            continue
        if not (block.loose and loose_before) or (prev is not None and block.lines[0].box[1] < prev.box[1] - line_h):
            flush()
        for ln in block.lines:
            if para and prev is not None and ln.box[1] - prev.box[3] > 0.9 * line_h:
                flush()
            para.append(ln.text)
            prev = ln
        loose_before = block.loose
    flush()
