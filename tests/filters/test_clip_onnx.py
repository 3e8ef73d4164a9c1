"""CLIP on ONNX Runtime (fp32 and int8) agrees with torch fp32 on real photos, with weights from a saved
checkpoint; the export is made once and reused by the fingerprint of the weights."""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pytest

from filters.clip import ClipScore

MODEL = "ViT-S-32"  # small: the export takes seconds; the default recipe's ViT-B-32 exports the same way
CAPTIONS = ["an astronaut in a white suit", "a cup of coffee on a saucer", "a cat lying down",
            "a rocket launch", "a black and white photo of a cameraman", "a brick wall", "a horse",
            "a page of printed text"]


def _photos() -> list[bytes]:
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "horse", "page"):
        arr = getattr(data, name)()
        img = Image.fromarray(arr if arr.dtype == np.uint8 else (arr * 255).astype(np.uint8)).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import open_clip
    import torch

    tmp = tmp_path_factory.mktemp("clip-onnx")
    torch.manual_seed(7)
    model = open_clip.create_model(MODEL, pretrained=None)
    ckpt = str(tmp / "clip.pt")
    torch.save(model.state_dict(), ckpt)
    photos = _photos()
    batch = pa.RecordBatch.from_pydict({"image": photos, "caption": CAPTIONS})
    return ckpt, str(tmp / "cache"), batch


def _stage(ckpt, cache, backend):
    return ClipScore(model=MODEL, pretrained=ckpt, backend=backend, onnx_cache=cache, batch_size=8)


def _embeddings(stage, batch):
    from PIL import Image

    encoder, preprocess, tokenizer = stage.setup(threads=2)
    pixels = np.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")).numpy()
                       for b in batch.column("image").to_pylist()])
    return encoder.encode_image(pixels), encoder.encode_text(tokenizer(batch.column("caption").to_pylist()).numpy())


def _cos(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


@pytest.mark.parametrize("backend", ["onnx", "onnx_int8"])
def test_onnx_agrees_with_torch_on_real_photos(setup, backend):
    ckpt, cache, batch = setup
    ref = _stage(ckpt, cache, "torch")
    got = _stage(ckpt, cache, backend)
    scores_ref = np.array(ref.apply(batch).column("clip_score").to_pylist())
    scores = np.array(got.apply(batch).column("clip_score").to_pylist())
    assert np.abs(scores - scores_ref).max() < 0.01, (scores, scores_ref)
    (img_ref, txt_ref), (img, txt) = _embeddings(ref, batch), _embeddings(got, batch)
    assert _cos(img, img_ref).min() >= 0.99
    assert _cos(txt, txt_ref).min() >= 0.99
    if backend == "onnx":  # fp32 is the same computation: far tighter than the bar
        assert np.abs(scores - scores_ref).max() < 1e-4


def test_export_is_cached_by_the_weights_fingerprint(setup, tmp_path):
    import torch

    ckpt, cache, batch = setup
    _stage(ckpt, cache, "onnx").setup(threads=1)
    folders = sorted(os.listdir(cache))
    stamps = {f: os.path.getmtime(os.path.join(cache, f, "image.onnx")) for f in folders}
    _stage(ckpt, cache, "onnx").setup(threads=1)  # the same weights: the export is reused as it is
    assert {f: os.path.getmtime(os.path.join(cache, f, "image.onnx")) for f in folders} == stamps
    assert not [f for f in os.listdir(cache) if f.startswith(".export-")]  # no temporary left
    # other weights in a file of the same name get an export of their own
    other = tmp_path / "clip.pt"
    state = torch.load(ckpt)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, other)
    _stage(str(other), cache, "onnx").setup(threads=1)
    assert len(os.listdir(cache)) == len(folders) + 1


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="clip.backend must be one of torch, onnx, onnx_int8"):
        ClipScore(backend="tensorrt")
