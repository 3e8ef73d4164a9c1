"""CLIP scoring with real open_clip code: random weights, and a checkpoint saved by the test."""
from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image

from filters.clip import ClipScore, resolve_weights
from jobs.make_sample import load_photo

# the smallest open_clip architecture keeps the test fast; the default recipe uses ViT-B-32
MODEL = "RN50"


def _jpeg(img):
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def batch():
    return pa.RecordBatch.from_pylist([
        {"image": _jpeg(load_photo("chelsea")), "caption": "a cat"},
        {"image": _jpeg(load_photo("rocket")), "caption": "a rocket on a launch pad"},
        {"image": None, "caption": "no image"},
        {"image": _jpeg(load_photo("coffee")), "caption": ""},
    ])


def test_random_weights_give_deterministic_cosines(batch):
    stage = ClipScore(model=MODEL, pretrained="", batch_size=2)
    a = stage.apply(batch).column("clip_score").to_pylist()
    b = ClipScore(model=MODEL, pretrained="", batch_size=3).apply(batch).column("clip_score").to_pylist()
    assert a[2] is None and a[3] is None  # nothing to score
    assert all(-1.0 <= s <= 1.0 for s in a[:2])
    assert a[:2] == pytest.approx(b[:2], abs=1e-4)


def test_local_checkpoint_is_loaded_and_counts_as_real(tmp_path, batch):
    import open_clip
    import torch

    torch.manual_seed(123)
    model = open_clip.create_model(MODEL, pretrained=None)
    ckpt = tmp_path / "clip.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    stage, real, msg = resolve_weights(ClipScore(model=MODEL, pretrained=str(ckpt)))
    assert real and str(ckpt) in msg and stage.pretrained == str(ckpt)
    loaded = stage.apply(batch).column("clip_score").to_pylist()
    random = ClipScore(model=MODEL, pretrained="").apply(batch).column("clip_score").to_pylist()
    assert loaded[:2] != pytest.approx(random[:2], abs=1e-4)  # the checkpoint's weights were used
    with torch.inference_mode():
        model.eval()
        _, _, pre = open_clip.create_model_and_transforms(MODEL, pretrained=None)
        img = pre(Image.open(io.BytesIO(batch.column("image")[0].as_py())).convert("RGB")).unsqueeze(0)
        tok = open_clip.get_tokenizer(MODEL)(["a cat"])
        i, t = model.encode_image(img), model.encode_text(tok)
        expect = float((i / i.norm() * (t / t.norm())).sum())
    assert loaded[0] == pytest.approx(expect, abs=2e-3)


def test_missing_weights_fall_back_to_random_loudly(tmp_path, caplog):
    stage, real, msg = resolve_weights(ClipScore(model=MODEL, pretrained=str(tmp_path / "nope.pt")))
    assert not real and stage.pretrained == "" and "RANDOM" in msg and "NOT applied" in msg
    assert "RANDOM" in caplog.text


def test_unknown_model_is_a_config_error():
    with pytest.raises(ValueError, match="not an open_clip model"):
        resolve_weights(ClipScore(model="ViT-Nope"))
