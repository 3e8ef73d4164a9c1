"""The image_text pipeline in-process on the local[2] session: URL rows downloaded from a local HTTP
server, opt-outs and failures in the ledger, recaptions from a local OpenAI-compatible server."""
from __future__ import annotations

import io
import json
import os
import socket
import tarfile
import threading
from http.server import ThreadingHTTPServer
from typing import ClassVar

import pyarrow.parquet as pq
import pytest
from PIL import Image

from filters.recaption import train_on_recaption
from jobs.make_sample import PHOTOS, load_photo
from pipelines.build import run_build
from pipelines.recipe import load
from tests.util import QuietHandler

NAMES = list(PHOTOS)[:8]


class Handler(QuietHandler):
    images: ClassVar[dict[str, bytes]] = {}
    chats: ClassVar[list[dict]] = []

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        if name == "noai.jpg":
            self._send(200, self.images[NAMES[0]], headers=[("X-Robots-Tag", "noai")])
        elif name in self.images:
            self._send(200, self.images[name])
        else:
            self._send(404, b"not found", "text/plain")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
        Handler.chats.append(body)
        reply = {"choices": [{"message": {"role": "assistant", "content": f"RECAPTION ({len(text)} chars of prompt)"}}]}
        self._send(200, json.dumps(reply).encode(), "application/json")


@pytest.fixture(scope="module")
def server():
    for n in NAMES:
        buf = io.BytesIO()
        load_photo(n).convert("RGB").save(buf, format="JPEG", quality=90)
        Handler.images[n] = buf.getvalue()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_urls_opt_outs_and_recaptions(spark, server, tmp_path):
    rows = [{"key": n, "url": f"{server}/img/{n}", "caption": PHOTOS[n]} for n in NAMES]
    rows += [
        {"key": "noai", "url": f"{server}/img/noai.jpg", "caption": "An astronaut portrait that opted out of AI."},
        {"key": "missing", "url": f"{server}/img/nothing-here", "caption": "A picture that is not on the server."},
        {"key": "closed", "url": f"http://127.0.0.1:{_closed_port()}/x.jpg", "caption": "A server that is down."},
        {"key": "private", "url": "http://10.1.2.3/x.jpg", "caption": "An address inside a private network."},
    ]
    table = tmp_path / "urls.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "out")
    recipe = load(None, [
        "image_text.download.allow_loopback=true", "image_text.download.retries=0", "image_text.download.timeout_s=5",
        "image_text.clip.pretrained=", f"image_text.recaption.endpoint={server}/v1", "image_text.recaption.model=m",
        "image_text.recaption.train_share=0.5", "shards.max_samples=4",
    ], [f"image_text={table}"], out)
    summary = run_build(spark, recipe, recipe.inputs, out)

    ledger = {r["source_key"]: r for r in pq.read_table(os.path.join(out, "ledger")).to_pylist()}
    assert len(ledger) == len(rows)
    assert (ledger["noai"]["status"], ledger["noai"]["reason"]) == ("dropped", "opted_out")
    assert (ledger["missing"]["status"], ledger["missing"]["reason"]) == ("quarantined", "download_http_error")
    assert "404" in ledger["missing"]["detail"]
    assert (ledger["closed"]["status"], ledger["closed"]["reason"]) == ("quarantined", "download_failed")
    assert (ledger["private"]["status"], ledger["private"]["reason"]) == ("quarantined", "download_blocked_address")
    kept = [r for r in ledger.values() if r["status"] == "kept"]
    assert len(kept) == summary["kinds"]["image_text"]["kept"] >= 6

    samples = []
    shard_dir = os.path.join(out, "shards", "image_text")
    for name in sorted(os.listdir(shard_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(shard_dir, name)) as tf:
                members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
            for m, data in members.items():
                if m.endswith(".json"):
                    key = m[:-5]
                    samples.append((json.loads(data), members[key + ".txt"].decode(), members[key + ".jpg"]))
    assert len(samples) == len(kept)
    for meta, txt, jpg in samples:
        assert meta["url"].startswith(server) and meta["recaption"].startswith("RECAPTION")
        assert meta["caption_original"] in PHOTOS.values()
        expect_recap = train_on_recaption(meta["sample_id"], 0.5, 0)
        assert meta["text_source"] == ("recaption" if expect_recap else "caption")
        assert txt == (meta["recaption"] if expect_recap else meta["caption"])
        assert Image.open(io.BytesIO(jpg)).size == (meta["width"], meta["height"])
    # the VLM saw the original caption of every kept sample, with the image as a data URL
    prompts = [next(p["text"] for p in c["messages"][0]["content"] if p["type"] == "text") for c in Handler.chats]
    for meta, _, _ in samples:
        assert any(meta["caption_original"] in p for p in prompts)
    assert all(c["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
               for c in Handler.chats)
    contract_is_what_the_trainer_reads(shard_dir, len(kept))


def contract_is_what_the_trainer_reads(shard_dir: str, n: int) -> None:
    """image_text's contract test: the shards the writer produced hold the contract, and the trainer's
    formatter (which finds its members through the same contract) turns every sample into tokens."""
    from schemas import image_text as S
    from trainer import formatters, shards
    from trainer.formatters import FormatContext
    from trainer.images import ImageConfig
    from trainer.tokenizer import train_bpe

    found = shards.find_kinds(shard_dir, ["image_text"])["image_text"]
    samples = list(shards.iter_raw_samples([s.url for s in found]))
    assert len(samples) == n
    contract = S.contract()
    assert all(contract.violations(s) == [] for s in samples), [contract.violations(s) for s in samples]
    fmt = formatters.get("image_text")
    tok = train_bpe([t for s in samples for t in fmt.texts(s)] * 10, vocab_size=300, min_frequency=1)
    ctx = FormatContext(tok, ImageConfig(min_pixels=4 * 784, max_pixels=16 * 784), max_len=512)
    for s in samples:
        f = fmt.format(s, ctx)
        assert len(f.images) == 1 and f.key == s["__key__"]
        assert tok.decode(f.ids).endswith(s["txt"].decode().strip() + "<|endoftext|>")
