"""Download images for rows that carry a URL instead of bytes (img2dataset-style, with an SSRF guard).

Reads `url`, `image`, `error`, `error_detail`. Fetches only rows with `error` null, `image` null and
an http(s) `url`; writes `image` (the body bytes, unchanged), `error` / `error_detail` (a stable
`download_*` reason code from schemas.ledger on failure, which quarantines the row downstream) and
`download_status`: "ok", "skipped" (the row already had bytes, an error, or no URL: all its columns
are passed through untouched), "opted_out", or the failure's reason code.

An X-Robots-Tag `noai` / `noimageai` answer gives `download_status="opted_out"` with `image` and
`error` null: the rules drop the row with reason `opted_out` (a decision, not a quarantine). It is
checked on every hop (a redirect that says noai is the site's answer for this image too).

HTTP: 200 is the image; 301/302/303/307/308 with a Location are followed by hand, one checked hop at a
time, at most `max_redirects`; 429 and 5xx are retried with jittered exponential back-off (a
Retry-After in seconds is honoured, capped at `timeout_s`), as are connection errors and timeouts;
any other status is `download_http_error` ("HTTP 404"). When the server answered with an HTTP error
and a later attempt got no answer, the HTTP error is the reason ("HTTP 503, then ..."). Bodies over
`max_bytes` are refused from their Content-Length before the body, or cut while streaming
(`download_too_large`). Non-http(s) URLs, also as a redirect target, are `download_bad_url`.

Engine: libcurl's multi interface (pycurl), driven from ONE thread (run(): a thread of its own, so the
transfers go on while the next stages decode; process(): the caller's), which pycurl lets
go of the GIL while libcurl works and waits: up to `concurrency` transfers in flight, a
pool of `concurrency` reused easy handles, connections kept alive between requests to one host
(HTTP/1.1; https may negotiate HTTP/2 through ALPN, libcurl's default).
A retry is not slept on: it is scheduled for its due time and the loop waits in select() no longer
than the nearest due time, so the other transfers keep going. `timeout_s` is each attempt's
connect timeout and its wall-clock budget.

Safety: libcurl may speak only http and https (redirects are ours anyway: FOLLOWLOCATION is off); no
proxy (`http_proxy` & co. in the environment are ignored), no cookies, no .netrc; TLS verified against
certifi's bundle, with SNI. The address policy is enforced in libcurl's open-socket callback on the
very address libcurl is about to connect to: a refused address gets no socket at all (never created,
never connected), and since the checked address is the one used, DNS rebinding cannot slip past the
check. A host whose every address is refused is `download_blocked_address` ("internal.test resolves
to 10.1.2.3 (private)"). Changed against the urllib3 version, which refused a host whole when ANY of
its records was bad: now each address libcurl tries is judged on its own, refused ones are never
contacted, and an allowed one of the same host may still be used. `resolve` pins host names to
addresses like curl's --resolve ("HOST:PORT:ADDR[,ADDR...]"; local mirrors, tests); the policy still
applies to those addresses. `opensocket_log` (tests) records every address libcurl asked a socket for.

Weak spot: libcurl's select() path (curl_multi_fdset) cannot watch file descriptors >= 1024; in a
process with that many open files the loop falls back to waking every `_MAX_WAIT_S`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import ipaddress
import random
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, NamedTuple
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import certifi
import pyarrow as pa
import pycurl

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
_CHUNK = 64 * 1024  # most body bytes read (and thrown away) from an answer that is not the image
_MAX_PENDING_BATCHES = 32  # batches held while an earlier one waits for a slow URL (bounds memory)
_MAX_WAIT_S = 1.0  # longest single wait in select()

# libcurl error codes (CURLE_*), by what they mean for us
_E_OK, _E_WRITE, _E_TOO_BIG, _E_TIMEOUT, _E_CONNECT = 0, 23, 63, 28, 7
_E_BAD_URL = frozenset({1, 3})  # unsupported protocol, malformed URL
_E_TLS = frozenset({35, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91, 98})  # a bad cert stays bad
# resolve, connect, weird reply, HTTP/2 framing, partial body, empty reply, send/recv, HTTP/2 stream, HTTP/3
_E_TRANSIENT = frozenset({5, 6, 7, 8, 16, 18, 52, 55, 56, 92, 95, 96})

# TEST HOOK: when a list, every address libcurl asks a socket for is appended as (ip, port, refusal or
# None); a refused address got no socket.
opensocket_log: list[tuple[str, int, str | None]] | None = None


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


_UNSAFE = re.compile(r'[^\x21-\x7e]|["<>\\^`{|}]')


def _wire_url(url: str) -> str:
    """`url` as libcurl takes it: non-ASCII and unsafe characters of the path and query percent-encoded
    (UTF-8), a non-ASCII host name IDNA-encoded (as urllib3 did), the fragment dropped."""
    if _UNSAFE.search(url) is None:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    host = parts.hostname or ""
    if not host.isascii():
        netloc = netloc.replace(host, host.encode("idna").decode("ascii"))  # raises UnicodeError: bad URL
    safe = "!$%&'()*+,/:;=?@[]~"
    return urlunsplit((parts.scheme, netloc, quote(parts.path, safe=safe), quote(parts.query, safe=safe), ""))


def _retry_after(value: str | None, cap: float) -> float:
    try:
        return min(max(float(value), 0.0), cap) if value else 0.0
    except ValueError:  # an HTTP date: not worth parsing for a capped wait
        return 0.0


_WANTED = {b"x-robots-tag": "x-robots-tag", b"location": "location", b"retry-after": "retry-after",
           b"content-length": "content-length"}


def _head(lines: list[bytes]) -> tuple[int, dict[str, str]]:
    """The status and the headers we act on, of the last response in `lines` (the raw header lines
    libcurl handed over; pycurl forbids getinfo() while a transfer runs)."""
    status, out = 0, {}
    for raw in lines:
        if raw[:5] == b"HTTP/":  # a status line (an informational answer may have come first): start over
            parts = raw.split(None, 2)
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            out = {}
            continue
        name, sep, value = raw.partition(b":")
        key = _WANTED.get(name.strip().lower()) if sep else None
        if key is not None:
            v = value.strip().decode("latin-1")
            out[key] = f"{out[key]}, {v}" if key in out else v  # repeated headers joined, as HTTP says
    return status, out


class Body:
    """Where one URL's body goes: in memory by default. A subclass (the video stage's) may stream it to a
    file instead. `restart()` starts over (a retry or the next hop), `finish()` makes the OK outcome, and
    `discard()` drops whatever was written (a failure, or the run was abandoned)."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def restart(self) -> None:
        self.chunks.clear()

    def finish(self) -> Outcome:
        return Outcome(OK, image=b"".join(self.chunks))

    def discard(self) -> None:
        self.chunks = []


