"""Tiny shards written by the contract (webdataset.TarWriter, real JPEGs), a tokenizer, a tiny model.

Everything here is session-scoped and small: the trainer suite must run in a few minutes on 2 CPU cores.
Helpers reach the tests as fixtures (`corpus`, `tiny_flags`), not imports: tests/trainer is deliberately
not a package, so that it cannot shadow the real `trainer` package on sys.path.
"""
from __future__ import annotations

import io
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

torch.set_num_threads(1)

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
           "white": (250, 250, 250), "black": (10, 10, 10)}
SHAPES = ["circle", "square", "triangle"]

# sizes that exercise smart_resize: small (scaled up), wide, tall, large (scaled down)
SIZES = [(64, 64), (200, 90), (90, 240), (320, 320), (150, 150), (500, 120)]

# flags for a tiny, fast model shared by the CLI tests
TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
        "--vision-hidden", "32", "--vision-layers", "1", "--vision-heads", "2", "--vision-intermediate", "64",
        "--seq-len", "96", "--batch-rows", "2", "--min-image-tokens", "4", "--max-image-tokens", "16",
        "--threads", "1", "--log-every", "1"]


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def picture(i: int) -> tuple[bytes, str, tuple[int, int]]:
    """A real JPEG of a coloured shape on a background, and the caption that describes it."""
    rng = np.random.default_rng(i)
    names = list(COLOURS)
    fg, bg = names[i % len(names)], names[(i * 2 + 1) % len(names)]
    shape = SHAPES[i % len(SHAPES)]
    w, h = SIZES[i % len(SIZES)]
    img = Image.new("RGB", (w, h), COLOURS[bg])
    d = ImageDraw.Draw(img)
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[fg])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[fg])
    else:
        d.polygon([(w // 2, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)], fill=COLOURS[fg])
    noise = rng.integers(0, 12, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(np.clip(np.asarray(img).astype(np.int16) + noise, 0, 255).astype(np.uint8))
    caption = f"a {fg} {shape} on a {bg} background"
    return jpeg(img), caption, (w, h)


def write_kind(root: str, kind: str, samples: list[dict]) -> str:
    """Write samples into <root>/<kind>/<kind>-NNNNNN.tar (8 per shard) with sizes.json and index.json."""
    import webdataset as wds

    folder = os.path.join(root, kind)
    os.makedirs(folder, exist_ok=True)
    sizes = {}
    for start in range(0, len(samples), 8):
        name = f"{kind}-{start // 8:06d}.tar"
        with wds.TarWriter(os.path.join(folder, name), encoder=False) as w:
            for s in samples[start:start + 8]:
                w.write(s)
        sizes[name] = len(samples[start:start + 8])
    with open(os.path.join(folder, "sizes.json"), "w") as f:
        json.dump(sizes, f)
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1,
             "shardlist": [{"url": k, "nsamples": v} for k, v in sizes.items()]}
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump(index, f)
    return folder


def image_text_sample(i: int) -> dict:
    data, caption, (w, h) = picture(i)
    key = f"{i:016x}"
    meta = {"sample_id": key, "source": "test", "source_key": f"k{i}", "width": w, "height": h,
            "language": "en", "clip_score": 0.31, "phash": "0" * 16, "concepts": [],
            "caption_original": caption, "recaption": None}
    return {"__key__": key, "jpg": data, "txt": caption.encode(), "json": json.dumps(meta).encode()}


def grounding_sample(i: int) -> dict:
    """The layout schemas/grounding.py declares: caption + phrases with spans and 0-999 boxes."""
    from schemas import boxes

    data, _, (w, h) = picture(i + 100)
    caption = f"the shape {i} on the background"
    phrases = [{"text": f"the shape {i}", "span": [0, len(f"the shape {i}")], "boxes": [[250, 250, 750, 750]]},
               {"text": "the background", "span": [len(caption) - 14, len(caption)], "boxes": [[0, 0, 999, 999]]}]
    meta = {"sample_id": f"{i:032x}", "source": "test", "source_key": f"g{i}", "url": None,
            "source_format": "coco", "split": None, "width": w, "height": h, "caption": caption, "phrases": phrases}
    return {"__key__": f"g{i:015x}", "jpg": data, "txt": boxes.render_text(caption, phrases).encode(),
            "json": json.dumps(meta).encode()}


@pytest.fixture(scope="session")
def corpus() -> SimpleNamespace:
    """Sample makers: picture(i) -> (jpeg, caption, size); image_text(i), grounding(i) -> sample dicts;
    write_kind(root, kind, samples) -> folder."""
    return SimpleNamespace(picture=picture, image_text=image_text_sample, grounding=grounding_sample,
                           write_kind=write_kind)


@pytest.fixture(scope="session")
def tiny_flags() -> list[str]:
    return list(TINY)


@pytest.fixture(scope="session")
def shards_root(tmp_path_factory) -> str:
    """OUT/shards with image_text (3 shards, 24 samples, one of them a broken JPEG) and grounding (8)."""
    root = str(tmp_path_factory.mktemp("out") / "shards")
    samples = [image_text_sample(i) for i in range(24)]
    samples[5]["jpg"] = b"\xff\xd8 not really a jpeg"
    write_kind(root, "image_text", samples)
    write_kind(root, "grounding", [grounding_sample(i) for i in range(8)])
    return root


@pytest.fixture(scope="session")
def tokenizer_file(shards_root, tmp_path_factory) -> str:
    from trainer.tokenizer import shard_texts, train_bpe

    tok = train_bpe(shard_texts(shards_root), vocab_size=400, min_frequency=1)
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok.save(path)
    return path


@pytest.fixture(scope="session")
def tok(tokenizer_file):
    from trainer.tokenizer import TextTokenizer

    return TextTokenizer.from_file(tokenizer_file)


@pytest.fixture()
def tiny_config(tok):
    from trainer.model import ModelConfig

    return ModelConfig(vocab_size=448, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, vision_hidden_size=32, vision_layers=1, vision_heads=2,
                       vision_intermediate_size=64, vision_pos_grid=8, image_token_id=tok.image_id)
