"""Factual-centred recaptioning (GLM-4.1V-Thinking §3.1) through an OpenAI-compatible VLM server.

Reads `image` (JPEG bytes, as written by decode), `caption` (the cleaned caption) and `error`; writes
`recaption` (the model's rewrite, or null) and `recaption_error` (null on success or when the row is
skipped; otherwise a short reason: `http_<status>`, `timeout`, `connection_error`, `empty`,
`bad_response`). Keeps every row and never touches `caption`: a failed recaption just leaves the row
training on its original caption. Rows with an `error` or no image are skipped (both columns null).
With `endpoint` empty the stage is off: no network, both columns null.

The server is any OpenAI-compatible chat-completions endpoint serving a vision-language model (vLLM,
SGLang). Which samples train on their recaption is decided later, per sample, by `train_on_recaption`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, NamedTuple

import pyarrow as pa
import requests
from requests.adapters import HTTPAdapter

from filters.base import Stage
from filters.media import column_bytes
from schemas import image_text as S
from schemas.common import ERROR

RECAPTION_ERROR = "recaption_error"

DEFAULT_PROMPT = (
    "You are given an image and its original caption, which was scraped from the web.\n"
    'Original caption: "{caption}"\n\n'
    "Rewrite it into one detailed, accurate caption of the image. Rules:\n"
    "1. Keep every fact from the original caption (names of people, products, places and "
    "organisations; numbers; dates; quoted text) unless the image clearly contradicts it.\n"
    "2. Describe what is visible: the main subjects, their attributes, actions and positions, the "
    "setting, and any legible text.\n"
    "3. Remove noise from the original: advertising, calls to action, prices that are not shown, "
    "file names, URLs, SEO keywords and hashtags.\n"
    "4. Do not invent facts: no names, places, dates or numbers that are neither in the original "
    "caption nor visible in the image. Do not guess.\n"
    "5. Write plain, fluent prose in the language of the original caption, in at most 120 words.\n"
    "Answer with the caption only, without any preamble."
)

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# GLM-4.1V-Thinking wraps its final answer in these special tokens when they are not stripped.
_BOX = re.compile(r"<\|begin_of_box\|>|<\|end_of_box\|>")


def clean_reply(text: str) -> str:
    """The caption inside a model reply: reasoning blocks and answer/box markers removed, stripped."""
    text = _THINK.sub("", text)
    answer = _ANSWER.search(text)
    if answer:
        text = answer.group(1)
    return _BOX.sub("", text).strip()


def image_data_url(data: bytes) -> str:
    # decode normalises to JPEG; the sniff only keeps the stage honest if it runs before decode.
    mime = (
        "image/png"
        if data.startswith(b"\x89PNG")
        else "image/webp"
        if data[8:12] == b"WEBP"
        else "image/jpeg"
    )
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def train_on_recaption(sample_id: str, share: float, seed: int) -> bool:
    """Whether this sample trains on its recaption: uniform hash of (seed, sample_id) < share.

    Deterministic across runs, machines and Python hash seeds, so a recipe's share is reproducible
    and changing `seed` draws a different, independent subset.
    """
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    digest = hashlib.sha256(f"{seed}\x00{sample_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < share


class Reply(NamedTuple):
    recaption: str | None
    error: str | None  # short reason, null on success


class _Retry(NamedTuple):
    error: str
    wait_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class RecaptionState:
    session: requests.Session | None
    url: str
    model: str | None
    headers: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Recaption(Stage):
    name: ClassVar[str] = "recaption"
    endpoint: str = ""  # base URL, e.g. http://host:8000/v1; empty: the stage is off
    model: str = ""  # served model name; empty: ask the server's /models once per worker
    api_key_env: str = "OPENAI_API_KEY"  # env var holding the bearer token, if the server wants one
    concurrency: int = 8  # requests in flight per batch; the server batches them on the GPU
    timeout_s: float = 60.0
    retries: int = 3  # extra attempts after connection errors, timeouts, 429 and 5xx
    backoff_s: float = 1.0  # first retry waits about this long, doubling each time (with jitter)
    max_tokens: int = 256
    temperature: float = 0.0
    prompt: str = DEFAULT_PROMPT  # `{caption}` is replaced by the original caption
    # Not used by the stage itself: the share of recaptioned samples that train on their recaption
    # (drawn per sample by `train_on_recaption` when shards are written); the rest keep the caption.
    train_share: float = 0.5

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.RECAPTION, pa.string()), pa.field(RECAPTION_ERROR, pa.string())]

    def setup(self, threads: int) -> RecaptionState:
        if not self.endpoint:
            return RecaptionState(None, "", None, {})
        session = requests.Session()
        session.trust_env = (
            False  # cluster proxies and .netrc must not hijack an internal endpoint or its key
        )
        size = max(1, self.concurrency)
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        base = self.endpoint.rstrip("/")
        return RecaptionState(
            session,
            f"{base}/chat/completions",
            self.model or self._served_model(session, base, headers),
            headers,
        )

    def _served_model(self, session: requests.Session, base: str, headers: dict[str, str]) -> str | None:
        """The first model id from GET /models; None (the field is then omitted) if that fails."""
        try:
            resp = session.get(f"{base}/models", headers=headers, timeout=self.timeout_s)
            resp.raise_for_status()
            return str(resp.json()["data"][0]["id"])
        except Exception:  # noqa: BLE001 - vLLM and SGLang also accept a request without `model`
            return None

    def payload(self, image: bytes, caption: str | None) -> dict[str, Any]:
        # str.replace, not str.format: a custom prompt may contain other braces (JSON examples).
        text = self.prompt.replace("{caption}", (caption or "").strip() or "(none)")
        body: dict[str, Any] = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                        {"type": "text", "text": text},
                    ],
                }
            ],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        return body

    def recaption_one(self, state: RecaptionState, image: bytes, caption: str | None) -> Reply:
        """One request with retries; never raises: failures become Reply(None, reason)."""
        try:
            body = self.payload(image, caption)
            if state.model:
                body["model"] = state.model
            attempts = max(0, self.retries) + 1
            for attempt in range(attempts):
                result = self._attempt(state, body)
                if isinstance(result, Reply):
                    return result
                if attempt + 1 == attempts:
                    return Reply(None, result.error)
                wait = self.backoff_s * (2**attempt) * random.uniform(0.5, 1.0)
                time.sleep(max(wait, result.wait_s))
        except Exception as e:  # noqa: BLE001 - one odd row must not fail the partition
            return Reply(None, f"bad_response: {type(e).__name__}"[:100])
        raise AssertionError("unreachable")

    def _attempt(self, state: RecaptionState, body: dict[str, Any]) -> Reply | _Retry:
        assert state.session is not None
        try:
            resp = state.session.post(state.url, json=body, headers=state.headers, timeout=self.timeout_s)
        except requests.exceptions.Timeout:
            return _Retry("timeout")
        except requests.exceptions.ConnectionError:
            return _Retry("connection_error")
        status = resp.status_code
        if status == 429 or 500 <= status < 600:
            retry_after = resp.headers.get("Retry-After", "")
            wait = min(float(retry_after), self.timeout_s) if retry_after.isdigit() else 0.0
            return _Retry(f"http_{status}", wait)
        if status != 200:
            return Reply(None, f"http_{status}")
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return Reply(None, "bad_response")
        text = clean_reply(content) if isinstance(content, str) else ""
        # An empty answer at temperature 0 would come back empty again: not worth a retry.
        return Reply(text, None) if text else Reply(None, "empty")

    def process(self, batch: pa.RecordBatch, state: RecaptionState) -> dict[str, list]:
        n = batch.num_rows
        recaptions: list[str | None] = [None] * n
        errors: list[str | None] = [None] * n
        if state.session is None:
            return {S.RECAPTION: recaptions, RECAPTION_ERROR: errors}
        images = column_bytes(batch, S.IMAGE)
        captions = batch.column(S.CAPTION).to_pylist()
        row_errors = batch.column(ERROR).to_pylist()
        todo = [i for i in range(n) if row_errors[i] is None and images[i]]
        if todo:
            with ThreadPoolExecutor(
                max_workers=max(1, min(self.concurrency, len(todo))), thread_name_prefix="recaption"
            ) as pool:
                replies = pool.map(lambda i: self.recaption_one(state, images[i], captions[i]), todo)
                for i, reply in zip(todo, replies):
                    recaptions[i], errors[i] = reply
        return {S.RECAPTION: recaptions, RECAPTION_ERROR: errors}
