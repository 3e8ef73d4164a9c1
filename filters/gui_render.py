"""Render web pages in headless Chromium (Playwright) and collect every visible element with its box.

`RenderPage` reads render rows (unit `render`: `url` / `path` / `html`, `viewport_width`,
`viewport_height`, `device_scale`); page rows pass through. It writes `screenshot` (PNG of the
viewport, viewport x device scale pixels), `elements` (JSON: every visible element with its tag, role,
accessible name, text, trimmed attributes, a trimmed HTML snippet and its box 0-999), `qa` (referring
expression pairs, see `qa_pairs`), `element_count`, `final_url`, the image features dedup and the
rules read (`width`, `height`, `content_sha`, `source_bytes`, `phash`, `phash256`, `pixel_std`), and
`error` (`render_timeout`, `render_failed`, `download_http_error` for a URL answered >= 400) for a
render that fails; it removes `html` (a WARC page's body).

One browser per Python worker (launched in `setup`, Debian's /usr/bin/chromium; Playwright never
downloads one), a pool of `pages` pages rendering concurrently within a batch. Visible means: not
display:none / visibility:hidden / opacity 0 (`checkVisibility`), non-zero size, some part inside the
viewport, and not covered: `document.elementFromPoint` at the centre of its visible part returns the
element or one of its descendants. Only elements a person can refer to are kept: those with text of
their own, form controls, links, buttons, images and elements with an ARIA role. Attributes are
trimmed as Pix2Struct and CogAgent trim HTML: an allowlist (no class, style, data-*, event handlers),
values cut short.

Network: a page may fetch only from its own origin (for a local file: its own folder); anything else is
aborted unless `allow_external`. http(s) hosts that resolve to private, link-local or reserved addresses
(and loopback unless `allow_loopback`) are refused with the download stage's policy; a page whose own
URL is refused is `download_blocked_address`. A page that does not load within `load_timeout_s` is `render_timeout`;
scripts that never settle are cut: after `load`, the render waits at most `settle_s` for the network to
go quiet, then takes the screenshot anyway.

`OcrAgreement` reads `screenshot` (or its spool reference) and `elements`: for up to `elements` short
text elements of a render (`min_chars`-`max_chars` characters: labels, links, buttons; a fixed choice), PP-OCR (the OCR kind's reader, filters.ocr) reads the pixels
inside the element's box; `ocr_agreement` = mean (1 - CER) against the DOM text.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import html as htmllib
import io
import json
import os
import random
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pyarrow as pa

from filters.base import Stage
from filters.media import column_bytes
from schemas import boxes as B
from schemas import gui as S
from schemas import ledger as L
from schemas.common import ERROR, ERROR_DETAIL, SAMPLE_ID

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu")
KEEP_ATTRS = ("type", "name", "placeholder", "aria-label", "alt", "title", "role", "href", "value", "for")
FEATURES = ("width", "height", "content_sha", "source_bytes", "phash", "phash256", "pixel_std")

# Collect the visible elements of the viewport. Runs in the page; returns CSS-pixel rects.
ELEMENTS_JS = r"""
([maxEls, keep]) => {
  const vw = window.innerWidth, vh = window.innerHeight;
  const SKIP = new Set(['SCRIPT','STYLE','NOSCRIPT','TEMPLATE','META','LINK','HEAD','HTML','BODY','BR','WBR']);
  const ROLES = {A:'link', BUTTON:'button', INPUT:'textbox', SELECT:'combobox', TEXTAREA:'textbox', IMG:'img',
    H1:'heading', H2:'heading', H3:'heading', H4:'heading', H5:'heading', H6:'heading', NAV:'navigation',
    LI:'listitem', TH:'columnheader', TD:'cell', LABEL:'label', SUMMARY:'button', OPTION:'option', P:'paragraph',
    CODE:'code', PRE:'code', SVG:'img', CANVAS:'img', VIDEO:'video'};
  const INPUT_ROLES = {checkbox:'checkbox', radio:'radio', submit:'button', button:'button', reset:'button',
    range:'slider', search:'searchbox', image:'button'};
  const squash = s => (s || '').replace(/\s+/g, ' ').trim();
  const ownText = el => squash(Array.from(el.childNodes).filter(n => n.nodeType === 3).map(n => n.textContent).join(' '));
  const out = [];
  const all = document.body ? document.body.querySelectorAll('*') : [];
  for (const el of all) {
    if (out.length >= maxEls) break;
    const tag = el.tagName.toUpperCase();
    if (SKIP.has(tag)) continue;
    const own = ownText(el);
    const interactive = ['A','BUTTON','INPUT','SELECT','TEXTAREA','IMG','SVG','CANVAS','VIDEO','SUMMARY'].includes(tag)
      || el.hasAttribute('role') || el.hasAttribute('onclick') || el.tabIndex >= 0 && el.hasAttribute('tabindex');
    if (!own && !interactive) continue;
    if (tag === 'INPUT' && (el.type || '').toLowerCase() === 'hidden') continue;
    if (el.checkVisibility && !el.checkVisibility({opacityProperty: true, visibilityProperty: true})) continue;
    const st = getComputedStyle(el);
    if (st.display === 'none' || st.visibility !== 'visible' || parseFloat(st.opacity) === 0) continue;
    const r = el.getBoundingClientRect();
    if (r.width < 1 || r.height < 1) continue;
    const x1 = Math.max(0, r.left), y1 = Math.max(0, r.top), x2 = Math.min(vw, r.right), y2 = Math.min(vh, r.bottom);
    if (x2 - x1 < 1 || y2 - y1 < 1) continue;
    const hit = document.elementFromPoint((x1 + x2) / 2, (y1 + y2) / 2);
    if (!hit || !(hit === el || el.contains(hit))) continue;
    const attrs = {};
    for (const k of keep) {
      const v = el.getAttribute(k);
      if (v !== null && squash(v)) attrs[k] = squash(v).slice(0, 80);
    }
    let role = el.getAttribute('role') || (tag === 'INPUT' ? (INPUT_ROLES[(el.type || '').toLowerCase()] || 'textbox') : ROLES[tag]) || '';
    let label = '';
    if (el.id) { const l = document.querySelector('label[for="' + CSS.escape(el.id) + '"]'); if (l) label = squash(l.innerText); }
    const text = squash(tag === 'INPUT' || tag === 'TEXTAREA' ? (el.value || '') : (own ? el.innerText : ''));
    const name = squash(el.getAttribute('aria-label') || el.getAttribute('alt') || label || el.getAttribute('title')
      || el.getAttribute('placeholder') || (own || tag === 'A' || tag === 'BUTTON' ? el.innerText : ''));
    out.push({tag: tag.toLowerCase(), role: role, name: name.slice(0, 120), text: text.slice(0, 300), attrs: attrs,
              rect: [x1, y1, x2 - x1, y2 - y1]});
  }
  return out;
}
"""


def snippet(e: dict) -> str:
    """An element as trimmed HTML: its tag, the kept attributes, its text (cut at 80 characters)."""
    attrs = "".join(f' {k}="{htmllib.escape(v, quote=True)}"' for k, v in sorted(e["attrs"].items()))
    text = htmllib.escape(e["text"][:80])
    return f"<{e['tag']}{attrs}>{text}</{e['tag']}>" if text or e["tag"] not in ("img", "input") else f"<{e['tag']}{attrs}>"


def description(e: dict) -> str:
    """How a person would refer to the element: its role and accessible name (or text)."""
    name = e["name"] or e["text"] or e["attrs"].get("href", "")
    role = e["role"] or e["tag"]
    return f'the {role} "{name[:80]}"' if name else f"the {role}"


def qa_pairs(elements: list[dict], n: int, seed: str) -> list[dict]:
    """Up to `n` pairs, alternating referring-expression generation (a box -> the element, as its
    description and trimmed HTML) and comprehension (a description -> the box), over a fixed random
    choice of elements whose description is unique in the render."""
    counts: dict[str, int] = {}
    for e in elements:
        counts[description(e)] = counts.get(description(e), 0) + 1
    usable = [e for e in elements if counts[description(e)] == 1 and (e["name"] or e["text"])]
    rng = random.Random(seed)
    chosen = rng.sample(usable, min(n, len(usable)))
    out = []
    for i, e in enumerate(chosen):
        block = B.BEGIN_BOX + B.box_block([e["box"]]) + B.END_BOX
        if i % 2 == 0:
            out.append({"task": "reg", "question": f"What element is at {block}?",
                        "answer": f"{description(e)}: {snippet(e)}"})
        else:
            out.append({"task": "rec", "question": f"Where is {description(e)}?", "answer": block})
    return out


def image_features(png: bytes) -> dict[str, Any]:
    """The features dedup and the rules read, as filters.decode computes them for any image."""
    from PIL import Image

    from filters.decode import draft_factor, gray_features

    img = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = img.size
    gray = img.convert("L")
    k = draft_factor(w, h)
    gray = gray.reduce(k) if k > 1 else gray
    return {"width": w, "height": h, "content_sha": hashlib.sha256(png).hexdigest(), "source_bytes": len(png),
            **gray_features(gray)}


def page_url(url: str | None, path: str | None) -> str:
    if url:
        return url
    return "file://" + os.path.abspath(path or "")


def allowed(request_url: str, page: str, allow_external: bool) -> bool:
    """A request may go to the page's own origin (a local file: its folder and below) unless the recipe
    allows any; data: and blob: URLs never leave the page."""
    if allow_external or request_url.startswith(("data:", "blob:", "about:")):
        return True
    r, p = urlsplit(request_url), urlsplit(page)
    if p.scheme == "file":
        return r.scheme == "file" and os.path.abspath(r.path).startswith(os.path.dirname(os.path.abspath(p.path)) + os.sep)
    return (r.scheme, r.netloc) == (p.scheme, p.netloc)


@dataclasses.dataclass(frozen=True)
class RenderPage(Stage):
    name: ClassVar[str] = "render"
    pages: int = 4  # pages rendering at once per browser (one browser per Python worker)
    load_timeout_s: float = 15.0
    settle_s: float = 2.0  # after load, wait at most this long for the network to go quiet
    max_elements: int = 400
    min_box_side: float = 4.0  # element boxes smaller than this (screenshot pixels) are left out
    qa_per_render: int = 8
    allow_external: bool = False  # fetch from other origins than the page's own
    block_private: bool = True  # http(s) hosts resolving to private, link-local, reserved addresses are refused
    allow_loopback: bool = False  # 127/8 and ::1 (tests and local mirrors)
    javascript: bool = True
    seed: int = 0

    def cache_key(self) -> Any:
        return dataclasses.replace(self, pages=0)

    def drops(self) -> list[str]:
        return [S.HTML]  # a WARC page's body: not needed once rendered

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.SCREENSHOT, pa.binary()), pa.field(S.ELEMENTS, pa.string()), pa.field(S.QA, pa.string()),
                pa.field(S.ELEMENT_COUNT, pa.int32()), pa.field(S.FINAL_URL, pa.string()),
                pa.field("width", pa.int32()), pa.field("height", pa.int32()), pa.field("content_sha", pa.string()),
                pa.field("source_bytes", pa.int64()), pa.field("phash", pa.int64()), pa.field("phash256", pa.binary()),
                pa.field("pixel_std", pa.float32()), pa.field(ERROR, pa.string()), pa.field(ERROR_DETAIL, pa.string())]

    def setup(self, threads: int) -> dict:
        loop = asyncio.new_event_loop()
        state = {"loop": loop, "pw": None, "browser": None}
        self._launch(state)
        return state

    def _launch(self, state: dict) -> None:
        from playwright.async_api import async_playwright

        async def start():
            if state["pw"] is None:
                state["pw"] = await async_playwright().start()
            state["browser"] = await state["pw"].chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))

        state["loop"].run_until_complete(start())

    async def _render(self, browser, row: dict) -> dict:
        from playwright.async_api import TimeoutError as PlaywrightTimeout

        vw, vh, dpr = int(row[S.VIEW_W]), int(row[S.VIEW_H]), float(row[S.SCALE])
        target = page_url(row[S.URL], row[S.PATH])
        body = row[S.HTML]
        if body is None:  # the page's own host first: a refused page never reaches the browser
            why = await self._address_refusal(target)
            if why is not None:
                return {ERROR: "download_blocked_address", ERROR_DETAIL: f"{target[:200]}: {why}"}
        ctx = await browser.new_context(viewport={"width": vw, "height": vh}, device_scale_factor=dpr,
                                        java_script_enabled=self.javascript, service_workers="block",
                                        accept_downloads=False)
        try:
            page = await ctx.new_page()
            refused: dict[str, str] = {}

            async def route(r):
                url = r.request.url
                if body is not None and url.split("#")[0] == target.split("#")[0]:
                    await r.fulfill(status=200, body=body, headers={"content-type": "text/html"})
                elif body is None and allowed(url, target, self.allow_external):
                    why = await self._address_refusal(url)
                    if why is None:
                        await r.continue_()
                    else:
                        refused[url] = why
                        await r.abort("addressunreachable")
                else:
                    await r.abort()

            await page.route("**/*", route)
            try:
                resp = await page.goto(target, wait_until="load", timeout=self.load_timeout_s * 1000)
            except Exception as e:
                if refused:  # the page redirected to a refused host
                    url, why = next(iter(refused.items()))
                    return {ERROR: "download_blocked_address", ERROR_DETAIL: f"{url[:200]}: {why}"}
                if isinstance(e, PlaywrightTimeout):
                    return {ERROR: "render_timeout", ERROR_DETAIL: str(e).splitlines()[0][:300]}
                raise
            if resp is not None and resp.status >= 400:
                return {ERROR: "download_http_error", ERROR_DETAIL: f"HTTP {resp.status} for {target[:200]}"}
            try:
                await page.wait_for_load_state("networkidle", timeout=self.settle_s * 1000)
            except PlaywrightTimeout:
                pass  # scripts that never settle are cut here
            png = await page.screenshot(timeout=self.load_timeout_s * 1000, animations="disabled")
            raw = await page.evaluate(ELEMENTS_JS, [self.max_elements, list(KEEP_ATTRS)])
            return {"png": png, "raw": raw, S.FINAL_URL: page.url}
        except PlaywrightTimeout as e:
            return {ERROR: "render_timeout", ERROR_DETAIL: str(e).splitlines()[0][:300]}
        except Exception as e:  # noqa: BLE001 - a page that crashes the tab, a bad URL: this render's problem
            return {ERROR: "render_failed", ERROR_DETAIL: f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        finally:
            await ctx.close()

    async def _address_refusal(self, url: str) -> str | None:
        """Why an http(s) request may not go out (the download stage's address policy), else None. The
        host is resolved here and again by Chromium: a guard against plain private targets, not against
        DNS rebinding (the download stage pins its checked address; a browser cannot)."""
        from filters.download import AddressPolicy

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        policy = AddressPolicy(self.block_private, self.allow_loopback)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, parts.port or 80)
        except OSError:
            return None  # Chromium reports the DNS failure itself
        for info in infos:
            why = policy.refusal(info[4][0])
            if why is not None:
                return f"{parts.hostname} resolves to a {why} address"
        return None

    async def _render_all(self, browser, rows: list[dict]) -> list[dict]:
        sem = asyncio.Semaphore(max(1, self.pages))
        hard = self.load_timeout_s + self.settle_s + self.load_timeout_s + 10

        async def one(row):
            async with sem:
                try:
                    return await asyncio.wait_for(self._render(browser, row), hard)
                except asyncio.TimeoutError:
                    return {ERROR: "render_timeout", ERROR_DETAIL: f"render took more than {hard:.0f} s"}

        return await asyncio.gather(*(one(r) for r in rows))

    def finish(self, row: dict, got: dict) -> dict:
        """Screenshot pixels, element boxes 0-999, QA pairs and features for one successful render."""
        feats = image_features(got["png"])
        w, h, dpr = feats["width"], feats["height"], float(row[S.SCALE])
        elements = []
        for e in got["raw"]:
            px, why = B.check(B.from_css(*e.pop("rect"), device_scale=dpr), w, h, self.min_box_side)
            if why is None:
                e["box"] = B.to_grid(px, w, h)
                e["html"] = snippet(e)
                elements.append(e)
        qa = qa_pairs(elements, self.qa_per_render, f"{self.seed}/{row[SAMPLE_ID]}")
        return {S.SCREENSHOT: got["png"], S.ELEMENTS: json.dumps(elements, ensure_ascii=False),
                S.QA: json.dumps(qa, ensure_ascii=False), S.ELEMENT_COUNT: len(elements),
                S.FINAL_URL: got[S.FINAL_URL], **feats}

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if r[L.UNIT] == "render" and r[ERROR] is None]
        results: dict[int, dict] = {}
        if todo:
            if state["browser"] is None or not state["browser"].is_connected():
                self._launch(state)
            got = state["loop"].run_until_complete(self._render_all(state["browser"], [rows[i] for i in todo]))
            results = dict(zip(todo, got))
        out: dict[str, list] = {f.name: [] for f in self.adds()}
        for i, r in enumerate(rows):
            res = results.get(i)
            if res is not None and ERROR not in res:
                try:
                    res = self.finish(r, res)
                except Exception as e:  # noqa: BLE001 - a screenshot Pillow cannot read
                    res = {ERROR: "render_failed", ERROR_DETAIL: f"{type(e).__name__}: {e}"[:300]}
            res = res or {ERROR: r[ERROR], ERROR_DETAIL: r[ERROR_DETAIL]}
            for name, values in out.items():
                values.append(res.get(name))
        return out


@dataclasses.dataclass(frozen=True)
class OcrAgreement(Stage):
    """PP-OCR inside text elements vs their DOM text (see the module docstring)."""

    name: ClassVar[str] = "ocr"
    elements: int = 4  # text elements checked per render
    min_chars: int = 4  # only elements with at least this much text of their own
    max_chars: int = 80  # and at most this much: labels, links, buttons, headings (a paragraph costs seconds)
    max_height: int = 160  # crops taller than this (pixels) are scaled down first (3x phone renders)
    min_score: float = 0.5
    seed: int = 0

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.OCR_AGREEMENT, pa.float32()), pa.field(S.OCR_CHECKED, pa.int32())]

    def setup(self, threads: int) -> Any:
        from filters.ocr import engine

        engine(threads, min(self.min_score, 0.5))  # loads the models once per worker
        return threads

    def agreement(self, png: bytes, elements: list[dict], key: str, threads: int = 1) -> tuple[float | None, int]:
        from PIL import Image

        from filters.ocr import cer, compact, read_lines

        img = Image.open(io.BytesIO(png)).convert("RGB")
        w, h = img.size
        texts = [e for e in elements if self.min_chars <= len(compact(e["text"])) <= self.max_chars
                 and e["tag"] not in ("input", "textarea")]
        chosen = random.Random(f"{self.seed}/{key}").sample(texts, min(self.elements, len(texts)))
        scores = []
        for e in chosen:
            x1, y1, x2, y2 = e["box"]
            pad = 4
            crop = img.crop((max(0, int(x1 * w / 1000) - pad), max(0, int(y1 * h / 1000) - pad),
                             min(w, int((x2 + 1) * w / 1000) + pad), min(h, int((y2 + 1) * h / 1000) + pad)))
            if crop.height > self.max_height:
                crop = crop.resize((max(1, round(crop.width * self.max_height / crop.height)), self.max_height))
            lines, _ = read_lines(crop, threads, self.min_score, 4)
            read = " ".join(ln["text"] for ln in lines)
            scores.append(max(0.0, 1.0 - cer(compact(e["text"]), compact(read))))
        return (sum(scores) / len(scores) if scores else None), len(scores)

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        shots = column_bytes(batch, S.SCREENSHOT)
        out: dict[str, list] = {S.OCR_AGREEMENT: [], S.OCR_CHECKED: []}
        for png, els, key in zip(shots, batch.column(S.ELEMENTS).to_pylist(), batch.column(SAMPLE_ID).to_pylist()):
            if png is None or els is None:
                out[S.OCR_AGREEMENT].append(None)
                out[S.OCR_CHECKED].append(None)
                continue
            score, n = self.agreement(png, json.loads(els), key, state or 1)
            out[S.OCR_AGREEMENT].append(score)
            out[S.OCR_CHECKED].append(n)
        return out