class _Job:
    """One URL on its way: the current hop's URL, attempt and redirect counts, and this attempt's state."""

    __slots__ = ("answered", "attempt", "body", "cut", "done", "dropped", "head", "opened", "redirects",
                 "refused", "size", "url", "write_error")

    def __init__(self, url: str, done: Callable[[Outcome], None], body: Body | None):
        self.url, self.done, self.body = url, done, body
        self.attempt = self.redirects = 0
        self.answered: _Retry | None = None  # the last HTTP error the server answered with on this hop
        self.fresh()

    def fresh(self) -> None:
        self.size = 0
        self.cut = self.dropped = False  # body over max_bytes / an answer that is not the image
        self.head: dict[str, str] | None = None
        self.refused: list[str] = []  # "ip (why)" of every address refused on this attempt
        self.opened = 0  # sockets handed to libcurl on this attempt
        self.write_error: str | None = None


class _Slot:
    """One reusable libcurl easy handle and its callbacks (set once; only the URL changes per use)."""

    def __init__(self, client: _Client):
        self.client = client
        self.job: _Job | None = None
        self.sock: socket.SocketType | None = None
        self.lines: list[bytes] = []
        self.handle = h = pycurl.Curl()
        h.slot = self  # type: ignore[attr-defined]
        for option, value in client.options:
            h.setopt(option, value)
        h.setopt(pycurl.HEADERFUNCTION, self.lines.append)
        h.setopt(pycurl.WRITEFUNCTION, self.write)
        h.setopt(pycurl.OPENSOCKETFUNCTION, self.opensocket)

    def opensocket(self, purpose: int, address: Any) -> Any:
        """libcurl wants a socket for `address`: only an address the policy allows gets one. Fails
        closed: any surprise here (not an IP address, no descriptors left) hands out no socket."""
        job = self.job
        try:
            ip, port = address.addr[0], address.addr[1]
            why = self.client.refusal(ip)
            if opensocket_log is not None:
                opensocket_log.append((ip, port, why))
            if why is None:
                # the C socket type (socket.socket's base): pycurl only dups its fileno(), cheaper to make
                sock = socket.SocketType(address.family, address.socktype, address.protocol)
                if job is not None:
                    job.opened += 1
                self.close_socket()
                self.sock = sock  # pycurl hands libcurl a dup: our copy is closed once libcurl has it
                return sock
            if job is not None:
                job.refused.append(f"{ip} ({why})")
        except Exception:  # noqa: BLE001 - a callback must not raise into libcurl: no socket
            return pycurl.SOCKET_BAD
        return pycurl.SOCKET_BAD

    def close_socket(self) -> None:
        """Close our copy of the last socket handed out (an unclosed one would cost a ResourceWarning)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def write(self, data: bytes) -> int | None:
        """A piece of the body: kept when the answer is the image and under max_bytes; returning 0 aborts."""
        job = self.job
        if job is None:
            return 0
        try:
            if job.head is None:  # the first piece: the headers are all there, decide about this body
                status, job.head = _head(self.lines)
                job.dropped = status != 200 or (self.client.respect_opt_out
                                                and opted_out(job.head.get("x-robots-tag")))
            job.size += len(data)
            if job.dropped:  # a redirect's or an error's body: read a little (keeps the connection), no more
                return 0 if job.size > _CHUNK else None
            if job.size > self.client.max_bytes:
                job.cut = True
                return 0
            job.body.write(data)
        except Exception as e:  # noqa: BLE001 - a full disk; a callback must not raise into libcurl
            job.write_error = f"{type(e).__name__}: {e}"
            return 0
        return None


class _Client:
    """A worker's download state (Stage.setup): the easy-handle options, the address policy, and a
    reusable engine (its connections stay alive between tasks)."""

    def __init__(self, stage: Download):
        self.stage = stage
        self.policy = AddressPolicy(stage.block_private, stage.allow_loopback)
        self.respect_opt_out = stage.respect_opt_out
        self.max_bytes = max(0, stage.max_bytes)
        ms = max(1, int(stage.timeout_s * 1000))
        web = pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS
        self.options: list[tuple[int, Any]] = [
            (pycurl.PROTOCOLS, web),
            (pycurl.REDIR_PROTOCOLS, web),
            (pycurl.FOLLOWLOCATION, 0),  # redirects are followed by hand, every hop checked
            (pycurl.PROXY, ""),  # "" = no proxy, whatever http_proxy / https_proxy / all_proxy say
            (pycurl.NOSIGNAL, 1),
            (pycurl.CAINFO, certifi.where()),
            (pycurl.SSL_VERIFYPEER, 1),
            (pycurl.SSL_VERIFYHOST, 2),
            (pycurl.CONNECTTIMEOUT_MS, ms),
            (pycurl.TIMEOUT_MS, ms),  # the whole attempt: a trickling server cannot hold a slot
            (pycurl.MAXFILESIZE_LARGE, self.max_bytes),  # refuses a too large Content-Length up front
            (pycurl.USERAGENT, stage.user_agent),
            (pycurl.HTTPHEADER, [f"Accept: {stage.accept}"]),
        ]
        if stage.resolve:
            self.options.append((pycurl.RESOLVE, list(stage.resolve)))
        self._lock = threading.Lock()
        self._idle: _Engine | None = None
        self._verdicts: dict[str, str | None] = {}

    def refusal(self, ip: str) -> str | None:
        """The policy's verdict on `ip`, remembered (a CDN's few addresses serve many URLs)."""
        try:
            return self._verdicts[ip]
        except KeyError:
            pass
        if len(self._verdicts) >= 100_000:
            self._verdicts.clear()
        why = self._verdicts[ip] = self.policy.refusal(ip)
        return why

    @contextlib.contextmanager
    def engine(self) -> Iterator[_Engine]:
        """The worker's engine when it is free (a nested or concurrent user gets a fresh one)."""
        with self._lock:
            engine, self._idle = self._idle, None
        if engine is None:
            engine = _Engine(self)
        try:
            yield engine
        finally:
            engine.abandon()
            with self._lock:
                if self._idle is None:
                    self._idle, engine = engine, None
            if engine is not None:
                engine.close()


