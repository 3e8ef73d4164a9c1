"""Download images for rows that carry a URL instead of bytes (img2dataset-style, with an SSRF guard).

Reads `url`, `image`, `error`, `error_detail`. Fetches only rows with `error` null, `image` null and
an http(s) `url`; writes `image` (the body bytes, unchanged), `error` / `error_detail` (a stable
`download_*` reason code from schemas.ledger on failure, which quarantines the row downstream) and
`download_status`: "ok", "skipped" (the row already had bytes, an error, or no URL: all its columns
are passed through untouched), "opted_out", or the failure's reason code.

An X-Robots-Tag `noai` / `noimageai` answer gives `download_status="opted_out"` with `image` and
`error` null: the rules drop the row with reason `opted_out` (a decision, not a quarantine).

Safety: every connection resolves the host itself, refuses private, link-local (cloud metadata),
multicast, reserved, unspecified and (unless `allow_loopback`) loopback addresses *before* a socket is
opened, and then connects to the very address it checked (no second DNS lookup an attacker could
rebind). Redirects are followed by hand, one checked hop at a time. Bodies are streamed and cut at
`max_bytes`; each attempt has a wall-clock deadline; cookies, proxies and .netrc from the
environment are ignored (plain urllib3 has none of them; requests cost ~0.4 ms more CPU per URL).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar, NamedTuple
from urllib.parse import urljoin, urlsplit

import certifi
import pyarrow as pa
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationParseError,
    LocationValueError,
    NameResolutionError,
    NewConnectionError,
    SSLError,
)
from urllib3.exceptions import TimeoutError as TimeoutErrorU3
from urllib3.util import connection as u3_connection

from filters.base import Stage
from schemas import image_text as S
from schemas.common import ERROR, ERROR_DETAIL

DOWNLOAD_STATUS = "download_status"
OK, SKIPPED, OPTED_OUT = "ok", "skipped", "opted_out"
FAILED, HTTP_ERROR, TOO_LARGE = "download_failed", "download_http_error", "download_too_large"
TOO_MANY_REDIRECTS, BLOCKED, BAD_URL = (
    "download_too_many_redirects",
    "download_blocked_address",
    "download_bad_url",
)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_OPT_OUT = frozenset({"noai", "noimageai"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CHUNK = 64 * 1024
_MAX_PENDING_BATCHES = 32  # batches held while an earlier one waits for a slow URL (bounds memory)


class BlockedAddress(Exception):
    """A host resolved to an address the policy refuses; raised before any socket is opened.

    Deliberately not an OSError, so urllib3 lets it through unwrapped and un-retried.
    """


@dataclasses.dataclass(frozen=True)
class AddressPolicy:
    block_private: bool = True
    allow_loopback: bool = False

    def refusal(self, ip: str) -> str | None:
        """Why `ip` may not be contacted, or None when it may."""
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(ip.split("%", 1)[0])
        # An IPv4 address smuggled inside IPv6 reaches the IPv4 host: judge the embedded one.
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            elif addr in _NAT64:
                addr = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        # 0.0.0.0 / :: reach the local host on Linux, so they are never a legitimate image server.
        if addr.is_unspecified:
            return "unspecified"
        if addr.is_loopback:
            return None if self.allow_loopback else "loopback"
        if not self.block_private:
            return None
        for why, hit in (
            ("link-local", addr.is_link_local),
            ("multicast", addr.is_multicast),
            ("private", addr.is_private),
            ("reserved", addr.is_reserved),
            ("not globally routable", not addr.is_global),
        ):
            if hit:
                return why
        return None


def _open_checked_socket(conn: HTTPConnection, policy: AddressPolicy) -> socket.socket:
    """urllib3's `_new_conn`, but resolve once, check every address, then connect to a checked one."""
    host = conn._dns_host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, conn.port, u3_connection.allowed_gai_family(), socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise NameResolutionError(conn.host, conn, e) from e
    # Refuse the host if *any* record is bad: a public/private mix is a rebinding trick, not a CDN.
    for *_, sockaddr in infos:
        why = policy.refusal(sockaddr[0])
        if why is not None:
            raise BlockedAddress(f"{conn.host} resolves to {sockaddr[0]} ({why})")
    err: OSError | None = None
    for *_, sockaddr in infos:
        try:
            sock = u3_connection.create_connection(
                (sockaddr[0], conn.port),
                conn.timeout,
                source_address=conn.source_address,
                socket_options=conn.socket_options,
            )
        except OSError as e:  # includes socket timeouts; try the next address like urllib3 does
            err = e
            continue
        sys.audit("http.client.connect", conn, conn.host, conn.port)
        return sock
    if isinstance(err, TimeoutError):
        raise ConnectTimeoutError(
            conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})"
        )
    raise NewConnectionError(conn, f"Failed to establish a new connection: {err}")


