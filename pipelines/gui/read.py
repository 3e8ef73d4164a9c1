"""Readers of gui inputs: folders of HTML pages, WARC files, URL lists.

Planning (driver, names only): `.html`/`.htm` files are pages (grouped `files_per_task` to a unit);
`.warc`/`.warc.gz` files are one unit each (every HTML `response` record is a page; other records are
the page's resources, not items); `.urls` files, and `.txt` files whose first line is an http(s) URL,
are URL lists (one URL a line, `#` comments), one unit each. Other files (CSS, images) are resources the pages may load from their own folder.

Reading (`ReadGui`, executors) yields each page (unit `page`) followed by its renders (unit `render`,
`parent_id` = the page), one per viewport drawn for it (`draw_viewports`: a fixed draw per page from
the recipe's list). A problem becomes a quarantined row: an unreadable file or WARC (`read_error`,
'@error' for a WARC that breaks off), a WARC HTML record without a target URL, a URL that is not
http(s) (`download_bad_url`); the renders of such a page carry the same reason.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Iterator
from typing import ClassVar

import pyarrow as pa

from pipelines.io import storage
from pipelines.io.readers import UnitReader, input_root, is_transient
from schemas import gui as S
from schemas import ledger as L
from schemas.common import ERROR_DETAIL, KIND, READ_UNIT, SAMPLE_ID, SOURCE, SOURCE_KEY, make_sample_id

HTML_EXTS = (".html", ".htm", ".xhtml")
WARC_EXTS = (".warc", ".warc.gz")


def plan_units(uris: Iterable[str], files_per_task: int) -> list[dict]:
    units, seen = [], set()
    for uri in uris:
        root = input_root(uri)
        files = [f for f in storage.list_files(uri) if f not in seen]
        seen.update(files)
        pages = [f for f in files if f.lower().endswith(HTML_EXTS)]
        for i in range(0, len(pages), max(1, files_per_task)):
            chunk = pages[i:i + files_per_task]
            units.append({"format": "html", "uri": chunk[0].rsplit("/", 1)[0], "files": chunk, "root": root})
        for f in files:
            low = f.lower()
            if low.endswith(WARC_EXTS):
                units.append({"format": "warc", "uri": f, "files": [f], "root": root})
            elif low.endswith(".urls") or (low.endswith(".txt") and _looks_like_url_list(f)):
                units.append({"format": "urls", "uri": f, "files": [f], "root": root})
    return units


def _looks_like_url_list(uri: str) -> bool:
    """A `.txt` file is a URL list when its first line that is not blank or a comment is an http(s) URL
    (a README beside the pages is not)."""
    try:
        with storage.open_read(uri) as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return True  # unreadable: the reader reports it
    first = next((ln.strip() for ln in head.splitlines() if ln.strip() and not ln.strip().startswith("#")), "")
    return first.lower().startswith(("http://", "https://"))


def unit_id(unit: dict) -> str:
    return ("html:" + unit["files"][0]) if unit["format"] == "html" else unit["uri"]


def parse_viewport(spec: str) -> tuple[str, int, int, float]:
    """'phone:390x844@3' -> ('phone', 390, 844, 3.0)."""
    try:
        device, rest = spec.split(":", 1)
        size, _, scale = rest.partition("@")
        w, h = size.lower().split("x")
        out = (device.strip(), int(w), int(h), float(scale or 1))
    except ValueError as e:
        raise ValueError(f"gui.viewports: {spec!r} is not DEVICE:WIDTHxHEIGHT@SCALE") from e
    if out[0] not in ("desktop", "tablet", "phone") or out[1] < 1 or out[2] < 1 or not 0.5 <= out[3] <= 4:
        raise ValueError(f"gui.viewports: {spec!r}: device desktop|tablet|phone, sizes > 0, scale 0.5-4")
    return out


def draw_viewports(page_id: str, viewports: list[tuple], n: int, seed: int) -> list[tuple]:
    """The viewports a page is rendered at: n distinct ones, a fixed draw per page and seed."""
    return random.Random(f"{seed}/{page_id}").sample(viewports, min(n, len(viewports)))


def _ident(path: str, root: str, dataset: str) -> str:
    rel = path[len(root):].lstrip("/") if root and path.startswith(root.rstrip("/") + "/") else path.rsplit("/", 1)[-1]
    return f"{dataset or root.rstrip('/').rsplit('/', 1)[-1]}/{rel}"


@dataclasses.dataclass(frozen=True)
class ReadGui(UnitReader):
    """Read units in; page rows, each followed by its render rows, out."""

    raw: ClassVar[pa.Schema] = S.RAW
    viewports: tuple = ()  # parsed (device, width, height, scale)
    renders_per_page: int = 2
    seed: int = 0
    max_bytes: int = 64_000_000

    def page(self, source: str, ident: str, key: str, stype: str, uid: str, **kw) -> list[dict]:
        row = {f.name: None for f in S.RAW}
        page_id = make_sample_id(S.KIND, ident, key)
        row.update({SAMPLE_ID: page_id, KIND: S.KIND, SOURCE: source, SOURCE_KEY: key, L.UNIT: "page",
                    S.SOURCE_TYPE: stype, READ_UNIT: uid, **kw})
        if row.get(ERROR_DETAIL):
            row[ERROR_DETAIL] = str(row[ERROR_DETAIL])[:500]
        out = [row]
        for device, w, h, dpr in draw_viewports(page_id, list(self.viewports), self.renders_per_page, self.seed):
            vk = f"{key}#{device}:{w}x{h}@{dpr:g}"
            out.append({**row, SAMPLE_ID: make_sample_id(S.KIND, ident, vk), SOURCE_KEY: vk, L.UNIT: "render",
                        L.PARENT_ID: page_id, S.DEVICE: device, S.VIEW_W: w, S.VIEW_H: h, S.SCALE: dpr})
        return out

    def read_unit(self, unit: dict) -> Iterator[list[dict]]:
        uid = unit_id(unit)
        if unit["format"] == "html":
            for f in unit["files"]:
                ident = _ident(f, unit["root"], self.dataset)
                err = None
                try:
                    head = storage.read_bytes(f, self.max_bytes)[:4096].lower()
                    if b"<" not in head:
                        err = ("not_html", "no markup in the first 4 KB")
                except Exception as e:
                    if is_transient(e):
                        raise
                    err = ("read_error", f"{type(e).__name__}: {e}")
                yield self.page(f, ident, "page", "html", uid, path=f, error=err and err[0],
                                error_detail=err and err[1])
            return
        ident = _ident(unit["uri"], unit["root"], self.dataset)
        if unit["format"] == "urls":
            text = storage.read_bytes(unit["uri"], self.max_bytes).decode("utf-8", errors="replace")
            seen: set[str] = set()
            for n, line in enumerate(text.splitlines()):
                url = line.strip()
                if not url or url.startswith("#"):
                    continue
                key = f"line{n + 1}"
                if url in seen:
                    yield self.page(unit["uri"], ident, key, "url", uid, url=url, error="duplicate_member",
                                    error_detail=f"{url} is listed again")
                    continue
                seen.add(url)
                bad = not url.lower().startswith(("http://", "https://"))
                yield self.page(unit["uri"], ident, key, "url", uid, url=url,
                                error="download_bad_url" if bad else None,
                                error_detail=f"not an http(s) URL: {url[:200]}" if bad else None)
            return
        yield from self.read_warc(unit, ident, uid)

    def read_warc(self, unit: dict, ident: str, uid: str) -> Iterator[list[dict]]:
        from fastwarc.warc import ArchiveIterator, WarcRecordType

        keys: set[str] = set()
        with storage.open_read(unit["uri"]) as f:
            for rec in ArchiveIterator(f, record_types=WarcRecordType.response, parse_http=True):
                ctype = (rec.http_content_type or "").lower()
                if "html" not in ctype:
                    continue  # a resource of some page, not a page
                url = rec.headers.get("WARC-Target-URI")
                key = rec.record_id or f"@{rec.stream_pos}"
                if key in keys:
                    key = f"{key}#{rec.stream_pos}"
                keys.add(key)
                body = rec.reader.read(self.max_bytes + 1)
                if len(body) > self.max_bytes:
                    yield self.page(unit["uri"], ident, key, "warc", uid, url=url, error="read_error",
                                    error_detail=f"HTML body above {self.max_bytes} bytes")
                elif not url or not url.lower().startswith(("http://", "https://")):
                    yield self.page(unit["uri"], ident, key, "warc", uid, error="download_bad_url",
                                    error_detail=f"record has no http(s) WARC-Target-URI ({url!r})")
                else:
                    yield self.page(unit["uri"], ident, key, "warc", uid, url=url, html=body)

    def items(self, unit: dict) -> Iterator[list[dict]]:
        """The unit's pages, each as its rows; a unit that fails to read (not transiently) ends with a
        read_error page, keyed by how many pages came before it."""
        pages, n = self.read_unit(unit), 0
        while True:
            try:
                group = next(pages)
            except StopIteration:
                return
            except Exception as e:
                if is_transient(e):
                    raise
                yield self.page(unit["uri"], _ident(unit["uri"], unit["root"], self.dataset), f"@error{n}",
                                unit["format"] if unit["format"] != "urls" else "url", unit_id(unit),
                                error="read_error", error_detail=f"{type(e).__name__}: {e}")
                return
            n += 1
            yield group