class _Engine:
    """A CurlMulti, `concurrency` easy handles, jobs waiting for a handle and retries waiting for their
    time. Only ever used from one thread at a time."""

    def __init__(self, client: _Client):
        self.client, self.stage = client, client.stage
        self.multi = pycurl.CurlMulti()
        self.slots = [_Slot(client) for _ in range(max(1, self.stage.concurrency))]
        self.free = list(self.slots)
        self.ready: deque[_Job] = deque()  # to start as soon as a handle is free
        self.later: list[tuple[float, int, _Job]] = []  # (due, seq, job): retries waiting for their time
        self.seq = 0
        self.active = 0  # handles in the multi
        self.pending = 0  # jobs submitted and not finished

    # --- jobs ---------------------------------------------------------------------------------
    def submit(self, url: str, done: Callable[[Outcome], None]) -> None:
        """Fetch `url`; `done(outcome)` is called once, from submit() itself or from a later step()."""
        self.pending += 1
        job = _Job(url.strip(), done, None)
        try:
            known = self.stage._known(job.url)
            if known is not None:  # nothing to fetch (the subclass already has it)
                self._finish(job, known)
                return
            why = _bad_url(job.url)
            if why is not None:
                self._finish(job, Outcome(BAD_URL, detail=f"{why}: {job.url[:200]}"))
                return
            job.body = self.stage._body(job.url)
        except Exception as e:  # noqa: BLE001 - a per-URL surprise must not fail the partition
            self._finish(job, Outcome(FAILED, detail=f"{type(e).__name__}: {e}"[:300]))
            return
        self.ready.append(job)

    def _finish(self, job: _Job, outcome: Outcome) -> None:
        if outcome.status != OK and job.body is not None:
            with contextlib.suppress(Exception):
                job.body.discard()
        self.pending -= 1
        job.done(outcome)

    def _start(self, job: _Job, slot: _Slot) -> None:
        job.fresh()
        slot.lines.clear()
        try:
            job.body.restart()
            slot.handle.setopt(pycurl.URL, _wire_url(job.url))
        except (UnicodeError, ValueError) as e:
            self.free.append(slot)
            self._finish(job, Outcome(BAD_URL, detail=f"{type(e).__name__}: {e}"[:300]))
            return
        except Exception as e:  # noqa: BLE001
            self.free.append(slot)
            self._finish(job, Outcome(FAILED, detail=f"{type(e).__name__}: {e}"[:300]))
            return
        slot.job = job
        self.multi.add_handle(slot.handle)
        self.active += 1

    def _complete(self, slot: _Slot, errno: int, message: str) -> None:
        job = slot.job
        handle = slot.handle
        self.multi.remove_handle(handle)
        slot.close_socket()
        self.active -= 1
        try:
            result = self.stage._judge(job, handle.getinfo(pycurl.RESPONSE_CODE), slot.lines, errno, message)
        except Exception as e:  # noqa: BLE001
            result = Outcome(FAILED, detail=f"{type(e).__name__}: {e}"[:300])
        slot.job = None
        self.free.append(slot)
        if isinstance(result, _Redirect):
            job.redirects += 1
            if job.redirects > self.stage.max_redirects:
                self._finish(job, Outcome(TOO_MANY_REDIRECTS,
                                          detail=f"more than {self.stage.max_redirects} redirects, "
                                                 f"stopped at {job.url[:200]}"))
                return
            job.url = urljoin(job.url, result.location)
            why = _bad_url(job.url)
            if why is not None:
                self._finish(job, Outcome(BAD_URL, detail=f"{why}: {job.url[:200]}"))
                return
            job.attempt, job.answered = 0, None  # a new hop gets its own attempts
            self.ready.appendleft(job)
        elif isinstance(result, _Retry):
            if result.reason == HTTP_ERROR:
                job.answered = result
            attempts = max(0, self.stage.retries) + 1
            if job.attempt + 1 >= attempts:
                suffix = f" after {attempts} attempts" if attempts > 1 else ""
                answered = job.answered
                if answered is not None and result is not answered:
                    self._finish(job, Outcome(HTTP_ERROR, detail=f"{answered.detail}, then {result.detail}{suffix}"))
                else:
                    self._finish(job, Outcome(result.reason, detail=f"{result.detail}{suffix}"))
                return
            # Jitter keeps a batch of rows that failed together from retrying in lock-step.
            wait = self.stage.backoff_s * (2**job.attempt) * random.uniform(0.5, 1.0)
            job.attempt += 1
            self.seq += 1
            heapq.heappush(self.later, (time.monotonic() + max(wait, result.wait_s), self.seq, job))
        else:
            self._finish(job, result)

    # --- the loop -----------------------------------------------------------------------------
    def step(self, max_wait: float = _MAX_WAIT_S) -> None:
        """Start what can start, let libcurl work, hand out what finished; wait (in select, GIL released)
        at most until the next thing is due when nothing finished."""
        later, ready, free = self.later, self.ready, self.free
        now = time.monotonic()
        while later and later[0][0] <= now:  # retries due: ahead of jobs that never started
            ready.appendleft(heapq.heappop(later)[2])
        while ready and free:
            self._start(ready.popleft(), free.pop())
        if self.active:
            self.multi.perform()
            if self._collect():
                return
            wait = max_wait
            hint = self.multi.timeout()  # ms until libcurl's own next timer (-1: none)
            if hint >= 0:
                wait = min(wait, hint / 1000)
            if later:
                wait = min(wait, later[0][0] - now)
            if wait > 0:
                self.multi.select(wait)
            self.multi.perform()
            self._collect()
        elif later:
            time.sleep(max(0.0, min(later[0][0] - now, max_wait)))

    def _collect(self) -> bool:
        got = False
        while True:
            queued, ok, failed = self.multi.info_read()
            for handle in ok:
                self._complete(handle.slot, _E_OK, "")
            for handle, errno, message in failed:
                self._complete(handle.slot, errno, message)
            got = got or bool(ok or failed)
            if not queued:
                return got

    def abandon(self) -> None:
        """Drop every unfinished job (their bodies discarded): the engine is clean for its next user."""
        jobs = [job for *_, job in self.later] + list(self.ready)
        self.later.clear()
        self.ready.clear()
        for slot in self._busy():
            with contextlib.suppress(Exception):
                self.multi.remove_handle(slot.handle)
            slot.close_socket()
            jobs.append(slot.job)
            slot.job = None
            self.free.append(slot)
        self.active = self.pending = 0
        for job in jobs:
            if job is not None and job.body is not None:
                with contextlib.suppress(Exception):
                    job.body.discard()

    def _busy(self) -> list[_Slot]:
        return [slot for slot in self.slots if slot.job is not None]  # the handles in the multi

    def close(self) -> None:
        self.abandon()
        for slot in self.slots:
            slot.handle.close()
        self.multi.close()