def checked_pools(policy: AddressPolicy, pool_size: int, headers: dict[str, str]) -> urllib3.PoolManager:
    """A urllib3 pool manager whose every new connection goes through the address policy. Retries and
    redirects are ours (with back-off and our own classification), so urllib3 does neither; TLS verifies
    against certifi's bundle and sends SNI for the host name."""

    class CheckedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return _open_checked_socket(self, policy)

    class CheckedHTTPSConnection(HTTPSConnection):  # TLS still verifies and sends SNI for the host name
        def _new_conn(self) -> socket.socket:
            return _open_checked_socket(self, policy)

    class CheckedHTTPPool(HTTPConnectionPool):
        ConnectionCls = CheckedHTTPConnection

    class CheckedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = CheckedHTTPSConnection

    pools = urllib3.PoolManager(num_pools=pool_size, maxsize=pool_size, retries=False, headers=headers,
                                cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())
    pools.pool_classes_by_scheme = {"http": CheckedHTTPPool, "https": CheckedHTTPSPool}
    return pools


def opted_out(x_robots_tag: str | None) -> bool:
    """True when an X-Robots-Tag value carries `noai` or `noimageai`, for any user agent.

    Handles several comma-separated directives, repeated headers (joined with ", ") and a
    `botname:` prefix; an opt-out aimed at another crawler is honoured too.
    """
    if not x_robots_tag:
        return False
    return any(word in _OPT_OUT for word in re.split(r"[\s,;:]+", x_robots_tag.lower()))


class Outcome(NamedTuple):
    status: str  # download_status
    image: bytes | None = None
    detail: str | None = None


class _Retry(NamedTuple):
    reason: str  # FAILED or HTTP_ERROR, if this was the last attempt
    detail: str
    wait_s: float = 0.0  # from Retry-After, when the server sent one


class _Redirect(NamedTuple):
    location: str


