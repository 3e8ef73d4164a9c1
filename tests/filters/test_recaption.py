"""Recaption stage against a small OpenAI-compatible server on 127.0.0.1.

The server checks the request shape (model, a data URL that decodes to the very JPEG sent, the
original caption inside the prompt) and answers "Detailed: <original caption>". The first path
segment picks its behaviour: /ok, /flaky (500 once per image), /down (always 500), /slow (sleeps),
/empty (blank answer), /think (answer wrapped in a reasoning block).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest
from PIL import Image

from filters.recaption import DEFAULT_PROMPT, RECAPTION_ERROR, Recaption, clean_reply, train_on_recaption
from schemas import image_text as S

MODEL = "glm-4.1v-test"


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 20 % 256, 100, 200)).save(buf, format="JPEG")
    return buf.getvalue()


class FakeVLM(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.captions: dict[bytes, str] = {}  # image bytes -> original caption, registered by tests
        self.problems: list[str] = []  # request-shape violations seen
        self.calls: Counter = Counter()  # (mode, caption) -> requests
        self.auth: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def reset(self) -> None:
        with self.lock:
            self.captions.clear()
            self.problems.clear()
            self.calls.clear()
            self.auth.clear()
            self.in_flight = self.max_in_flight = 0


class Handler(BaseHTTPRequestHandler):
    server: FakeVLM
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out: expected in one test
            pass

    def do_GET(self) -> None:
        if self.path.endswith("/v1/models"):
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = self.path.strip("/").split("/")[0]
        with srv.lock:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            srv.auth.append(self.headers.get("Authorization"))
        try:
            caption, problem = self._check(body)
            with srv.lock:
                srv.calls[(mode, caption)] += 1
                calls = srv.calls[(mode, caption)]
                if problem:
                    srv.problems.append(problem)
            if problem:
                return self._json(400, {"error": problem})
            if mode in ("slow", "slowest"):
                time.sleep(0.2 if mode == "slow" else 1.0)
            if mode == "down" or (mode == "flaky" and calls == 1):
                return self._json(500, {"error": "overloaded"})
            text = {"empty": "   ", "think": f"<think>hmm</think>\n<answer>Detailed: {caption}</answer>"}.get(
                mode, f"  Detailed: {caption}\n"
            )
            self._json(
                200,
                {
                    "id": "x",
                    "object": "chat.completion",
                    "model": body.get("model"),
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": text},
                        }
                    ],
                },
            )
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _check(self, body: dict) -> tuple[str | None, str | None]:
        """(original caption, problem) for one chat-completions request."""
        if not self.path.endswith("/v1/chat/completions"):
            return None, f"path {self.path}"
        if body.get("model") != MODEL:
            return None, f"model {body.get('model')!r}"
        if body.get("max_tokens") != 256 or body.get("temperature") != 0.0:
            return None, "sampling parameters"
        try:
            (message,) = body["messages"]
            image_part, text_part = message["content"]
            url = image_part["image_url"]["url"]
            text = text_part["text"]
            assert (
                message["role"] == "user"
                and image_part["type"] == "image_url"
                and text_part["type"] == "text"
            )
        except (KeyError, ValueError, TypeError, AssertionError):
            return None, "message shape"
        prefix = "data:image/jpeg;base64,"
        if not url.startswith(prefix):
            return None, "not a JPEG data URL"
        caption = self.server.captions.get(base64.b64decode(url[len(prefix) :]))
        if caption is None:
            return None, "image bytes do not match any image sent"
        if f'"{caption}"' not in text:
            return caption, "original caption missing from the prompt"
        return caption, None


@pytest.fixture(scope="module")
def vlm() -> Iterator[FakeVLM]:
    srv = FakeVLM()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server(vlm: FakeVLM) -> FakeVLM:
    vlm.reset()
    return vlm


def batch(
    server: FakeVLM | None,
    captions: list[str | None],
    errors: dict[int, str] | None = None,
    no_image: tuple[int, ...] = (),
) -> pa.RecordBatch:
    rows: dict[str, list] = {f.name: [] for f in S.RAW}
    for i, caption in enumerate(captions):
        image = None if i in no_image else _jpeg(i)
        if server is not None and image is not None and caption is not None:
            server.captions[image] = caption
        values = {
            "sample_id": f"s{i}",
            "kind": "image_text",
            "source": "t",
            "source_key": str(i),
            "image": image,
            "caption": caption,
            "error": (errors or {}).get(i),
        }
        for name, column in rows.items():
            column.append(values.get(name))
    return pa.RecordBatch.from_pydict(rows, schema=S.RAW)


def endpoint(server: FakeVLM, mode: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/{mode}/v1"


CAPTIONS = ["Eiffel Tower at night, Paris 2019", "Golden retriever puppy #dog #cute buy now", "IMG_2033.jpg"]


def test_off_by_default_no_network() -> None:
    stage = Recaption()
    assert stage.state().session is None
    out = stage.apply(batch(None, CAPTIONS))
    assert out.column(S.RECAPTION).to_pylist() == [None] * 3
    assert out.column(RECAPTION_ERROR).to_pylist() == [None] * 3
    assert out.column(S.CAPTION).to_pylist() == CAPTIONS  # the original caption is untouched


def test_success_in_order_and_request_shape(server: FakeVLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLCURATE_TEST_KEY", "sekrit")
    stage = Recaption(endpoint=endpoint(server, "ok"), model=MODEL, api_key_env="VLCURATE_TEST_KEY")
    out = stage.apply(batch(server, CAPTIONS)).to_pylist()
    assert server.problems == []
    assert [r[S.RECAPTION] for r in out] == [f"Detailed: {c}" for c in CAPTIONS]  # stripped, in input order
    assert [r[RECAPTION_ERROR] for r in out] == [None] * 3
    assert [r[S.CAPTION] for r in out] == CAPTIONS
    assert server.auth == ["Bearer sekrit"] * 3


def test_model_discovered_from_server(server: FakeVLM) -> None:
    stage = Recaption(endpoint=endpoint(server, "ok") + "/")  # empty model, trailing slash
    assert stage.state().model == MODEL
    out = stage.apply(batch(server, CAPTIONS[:1])).to_pylist()
    assert out[0][S.RECAPTION] == f"Detailed: {CAPTIONS[0]}" and server.problems == []


def test_skips_rows_with_error_or_without_image(server: FakeVLM) -> None:
    stage = Recaption(endpoint=endpoint(server, "ok"), model=MODEL)
    out = stage.apply(batch(server, CAPTIONS + ["no image"], errors={1: "image_undecodable"}, no_image=(3,)))
    assert out.column(S.RECAPTION).to_pylist() == [
        f"Detailed: {CAPTIONS[0]}",
        None,
        f"Detailed: {CAPTIONS[2]}",
        None,
    ]
    assert out.column(RECAPTION_ERROR).to_pylist() == [None] * 4
    assert sum(server.calls.values()) == 2


def test_retries_after_500(server: FakeVLM) -> None:
    stage = Recaption(endpoint=endpoint(server, "flaky"), model=MODEL, retries=2, backoff_s=0.01)
    out = stage.apply(batch(server, CAPTIONS)).to_pylist()
    assert [r[S.RECAPTION] for r in out] == [f"Detailed: {c}" for c in CAPTIONS]
    assert [r[RECAPTION_ERROR] for r in out] == [None] * 3
    assert all(server.calls[("flaky", c)] == 2 for c in CAPTIONS)


def test_server_always_failing_gives_null_and_a_reason(server: FakeVLM) -> None:
    stage = Recaption(endpoint=endpoint(server, "down"), model=MODEL, retries=2, backoff_s=0.01)
    out = stage.apply(batch(server, CAPTIONS)).to_pylist()
    assert [r[S.RECAPTION] for r in out] == [None] * 3
    assert [r[RECAPTION_ERROR] for r in out] == ["http_500"] * 3
    assert [r[S.CAPTION] for r in out] == CAPTIONS
    assert all(server.calls[("down", c)] == 3 for c in CAPTIONS)  # 1 + retries


def test_unreachable_server_and_timeout_and_empty(server: FakeVLM) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
    s.close()
    dead = Recaption(endpoint=f"http://127.0.0.1:{closed}/v1", model=MODEL, retries=1, backoff_s=0.01)
    assert dead.apply(batch(None, CAPTIONS[:1])).column(RECAPTION_ERROR).to_pylist() == ["connection_error"]
    slow = Recaption(endpoint=endpoint(server, "slowest"), model=MODEL, retries=0, timeout_s=0.2)
    assert slow.apply(batch(server, CAPTIONS[:1])).column(RECAPTION_ERROR).to_pylist() == ["timeout"]
    empty = Recaption(endpoint=endpoint(server, "empty"), model=MODEL, retries=2, backoff_s=0.01)
    out = empty.apply(batch(server, CAPTIONS[:1])).to_pylist()[0]
    assert (out[S.RECAPTION], out[RECAPTION_ERROR]) == (None, "empty")
    assert server.calls[("empty", CAPTIONS[0])] == 1  # an empty answer is not retried


def test_reasoning_block_removed(server: FakeVLM) -> None:
    stage = Recaption(endpoint=endpoint(server, "think"), model=MODEL)
    assert stage.apply(batch(server, CAPTIONS[:1])).column(S.RECAPTION).to_pylist() == [
        f"Detailed: {CAPTIONS[0]}"
    ]
    assert clean_reply("<|begin_of_box|>A cat.<|end_of_box|>") == "A cat."


def test_requests_overlap_with_concurrency(server: FakeVLM) -> None:
    captions = [f"caption number {i}" for i in range(8)]
    stage = Recaption(endpoint=endpoint(server, "slow"), model=MODEL, concurrency=4)
    t0 = time.perf_counter()
    out = stage.apply(batch(server, captions)).to_pylist()
    elapsed = time.perf_counter() - t0
    assert [r[S.RECAPTION] for r in out] == [f"Detailed: {c}" for c in captions]
    assert 2 <= server.max_in_flight <= 4
    assert elapsed < 8 * 0.2  # serial would take 1.6 s


def test_default_prompt_and_placeholder() -> None:
    assert "{caption}" in DEFAULT_PROMPT
    body = Recaption(prompt='JSON like {"a": 1}; caption: {caption}').payload(b"\xff\xd8x", "A {b} cat")
    assert body["messages"][0]["content"][1]["text"] == 'JSON like {"a": 1}; caption: A {b} cat'


def test_train_on_recaption_share() -> None:
    ids = [f"{i:016x}" for i in range(1000)]
    assert [train_on_recaption(s, 0.5, 7) for s in ids] == [train_on_recaption(s, 0.5, 7) for s in ids]
    assert not any(train_on_recaption(s, 0.0, 7) for s in ids)
    assert all(train_on_recaption(s, 1.0, 7) for s in ids)
    half = sum(train_on_recaption(s, 0.5, 7) for s in ids)
    assert 400 <= half <= 600
    assert 200 <= sum(train_on_recaption(s, 0.3, 7) for s in ids) <= 400
    # another seed draws another subset; a larger share only adds samples (same hash, higher bar)
    assert [train_on_recaption(s, 0.5, 8) for s in ids] != [train_on_recaption(s, 0.5, 7) for s in ids]
    assert all(train_on_recaption(s, 0.6, 7) for s in ids if train_on_recaption(s, 0.5, 7))