@dataclasses.dataclass(frozen=True)
class Download(Stage):
    name: ClassVar[str] = "download"
    accept: ClassVar[str] = "image/*,*/*;q=0.8"  # the Accept header
    # requests in flight (libcurl transfers driven from one thread). 16 left the decoder waiting for
    # downloads a fifth of a 20,000-URL run on 2 busy cores (a server's answer took ~30 ms there, not
    # 4-8 ms as on an idle machine); 32 halved that wait. Real web servers answer slower still.
    concurrency: int = 32
    timeout_s: float = 10.0  # connect timeout, and wall-clock budget of one attempt
    max_bytes: int = 20_000_000  # larger bodies are cut off -> download_too_large
    retries: int = 2  # extra attempts after connection errors, timeouts, 429 and 5xx
    backoff_s: float = 0.5  # first retry waits about this long, doubling each time (with jitter)
    max_redirects: int = 5
    user_agent: str = "vlcurate/0.1 (+https://example.invalid/vlcurate)"
    respect_opt_out: bool = True  # X-Robots-Tag noai / noimageai -> download_status "opted_out"
    block_private: bool = True  # refuse private, link-local, multicast, reserved addresses
    allow_loopback: bool = False  # 127/8 and ::1; only tests and local mirrors want this
    resolve: tuple[str, ...] = ()  # curl --resolve pins, "HOST:PORT:ADDR[,ADDR...]" (policy still applies)

    def adds(self) -> list[pa.Field]:
        return [
            pa.field(S.IMAGE, pa.binary()),
            pa.field(ERROR, pa.string()),
            pa.field(ERROR_DETAIL, pa.string()),
            pa.field(DOWNLOAD_STATUS, pa.string()),
        ]

    def setup(self, threads: int) -> _Client:
        return _Client(self)

    # --- hooks for subclasses (the video stage) -------------------------------------------------
    def _known(self, url: str) -> Outcome | None:
        """The outcome of `url` without fetching it (e.g. already on disk), or None to fetch it."""
        return None

    def _body(self, url: str) -> Body:
        """Where `url`'s body goes; its finish() makes the OK outcome."""
        return Body()

    def _judge(self, job: _Job, status: int, lines: list[bytes], errno: int,
               message: str) -> Outcome | _Redirect | _Retry:
        """What one finished attempt means: `status` 0 when no answer came, `errno` libcurl's error."""
        if job.write_error is not None:  # our side failed (a full disk): not the server's fault
            return Outcome(FAILED, detail=f"cannot write the body: {job.write_error}"[:300])
        # an answer whose head we judge: complete, cut by us, or refused by libcurl for its Content-Length
        if status and (errno == _E_OK or errno == _E_TOO_BIG or (errno == _E_WRITE and (job.dropped or job.cut))):
            head = job.head if job.head is not None else _head(lines)[1]
            robots = head.get("x-robots-tag")
            if self.respect_opt_out and opted_out(robots):
                return Outcome(OPTED_OUT, detail=f"X-Robots-Tag: {robots}"[:300])
            if status in _REDIRECTS and head.get("location"):
                return _Redirect(head["location"])
            if status == 429 or 500 <= status < 600:
                return _Retry(HTTP_ERROR, f"HTTP {status}", _retry_after(head.get("retry-after"), self.timeout_s))
            if status != 200:
                return Outcome(HTTP_ERROR, detail=f"HTTP {status}")
            length = head.get("content-length", "").strip()
            if length.isdigit() and int(length) > self.max_bytes:
                return Outcome(TOO_LARGE, detail=f"Content-Length {int(length)} > max_bytes {self.max_bytes}")
            if errno != _E_OK or job.cut:
                return Outcome(TOO_LARGE, detail=f"body over max_bytes {self.max_bytes}")
            return job.body.finish()
        refused = ", ".join(job.refused)
        if job.refused and not job.opened and errno == _E_CONNECT:
            host = urlsplit(job.url).hostname or ""
            what = refused if refused.startswith(f"{host} ") else f"{host} resolves to {refused}"
            return Outcome(BLOCKED, detail=what[:300])
        message = (message or f"libcurl error {errno}") + (f" (refused {refused})" if refused else "")
        if errno == _E_TIMEOUT:
            return _Retry(FAILED, f"timeout: {message}"[:300])
        if errno in _E_TRANSIENT:
            where = " while reading body" if status else ""
            return _Retry(FAILED, f"connection error{where}: {message}"[:300])
        if errno in _E_BAD_URL:
            return Outcome(BAD_URL, detail=f"{message}: {job.url[:200]}"[:300])
        if errno in _E_TLS:
            return Outcome(FAILED, detail=f"TLS: {message}"[:300])
        return Outcome(FAILED, detail=f"libcurl error {errno}: {message}"[:300])

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
            with state.engine() as engine:
                for i, url in todo:
                    engine.submit(url, functools.partial(outcomes.__setitem__, i))
                while len(outcomes) < len(todo):
                    engine.step()
        return self._columns(batch, outcomes)

    def run(self, batches: Iterable[pa.RecordBatch], threads: int = 1,
            timing: list[float] | None = None) -> Iterator[pa.RecordBatch]:
        """Keep up to `concurrency` requests in flight ACROSS batches: while one slow URL holds back its
        batch, the next batches' URLs are already being fetched (a pool per batch would wait for each
        batch's slowest URL in turn). Batches still come out whole and in input order, each once all
        its rows are done; at most _MAX_PENDING_BATCHES wait behind an unfinished one.

        The loop (pulling the input, driving libcurl, completing batches) runs in a thread of its own, so
        transfers go on while the stages after this one decode the batches already handed out; it reads
        at most _AHEAD finished batches ahead of them. `timing[0]` gets the seconds the caller waited for
        a batch: the downloads the pipeline could not hide behind its other work."""
        loop = _Loop(self, batches, threads)
        thread = threading.Thread(target=loop.work, name="download-loop", daemon=True)
        thread.start()
        waited = 0.0
        try:
            while True:
                t0 = time.perf_counter()
                batch = loop.take()
                waited += time.perf_counter() - t0
                if batch is None:
                    return
                yield batch
        finally:
            loop.stop()
            thread.join()
            if timing is not None:
                timing[0] += waited