def _bad_url(url: str) -> str | None:
    """Why `url` is not a fetchable http(s) URL, or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as e:
        return f"unparseable URL: {e}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"scheme {parts.scheme or '(none)'!r} is not http(s)"
    if not parts.hostname:
        return "URL has no host"
    return None


def _describe(e: Exception) -> str:
    """The innermost useful message of an error (the reason inside a wrapper that carries one)."""
    inner = getattr(e.args[0], "reason", None) if e.args else None
    cause = inner if isinstance(inner, Exception) else e
    return f"{type(cause).__name__}: {cause}"[:300]


def _retry_after(value: str | None, cap: float) -> float:
    try:
        return min(max(float(value), 0.0), cap) if value else 0.0
    except ValueError:  # an HTTP date: not worth parsing for a capped wait
        return 0.0


@dataclasses.dataclass(frozen=True)
class Download(Stage):
    name: ClassVar[str] = "download"
    concurrency: int = 16  # parallel requests per batch (threads; the work is I/O bound)
    timeout_s: float = 10.0  # connect timeout, read timeout, and wall-clock budget of one attempt
    max_bytes: int = 20_000_000  # larger bodies are cut off -> download_too_large
    retries: int = 2  # extra attempts after connection errors, timeouts, 429 and 5xx
    backoff_s: float = 0.5  # first retry waits about this long, doubling each time (with jitter)
    max_redirects: int = 5
    user_agent: str = "vlcurate/0.1 (+https://example.invalid/vlcurate)"
    respect_opt_out: bool = True  # X-Robots-Tag noai / noimageai -> download_status "opted_out"
    block_private: bool = True  # refuse private, link-local, multicast, reserved addresses
    allow_loopback: bool = False  # 127/8 and ::1; only tests and local mirrors want this

    def adds(self) -> list[pa.Field]:
        return [
            pa.field(S.IMAGE, pa.binary()),
            pa.field(ERROR, pa.string()),
            pa.field(ERROR_DETAIL, pa.string()),
            pa.field(DOWNLOAD_STATUS, pa.string()),
        ]

    def setup(self, threads: int) -> urllib3.PoolManager:
        # no proxy, .netrc or cookie jar: the address check must see the origin, and one pool serves
        # millions of unrelated hosts
        return checked_pools(AddressPolicy(self.block_private, self.allow_loopback), max(1, self.concurrency),
                             {"User-Agent": self.user_agent, "Accept": "image/*,*/*;q=0.8"})

    # --- one URL ------------------------------------------------------------------------------
    def fetch(self, session: urllib3.PoolManager, url: str) -> Outcome:
        """Download one URL; never raises: every problem becomes an Outcome with a reason code."""
        try:
            return self._follow(session, url.strip())
        except Exception as e:  # noqa: BLE001 - a per-URL surprise must not fail the partition
            return Outcome(FAILED, detail=f"{type(e).__name__}: {e}"[:300])

    def _follow(self, session: urllib3.PoolManager, url: str) -> Outcome:
        redirects = 0
        while True:
            why = _bad_url(url)
            if why is not None:
                return Outcome(BAD_URL, detail=f"{why}: {url[:200]}")
            result = self._with_retries(session, url)
            if not isinstance(result, _Redirect):
                return result
            redirects += 1
            if redirects > self.max_redirects:
                return Outcome(
                    TOO_MANY_REDIRECTS,
                    detail=f"more than {self.max_redirects} redirects, stopped at {url[:200]}",
                )
            url = urljoin(url, result.location)

    def _with_retries(self, session: urllib3.PoolManager, url: str) -> Outcome | _Redirect:
        attempts = max(0, self.retries) + 1
        answered = None  # the last HTTP error the server answered with: it says more than a later reset
        for attempt in range(attempts):
            result = self._attempt(session, url)
            if not isinstance(result, _Retry):
                return result
            if result.reason == HTTP_ERROR:
                answered = result
            if attempt + 1 == attempts:
                suffix = f" after {attempts} attempts" if attempts > 1 else ""
                if answered is not None and result is not answered:
                    return Outcome(HTTP_ERROR, detail=f"{answered.detail}, then {result.detail}{suffix}")
                return Outcome(result.reason, detail=f"{result.detail}{suffix}")
            # Jitter keeps a batch of rows that failed together from retrying in lock-step.
            wait = self.backoff_s * (2**attempt) * random.uniform(0.5, 1.0)
            time.sleep(max(wait, result.wait_s))
        raise AssertionError("unreachable")

    def _attempt(self, session: urllib3.PoolManager, url: str) -> Outcome | _Redirect | _Retry:
        deadline = time.monotonic() + self.timeout_s
        try:
            # the body is streamed (preload_content=False): a redirect's body is never read at all
            resp = session.urlopen("GET", url, redirect=False, retries=False, preload_content=False,
                                   timeout=urllib3.Timeout(connect=self.timeout_s, read=self.timeout_s))
        except BlockedAddress as e:
            return Outcome(BLOCKED, detail=str(e)[:300])
        except (LocationParseError, LocationValueError, UnicodeError) as e:
            return Outcome(BAD_URL, detail=f"{type(e).__name__}: {e}"[:300])
        except SSLError as e:  # a bad certificate does not get better on retry
            return Outcome(FAILED, detail=_describe(e))
        except NewConnectionError as e:  # refused, unreachable, no such host (a ConnectTimeoutError to urllib3)
            return _Retry(FAILED, f"connection error: {_describe(e)}")
        except TimeoutErrorU3 as e:
            return _Retry(FAILED, f"timeout: {_describe(e)}")
        except (HTTPError, OSError) as e:  # reset, protocol errors
            return _Retry(FAILED, f"connection error: {_describe(e)}")
        try:
            return self._read(resp, deadline)
        finally:
            # a body read to its end has already given its connection back to the pool; one left unread
            # (a redirect, a body over max_bytes) must not: close it, then give the closed slot back
            resp.close()
            resp.release_conn()

    def _read(self, resp: urllib3.BaseHTTPResponse, deadline: float) -> Outcome | _Redirect | _Retry:
        status = resp.status
        # Checked on every hop: a redirect that says noai is the site's answer for this image too.
        if self.respect_opt_out and opted_out(resp.headers.get("X-Robots-Tag")):
            return Outcome(OPTED_OUT, detail=f"X-Robots-Tag: {resp.headers.get('X-Robots-Tag')}"[:300])
        if status in _REDIRECTS and resp.headers.get("Location"):
            return _Redirect(resp.headers["Location"])
        if status == 429 or 500 <= status < 600:
            return _Retry(
                HTTP_ERROR, f"HTTP {status}", _retry_after(resp.headers.get("Retry-After"), self.timeout_s)
            )
        if status != 200:
            return Outcome(HTTP_ERROR, detail=f"HTTP {status}")
        length = resp.headers.get("Content-Length", "")
        if length.strip().isdigit() and int(length) > self.max_bytes:
            return Outcome(TOO_LARGE, detail=f"Content-Length {int(length)} > max_bytes {self.max_bytes}")
        body = bytearray()
        try:
            for chunk in resp.stream(_CHUNK):
                body += chunk
                if len(body) > self.max_bytes:
                    return Outcome(TOO_LARGE, detail=f"body over max_bytes {self.max_bytes}")
                if time.monotonic() > deadline:  # a trickling server must not hold a thread forever
                    return _Retry(FAILED, f"timeout: body not complete within {self.timeout_s}s")
        except (HTTPError, OSError) as e:  # read timeout, reset, short or bad chunked body
            return _Retry(FAILED, f"connection error while reading body: {_describe(e)}")
        return Outcome(OK, image=bytes(body))

    # --- batches ------------------------------------------------------------------------------
    @staticmethod
    def _todo(batch: pa.RecordBatch) -> list[tuple[int, str]]:
        """(row, url) of the rows to fetch: no error, no bytes, a non-blank URL."""
        urls = batch.column(S.URL).to_pylist()
        images = batch.column(S.IMAGE).to_pylist()
        errors = batch.column(ERROR).to_pylist()
        return [(i, url) for i, (url, img, err) in enumerate(zip(urls, images, errors))
                if err is None and img is None and url is not None and url.strip()]

    def _columns(self, batch: pa.RecordBatch, outcomes: dict[int, Outcome]) -> dict[str, list]:
        images = batch.column(S.IMAGE).to_pylist()
        errors = batch.column(ERROR).to_pylist()
        details = batch.column(ERROR_DETAIL).to_pylist()
        out: dict[str, list] = {S.IMAGE: [], ERROR: [], ERROR_DETAIL: [], DOWNLOAD_STATUS: []}
        for i in range(batch.num_rows):
            o = outcomes.get(i)
            if o is None:  # skipped: pass everything through untouched
                row = (images[i], errors[i], details[i], SKIPPED)
            elif o.status in (OK, OPTED_OUT):
                row = (o.image, None, None, o.status)
            else:
                row = (None, o.status, o.detail, o.status)
            for name, value in zip(out, row):
                out[name].append(value)
        return out

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        """One batch on its own (run() keeps requests rolling across batches instead)."""
        if isinstance(state, _Fetched):  # run(): the outcomes are already there
            return self._columns(batch, state.outcomes)
        todo = self._todo(batch)
        outcomes: dict[int, Outcome] = {}
        if todo:
            workers = max(1, min(self.concurrency, len(todo)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download") as pool:
                # map keeps input order, so the outcomes line up with `todo`.
                outcomes = dict(zip((i for i, _ in todo), pool.map(lambda t: self.fetch(state, t[1]), todo)))
        return self._columns(batch, outcomes)

    def run(self, batches: Iterable[pa.RecordBatch], threads: int = 1,
            timing: list[float] | None = None) -> Iterator[pa.RecordBatch]:
        """Keep up to `concurrency` requests in flight ACROSS batches: while one slow URL holds back its
        batch, the next batches' URLs are already being fetched (a pool per batch would wait for each
        batch's slowest URL in turn). Batches still come out whole and in input order, each once all
        its rows are done; at most _MAX_PENDING_BATCHES wait behind an unfinished one. `timing[0]` gets
        this stage's seconds (waiting on requests included), not those spent producing the input."""
        clock: list[Any] = [0.0, time.perf_counter()]  # [seconds spent here, start of this stretch or None]

        def pause() -> None:
            if clock[1] is not None:
                clock[0] += time.perf_counter() - clock[1]
                clock[1] = None

        def resume() -> None:
            clock[1] = time.perf_counter()

        state = self.state(threads)
        limit = max(1, self.concurrency)
        pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="download")
        # each request's completion is counted by a callback under `changed`: the loop below sleeps until
        # the oldest batch is complete or a request slot frees up, and never polls futures (polling every
        # pending future at each completion cost ~1 ms of CPU per URL)
        changed = threading.Condition()
        in_flight = [0]  # requests submitted and not finished
        pending: deque[_Pending] = deque()
        source, exhausted = iter(batches), False

        def finished(entry: _Pending):
            def callback(_: Future) -> None:
                with changed:
                    entry.left -= 1
                    in_flight[0] -= 1
                    changed.notify()
            return callback

        def can_pull() -> bool:
            return not exhausted and in_flight[0] < limit and len(pending) < _MAX_PENDING_BATCHES

        try:
            while pending or not exhausted:
                # top up: pull input while a request slot is free
                while can_pull():
                    pause()
                    batch = next(source, None)
                    resume()
                    if batch is None:
                        exhausted = True
                    elif batch.num_rows:
                        todo = self._todo(batch)
                        entry = _Pending(batch, {}, len(todo))
                        with changed:
                            in_flight[0] += len(todo)
                        for i, url in todo:
                            entry.futures[i] = future = pool.submit(self.fetch, state, url)
                            future.add_done_callback(finished(entry))
                        pending.append(entry)
                # hand out finished batches, in input order
                while pending and pending[0].left == 0:
                    entry = pending.popleft()
                    out = self.apply(entry.batch, _Fetched({i: f.result() for i, f in entry.futures.items()}))
                    pause()
                    yield out
                    resume()
                with changed:
                    changed.wait_for(lambda: not pending or pending[0].left == 0 or can_pull())
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            pause()
            if timing is not None:
                timing[0] += clock[0]


class _Pending:
    """A batch whose requests are in flight: their futures by row, and how many are not finished."""

    __slots__ = ("batch", "futures", "left")

    def __init__(self, batch: pa.RecordBatch, futures: dict[int, Future], left: int):
        self.batch, self.futures, self.left = batch, futures, left


class _Fetched(NamedTuple):
    """Outcomes run() already fetched for a batch, handed to process() through apply()."""

    outcomes: dict[int, Outcome]
