"""Download stage against a real HTTP server on 127.0.0.1.

libcurl opens its sockets through the stage's open-socket callback, which reports every address it
was asked for to `filters.download.opensocket_log`. Every test runs with that log set to a guard:
a socket for anything but loopback is recorded and refused (the callback fails closed), so no packet
can leave the machine even if the address policy were broken, and the tests can assert that refused
addresses never got a socket at all.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pyarrow as pa
import pycurl
import pytest
from PIL import Image

from filters import download
from filters.download import DOWNLOAD_STATUS, AddressPolicy, Download, opted_out
from schemas import image_text as S
from schemas import ledger
from schemas.common import ERROR, ERROR_DETAIL

# the reason codes a download may write (the ledger module is being reorganised by reason group)
REASONS = getattr(ledger, "REASONS", None) or {r.code for r in ledger.DOWNLOAD}


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg((200, 30, 30))
BIG = 50_000  # bytes the oversized endpoints send; the stage under test allows 10_000


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection pooling is exercised too
    hits: ClassVar[Counter] = Counter()  # path -> requests seen, across the module's tests
    seen: ClassVar[list] = []  # (monotonic time, path) of every request, in arrival order
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:
        pass

    def _send(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, length: bool = True
    ) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:  # body delimited by closing the connection
            self.send_header("Connection", "close")
            self.close_connection = True
        if status >= 500 and length:  # the retry opens a fresh connection (a pooled one was seen reset under load)
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: expected here
            pass

    def do_GET(self) -> None:
        with self.lock:
            self.hits[self.path] += 1
            hits = self.hits[self.path]
            self.seen.append((time.monotonic(), self.path))
        path = self.path.split("?")[0]
        img = {"Content-Type": "image/jpeg"}
        if path == "/img.jpg":
            self._send(200, JPEG, img)
        elif path == "/echo-host":
            self._send(200, (self.headers.get("Host") or "").encode())
        elif path == "/missing":
            self._send(404, b"not found")
        elif path == "/flaky":  # 500 the first time, then the image
            self._send(500, b"oops") if hits == 1 else self._send(200, JPEG, img)
        elif path.startswith("/503-once/"):  # 503 the first time, then the image
            self._send(503, b"down") if hits == 1 else self._send(200, JPEG, img)
        elif path == "/always500":
            self._send(503, b"down")
        elif path == "/503-then-reset":  # an HTTP error, then the connection dropped without an answer
            if hits == 1:
                self._send(503, b"down")
            else:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        elif path == "/redirect":
            self._send(302, headers={"Location": "/img.jpg"})
        elif path == "/loop":
            self._send(302, headers={"Location": "/loop"})
        elif path == "/redirect-metadata":
            self._send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif path == "/redirect-ftp":
            self._send(301, headers={"Location": "ftp://127.0.0.1/x.jpg"})
        elif path == "/big-cl":
            self._send(200, b"\xff" * BIG, img)
        elif path == "/big-nocl":
            self._send(200, b"\xff" * BIG, img, length=False)
        elif path == "/big-chunked":  # no Content-Length: chunked transfer coding, 10 x 5 kB
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for _ in range(10):
                    self.wfile.write(b"1388\r\n" + b"\xff" * 5000 + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
        elif path == "/noai":
            self._send(200, JPEG, {**img, "X-Robots-Tag": "noai"})
        elif path == "/googlebot-noimageai":
            self._send(200, JPEG, {**img, "X-Robots-Tag": "googlebot: noindex, noimageai"})
        elif path == "/noindex":  # other directives are not an AI opt-out
            self._send(200, JPEG, {**img, "X-Robots-Tag": "noindex, nofollow"})
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, JPEG, img)
        elif path.startswith("/sleep/"):  # /sleep/<seconds>/<anything>
            time.sleep(float(path.split("/")[2]))
            self._send(200, JPEG, img)
        else:
            self._send(404)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


LOOPBACK = ("127.0.0.1", "::1")


class SocketAudit(list):
    """Every (ip, port, refusal) libcurl asked a socket for. A socket for a non-loopback address is
    refused here too (appending raises, and the callback then hands out no socket) and kept in
    `escaped`, so a broken policy cannot reach the network and fails the test."""

    def __init__(self) -> None:
        super().__init__()
        self.escaped: list = []

    def append(self, entry: tuple) -> None:
        super().append(entry)
        if entry[2] is None and entry[0] not in LOOPBACK:
            self.escaped.append(entry)
            raise ConnectionRefusedError(f"test guard: no socket for {entry}")

    def given(self, ip: str | None = None) -> list:
        """Addresses that got a socket (all of them, or those equal to `ip`)."""
        return [e for e in self if e[2] is None and (ip is None or e[0] == ip)]

    def refused(self, ip: str) -> list:
        return [e for e in self if e[2] is not None and e[0] == ip]


@pytest.fixture(autouse=True)
def sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[SocketAudit]:
    """The open-socket audit of the test; no non-loopback address ever gets a socket."""
    audit = SocketAudit()
    monkeypatch.setattr(download, "opensocket_log", audit)
    yield audit
    assert audit.escaped == []


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more: connection refused
    return port


def batch(rows: list[dict]) -> pa.RecordBatch:
    cols: dict[str, list] = {f.name: [] for f in S.RAW}
    for i, row in enumerate(rows):
        full = {
            "sample_id": f"id{i:03d}",
            "kind": "image_text",
            "source": "test",
            "source_key": str(i),
            **row,
        }
        for name, values in cols.items():
            values.append(full.get(name))
    return pa.RecordBatch.from_pydict(cols, schema=S.RAW)


STAGE = Download(
    timeout_s=0.5,
    max_bytes=10_000,
    retries=1,
    backoff_s=0.01,
    max_redirects=3,
    concurrency=8,
    allow_loopback=True,
)


def test_every_row_gets_its_outcome_in_order(server: str, sockets: SocketAudit) -> None:
    port = closed_port()
    rows = [
        ("ok", {"url": f"{server}/img.jpg"}),
        ("missing", {"url": f"{server}/missing"}),
        ("flaky", {"url": f"{server}/flaky"}),
        ("always500", {"url": f"{server}/always500"}),
        ("redirect", {"url": f"{server}/redirect"}),
        ("loop", {"url": f"{server}/loop"}),
        ("big-cl", {"url": f"{server}/big-cl"}),
        ("big-nocl", {"url": f"{server}/big-nocl"}),
        ("noai", {"url": f"{server}/noai"}),
        ("googlebot", {"url": f"{server}/googlebot-noimageai"}),
        ("noindex", {"url": f"{server}/noindex"}),
        ("slow", {"url": f"{server}/slow"}),
        ("closed", {"url": f"http://127.0.0.1:{port}/x.jpg"}),
        ("ftp", {"url": "ftp://127.0.0.1/x.jpg"}),
        ("no-scheme", {"url": "example.com/x.jpg"}),
        ("redirect-ftp", {"url": f"{server}/redirect-ftp"}),
        ("has-bytes", {"url": f"{server}/should-not-be-fetched", "image": b"already-here"}),
        (
            "has-error",
            {
                "url": f"{server}/should-not-be-fetched-either",
                "error": "read_error",
                "error_detail": "from the reader",
            },
        ),
        ("no-url", {}),
        ("ok-2", {"url": f"  {server}/img.jpg?second  "}),
    ]
    t0 = time.perf_counter()
    out = STAGE.apply(batch([r for _, r in rows])).to_pylist()
    elapsed = time.perf_counter() - t0
    got = {name: row for (name, _), row in zip(rows, out)}
    assert [r["sample_id"] for r in out] == [f"id{i:03d}" for i in range(len(rows))]  # order kept
    status = {name: row[DOWNLOAD_STATUS] for name, row in got.items()}
    assert status == {
        "ok": "ok",
        "missing": "download_http_error",
        "flaky": "ok",
        "always500": "download_http_error",
        "redirect": "ok",
        "loop": "download_too_many_redirects",
        "big-cl": "download_too_large",
        "big-nocl": "download_too_large",
        "noai": "opted_out",
        "googlebot": "opted_out",
        "noindex": "ok",
        "slow": "download_failed",
        "closed": "download_failed",
        "ftp": "download_bad_url",
        "no-scheme": "download_bad_url",
        "redirect-ftp": "download_bad_url",
        "has-bytes": "skipped",
        "has-error": "skipped",
        "no-url": "skipped",
        "ok-2": "ok",
    }
    for name in ("ok", "flaky", "redirect", "noindex", "ok-2"):
        assert got[name][S.IMAGE] == JPEG and got[name][ERROR] is None and got[name][ERROR_DETAIL] is None
    # failures are quarantined with the ledger's own codes
    for name, row in got.items():
        if row[DOWNLOAD_STATUS].startswith("download_"):
            assert row[ERROR] == row[DOWNLOAD_STATUS] and row[ERROR] in REASONS, name
            assert row[S.IMAGE] is None and row[ERROR_DETAIL], name
    assert "404" in got["missing"][ERROR_DETAIL]
    assert "503" in got["always500"][ERROR_DETAIL]
    assert "timeout" in got["slow"][ERROR_DETAIL]
    assert "Content-Length" in got["big-cl"][ERROR_DETAIL]  # refused from the header, before the body
    assert "body over" in got["big-nocl"][ERROR_DETAIL]  # cut off while streaming
    # opt-outs are a decision, not a quarantine: no error, no bytes
    for name in ("noai", "googlebot"):
        assert got[name][ERROR] is None and got[name][S.IMAGE] is None
    # skipped rows pass through untouched
    assert got["has-bytes"][S.IMAGE] == b"already-here" and got["has-bytes"][ERROR] is None
    assert (got["has-error"][ERROR], got["has-error"][ERROR_DETAIL]) == ("read_error", "from the reader")
    assert got["no-url"][S.IMAGE] is None and got["no-url"][ERROR] is None
    # retries: 500 then 200 took two requests; a persistent 503 used exactly 1 + retries
    assert Handler.hits["/flaky"] == 2 and Handler.hits["/always500"] == 2
    assert Handler.hits["/missing"] == 1  # a 404 is not retried
    assert Handler.hits["/loop"] == STAGE.max_redirects + 1
    assert not any("should-not" in path for path in Handler.hits)
    assert sockets and all(ip == "127.0.0.1" for ip, _, _ in sockets.given())
    # the slow endpoint costs (1 + retries) timeouts, run in parallel with everything else
    assert elapsed < 4.0, elapsed


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://192.168.1.1/x.jpg",
        "http://172.16.0.1/x.jpg",
        "http://[fe80::1]/x.jpg",
        "http://224.0.0.1/x.jpg",
        "http://0.0.0.0/x.jpg",
        "http://[::ffff:10.0.0.1]/x.jpg",
    ],
)
def test_private_addresses_refused_without_any_connection(url: str, sockets: SocketAudit) -> None:
    ip = url.split("//")[1].split("/")[0].strip("[]")
    out = STAGE.apply(batch([{"url": url}])).to_pylist()[0]
    assert out[DOWNLOAD_STATUS] == out[ERROR] == "download_blocked_address"
    assert ip in out[ERROR_DETAIL]
    # refused in the open-socket callback: libcurl asked for exactly that address, and got no socket
    assert sockets.refused(ip) and sockets.given() == []


def test_an_http_error_is_the_reason_when_a_later_retry_is_reset(server: str) -> None:
    out = STAGE.apply(batch([{"sample_id": "x", "url": f"{server}/503-then-reset"}])).to_pylist()[0]
    assert out[ERROR] == "download_http_error" and "503" in out[ERROR_DETAIL] and "then" in out[ERROR_DETAIL]


def test_redirect_target_is_checked_too(server: str, sockets: SocketAudit) -> None:
    out = STAGE.apply(batch([{"url": f"{server}/redirect-metadata"}])).to_pylist()[0]
    assert out[DOWNLOAD_STATUS] == "download_blocked_address"
    assert "169.254.169.254 (link-local)" in out[ERROR_DETAIL]
    assert sockets.refused("169.254.169.254") and sockets.given("169.254.169.254") == []


def test_host_names_are_resolved_and_every_address_checked(server: str, sockets: SocketAudit) -> None:
    port = server.rsplit(":", 1)[1]
    pins = (f"internal.test:{port}:10.1.2.3", f"mixed.test:{port}:192.168.0.7,127.0.0.1",
            f"local.test:{port}:127.0.0.1")
    rows = [
        {"url": f"http://internal.test:{port}/img.jpg"},
        {"url": f"http://mixed.test:{port}/img.jpg"},
        {"url": f"http://local.test:{port}/echo-host"},
    ]
    stage = Download(timeout_s=2.0, retries=0, concurrency=1, allow_loopback=True, resolve=pins)
    out = stage.apply(batch(rows)).to_pylist()
    assert [r[DOWNLOAD_STATUS] for r in out] == ["download_blocked_address", "ok", "ok"]
    assert out[0][ERROR_DETAIL] == "internal.test resolves to 10.1.2.3 (private)"
    # a host with a private and a loopback address: the private one is refused (never gets a socket),
    # then libcurl tries the next address, which the policy allows
    assert out[1][S.IMAGE] == JPEG
    assert sockets.refused("192.168.0.7") and sockets.given("192.168.0.7") == []
    assert sockets.refused("10.1.2.3") and sockets.given("10.1.2.3") == []
    assert out[2][S.IMAGE] == f"local.test:{port}".encode()  # the pinned address, Host header kept

    # without loopback, every address of mixed.test is refused: blocked, each address named
    strict = Download(timeout_s=2.0, retries=0, resolve=pins)
    out = strict.apply(batch(rows[1:2])).to_pylist()[0]
    assert out[DOWNLOAD_STATUS] == "download_blocked_address"
    assert "192.168.0.7 (private)" in out[ERROR_DETAIL] and "127.0.0.1 (loopback)" in out[ERROR_DETAIL]


def test_loopback_refused_by_default_reaches_no_listener(sockets: SocketAudit) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/img.jpg"
        out = Download(retries=0, timeout_s=1.0).apply(batch([{"url": url}])).to_pylist()[0]
        assert out[DOWNLOAD_STATUS] == "download_blocked_address" and "loopback" in out[ERROR_DETAIL]
        assert out[ERROR_DETAIL] == "127.0.0.1 (loopback)"
        with pytest.raises(BlockingIOError):  # not even a TCP handshake reached the listener
            listener.accept()
        assert sockets.refused("127.0.0.1") and sockets.given() == []
    finally:
        listener.close()


def test_proxy_settings_in_the_environment_are_ignored(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there: a used proxy would fail
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # a configuration of its own: a fresh worker state, no connection left open by another test
    stage = Download(timeout_s=2.0, retries=0, allow_loopback=True, user_agent="proxy-test")
    out = stage.apply(batch([{"url": f"{server}/img.jpg?proxy-test"}])).to_pylist()[0]
    assert out[DOWNLOAD_STATUS] == "ok" and out[S.IMAGE] == JPEG
    assert Handler.hits["/img.jpg?proxy-test"] == 1


def test_bodies_without_content_length_are_cut_at_max_bytes(server: str) -> None:
    stage = Download(timeout_s=2.0, retries=0, max_bytes=10_000, allow_loopback=True)
    urls = [f"{server}/big-nocl", f"{server}/big-chunked", f"{server}/img.jpg"]

    def run(state):
        return [(r[DOWNLOAD_STATUS], r[ERROR_DETAIL]) for r in stage.apply(batch([{"url": u} for u in urls]),
                                                                         state).to_pylist()]

    expect = [("download_too_large", "body over max_bytes 10000")] * 2 + [("ok", None)]
    assert run(stage.setup(1)) == expect  # libcurl's own max-file-size check cuts them
    # the write callback's own cut, without libcurl's check: the same outcome
    client = stage.setup(1)
    client.options = [(k, v) for k, v in client.options if k != pycurl.MAXFILESIZE_LARGE]
    assert run(client) == expect


def test_a_retry_waits_without_holding_up_other_urls(server: str) -> None:
    # one request in flight at a time: a retry that slept in place would hold the only slot
    stage = Download(timeout_s=2.0, retries=1, backoff_s=0.4, concurrency=1, allow_loopback=True)
    tag = time.monotonic_ns()
    rows = [{"url": f"{server}/503-once/{tag}"}] + [{"url": f"{server}/img.jpg?{tag}-{i}"} for i in range(5)]
    t0 = time.monotonic()
    out = stage.apply(batch(rows)).to_pylist()
    assert [r[DOWNLOAD_STATUS] for r in out] == ["ok"] * 6 and out[0][S.IMAGE] == JPEG
    assert Handler.hits[f"/503-once/{tag}"] == 2
    seen = [(t, path) for t, path in Handler.seen if t >= t0 and str(tag) in path]
    retried_at = [t for t, path in seen if path.startswith("/503-once/")][1]
    others = [t for t, path in seen if path.startswith("/img.jpg")]
    assert len(others) == 5 and max(others) < retried_at  # all the others went while the retry waited
    assert retried_at - t0 >= 0.2  # and the retry did wait its back-off (0.4 s x jitter 0.5..1)


def test_connections_are_kept_alive(server: str, sockets: SocketAudit) -> None:
    stage = Download(timeout_s=2.0, retries=0, concurrency=1, allow_loopback=True)
    tag = time.monotonic_ns()
    out = stage.apply(batch([{"url": f"{server}/img.jpg?{tag}-{i}"} for i in range(5)])).to_pylist()
    assert [r[DOWNLOAD_STATUS] for r in out] == ["ok"] * 5
    assert len(sockets.given()) == 1  # five requests over one connection


def test_non_ascii_urls_are_encoded(server: str) -> None:
    stage = Download(timeout_s=2.0, retries=0, allow_loopback=True)
    out = stage.apply(batch([{"url": f"{server}/img.jpg?q=été&x=a b"}])).to_pylist()[0]
    assert out[DOWNLOAD_STATUS] == "ok" and out[S.IMAGE] == JPEG
    assert Handler.hits["/img.jpg?q=%C3%A9t%C3%A9&x=a%20b"] == 1


def test_address_policy() -> None:
    strict = AddressPolicy()
    for ip in (
        "10.0.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "224.0.0.251",
        "240.0.0.1",
        "0.0.0.0",
        "127.0.0.1",
        "100.64.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:192.168.0.1",
        "64:ff9b::a00:1",
    ):
        assert strict.refusal(ip) is not None, ip
    for ip in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        assert strict.refusal(ip) is None, ip
    assert AddressPolicy(allow_loopback=True).refusal("127.0.0.2") is None
    assert AddressPolicy(allow_loopback=True).refusal("10.0.0.1") is not None
    assert AddressPolicy(block_private=False).refusal("10.0.0.1") is None
    assert AddressPolicy(block_private=False).refusal("127.0.0.1") == "loopback"


def test_opted_out_parsing() -> None:
    for value in (
        "noai",
        "NoAI",
        "noimageai",
        "noindex, noai",
        "otherbot: noai",
        "googlebot: noindex, noimageai",
        "noindex,NOIMAGEAI",
        "all, otherbot: noimageai",
    ):
        assert opted_out(value), value
    for value in (
        None,
        "",
        "noindex",
        "noindex, nofollow",
        "unavailable_after: 25 Jun 2030 15:00:00 PST",
        "ai",
    ):
        assert not opted_out(value), value


def test_opt_out_ignored_when_not_respected(server: str) -> None:
    stage = Download(retries=0, allow_loopback=True, respect_opt_out=False)
    out = stage.apply(batch([{"url": f"{server}/noai"}])).to_pylist()[0]
    assert out[DOWNLOAD_STATUS] == "ok" and out[S.IMAGE] == JPEG


def test_nothing_to_fetch() -> None:
    rows = [{"image": b"x"}, {"error": "read_error"}, {"url": None}]
    out = STAGE.apply(batch(rows)).to_pylist()
    assert [r[DOWNLOAD_STATUS] for r in out] == ["skipped"] * 3


def test_requests_roll_across_batches_so_one_slow_url_does_not_stall_the_rest(server: str) -> None:
    stage = Download(timeout_s=5.0, retries=0, concurrency=8, allow_loopback=True)
    # 4 batches, each with one URL that takes 1 s: a pool per batch takes about 4 s, a rolling pool 1 s
    batches = [batch([{"url": f"{server}/sleep/1.0/{b}"}] + [{"url": f"{server}/img.jpg?{b}-{i}"} for i in range(3)]
                     + [{"image": b"has bytes"}])
               for b in range(4)]
    for i, b in enumerate(batches):  # distinct sample ids per batch, to check the order
        batches[i] = b.set_column(0, "sample_id", pa.array([f"b{i}-{j}" for j in range(b.num_rows)]))
    pulled = []

    def source():
        for b in batches:
            pulled.append(time.perf_counter())
            yield b

    timing = [0.0]
    t0 = time.perf_counter()
    out = list(stage.run(source(), 1, timing))
    elapsed = time.perf_counter() - t0
    assert [b.column("sample_id").to_pylist() for b in out] == [b.column("sample_id").to_pylist() for b in batches]
    rows = [r for b in out for r in b.to_pylist()]
    assert [r[DOWNLOAD_STATUS] for r in rows] == ["ok", "ok", "ok", "ok", "skipped"] * 4
    assert all(r[S.IMAGE] == JPEG for r in rows if r[DOWNLOAD_STATUS] == "ok")
    assert elapsed < 2.5, elapsed  # max(slow, rest), not the sum of the batches' slowest URLs
    assert pulled[-1] - pulled[0] < 0.5  # the next batches were started before the first one finished
    assert 0.9 < timing[0] <= elapsed + 0.01


def test_rolling_pool_keeps_order_with_many_small_batches(server: str) -> None:
    stage = Download(timeout_s=5.0, retries=0, concurrency=3, allow_loopback=True)
    delays = [0.3, 0.0, 0.2, 0.0, 0.0, 0.1, 0.0]
    batches = [batch([{"url": f"{server}/sleep/{d}/{i}"}]).set_column(0, "sample_id", pa.array([f"s{i}"]))
               for i, d in enumerate(delays)]
    batches.insert(3, batch([]))  # an empty batch is dropped, as Stage.run does
    out = list(stage.run(iter(batches)))
    assert [b.column("sample_id")[0].as_py() for b in out] == [f"s{i}" for i in range(len(delays))]
    assert all(b.column(DOWNLOAD_STATUS)[0].as_py() == "ok" for b in out)


def test_transfers_go_on_while_the_next_stage_works_on_a_batch(server: str) -> None:
    """run() drives libcurl from a thread of its own: while the caller works on one batch (a decoder),
    the next batch's download proceeds. One request at a time, each answered after 0.4 s, and 0.4 s of
    work per batch: about 0.4 + 3 x 0.4 s overlapped, 2.4 s if the downloads waited for the caller."""
    stage = Download(timeout_s=5.0, retries=0, concurrency=1, allow_loopback=True)
    batches = [batch([{"url": f"{server}/sleep/0.4/overlap-{i}"}]).set_column(0, "sample_id", pa.array([f"o{i}"]))
               for i in range(3)]
    timing = [0.0]
    t0 = time.perf_counter()
    got = []
    for b in stage.run(iter(batches), 1, timing):
        got.append(b.column("sample_id")[0].as_py())
        assert b.column(DOWNLOAD_STATUS)[0].as_py() == "ok"
        time.sleep(0.4)  # the next stage's work on this batch
    elapsed = time.perf_counter() - t0
    assert got == ["o0", "o1", "o2"]
    assert elapsed < 2.1, elapsed
    assert 0.35 < timing[0] < 1.0, timing  # the caller waited for the first download, hardly for the others


def test_rows_with_nothing_to_fetch_stream_through() -> None:
    """Batches whose rows need no request (bytes already read from a local tar) are handed out as they
    come: the loop reads at most _AHEAD batches ahead of the caller, and the first batch reaches it
    before the rest of the input is read (it read all 32 pending batches first: 0.85 s of a 2,000-pair
    run's tar reading before any decode)."""
    stage = Download(timeout_s=5.0, retries=0, concurrency=16, allow_loopback=True)
    pulled = []

    def source():
        for i in range(20):
            pulled.append(i)
            yield batch([{"url": None, "image": _jpeg((i, 0, 0))}]).set_column(0, "sample_id", pa.array([f"l{i}"]))

    seen = []
    for b in stage.run(source()):
        seen.append((b.column("sample_id")[0].as_py(), len(pulled)))
        assert b.column(DOWNLOAD_STATUS)[0].as_py() == "skipped"
        time.sleep(0.01)  # the next stage's work: the loop gets to run ahead, if it would
    assert [s for s, _ in seen] == [f"l{i}" for i in range(20)]
    assert all(n <= i + 1 + download._AHEAD + 1 for i, (_, n) in enumerate(seen)), seen


def test_a_caller_that_stops_early_stops_the_loop(server: str) -> None:
    stage = Download(timeout_s=5.0, retries=0, concurrency=2, allow_loopback=True)
    batches = [batch([{"url": f"{server}/sleep/0.2/stop-{i}"}]) for i in range(20)]
    gen = stage.run(iter(batches))
    first = next(gen)
    assert first.column(DOWNLOAD_STATUS)[0].as_py() == "ok"
    t0 = time.perf_counter()
    gen.close()  # the loop thread ends, its transfers are dropped
    assert time.perf_counter() - t0 < 1.5
    assert not [t for t in threading.enumerate() if t.name == "download-loop"]


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The same handler over HTTPS on 127.0.0.1, with a self-signed certificate made by openssl:
    (base URL, the certificate's path)."""
    import ssl
    import subprocess

    d = tmp_path_factory.mktemp("tls")
    key, cert = str(d / "key.pem"), str(d / "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", cert
    httpd.shutdown()
    httpd.server_close()


def test_tls_is_verified_and_an_untrusted_certificate_is_not_retried(tls_server, monkeypatch) -> None:
    """HTTPS: a certificate that certifi's bundle does not vouch for fails at the handshake, before any
    request reaches the server, and is not retried; the same server with its certificate trusted serves
    the image over TLS."""
    base, cert = tls_server
    stage = Download(timeout_s=2.0, retries=2, backoff_s=0.01, allow_loopback=True)
    before = Handler.hits["/img.jpg?tls"]
    out = stage.apply(batch([{"url": f"{base}/img.jpg?tls"}])).to_pylist()[0]
    assert out[DOWNLOAD_STATUS] == "download_failed" and out[ERROR_DETAIL].startswith("TLS:"), out[ERROR_DETAIL]
    assert "after" not in out[ERROR_DETAIL]  # a bad certificate is final, not retried
    assert Handler.hits["/img.jpg?tls"] == before  # no request was sent over the untrusted connection
    monkeypatch.setattr(download.certifi, "where", lambda: cert)  # trust it: read when a worker's state is made
    trusting = Download(timeout_s=2.5, retries=0, allow_loopback=True)  # another stage: a state of its own
    out = trusting.apply(batch([{"url": f"{base}/img.jpg?tls"}])).to_pylist()[0]
    assert out[DOWNLOAD_STATUS] == "ok" and out[S.IMAGE] == JPEG, out[ERROR_DETAIL]
    assert Handler.hits["/img.jpg?tls"] == before + 1