_AHEAD = 2  # finished batches the download loop may hold before the next stage takes them


class _Loop:
    """Download.run's loop, in a thread of its own; hands finished batches to the caller through `take`."""

    def __init__(self, stage: Download, batches: Iterable[pa.RecordBatch], threads: int):
        self.stage, self.source, self.threads = stage, iter(batches), threads
        self.cond = threading.Condition()
        self.out: deque[pa.RecordBatch] = deque()
        self.over = self.stopped = False
        self.error: BaseException | None = None

    def take(self) -> pa.RecordBatch | None:
        """The next batch in input order, None at the end; the loop's exception, if it failed."""
        with self.cond:
            self.cond.wait_for(lambda: self.out or self.over)
            if self.out:
                batch = self.out.popleft()
                self.cond.notify_all()  # room for one more
                return batch
            if self.error is not None:
                raise self.error
            return None

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def _room(self) -> bool:
        with self.cond:
            return len(self.out) < _AHEAD and not self.stopped

    def work(self) -> None:
        stage, limit = self.stage, max(1, self.stage.concurrency)
        pending: deque[_Pending] = deque()
        exhausted = False
        try:
            with stage.state(self.threads).engine() as engine:
                while (pending or not exhausted) and not self.stopped:
                    # top up: pull input while a request slot is free and the caller keeps up, and hand
                    # out a finished batch before reading on (rows with nothing to fetch, local files:
                    # read ahead at most _AHEAD batches, not _MAX_PENDING_BATCHES before the first)
                    while (not exhausted and engine.pending < limit and len(pending) < _MAX_PENDING_BATCHES
                           and self._room() and not (pending and pending[0].left == 0)):
                        batch = next(self.source, None)
                        if batch is None:
                            exhausted = True
                        elif batch.num_rows:
                            entry = _Pending(batch)
                            pending.append(entry)
                            for i, url in stage._todo(batch):
                                entry.left += 1
                                engine.submit(url, functools.partial(entry.done, i))
                    # hand out finished batches, in input order
                    while pending and pending[0].left == 0:
                        entry = pending.popleft()
                        out = stage.apply(entry.batch, _Fetched(entry.outcomes))
                        with self.cond:
                            self.out.append(out)
                            self.cond.notify_all()
                    if engine.pending:
                        engine.step()
                    elif pending or not exhausted:  # nothing in flight: wait until the caller takes a batch
                        with self.cond:
                            self.cond.wait_for(lambda: len(self.out) < _AHEAD or self.stopped, timeout=_MAX_WAIT_S)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, which raises it
            self.error = e
        finally:
            with self.cond:
                self.over = True
                self.cond.notify_all()


class _Pending:
    """A batch whose requests are in flight: the outcomes so far by row, and how many are not finished."""

    __slots__ = ("batch", "left", "outcomes")

    def __init__(self, batch: pa.RecordBatch):
        self.batch, self.outcomes, self.left = batch, {}, 0

    def done(self, row: int, outcome: Outcome) -> None:
        self.outcomes[row] = outcome
        self.left -= 1


class _Fetched(NamedTuple):
    """Outcomes run() already fetched for a batch, handed to process() through apply()."""

    outcomes: dict[int, Outcome]
