"""CLIP on ONNX Runtime (fp32 and int8) agrees with torch fp32 on real photos, with weights from a saved
checkpoint; attention is exported as ORT's fused op (and quantised as QAttention), with a plain export
when that fails; the export is made once and reused by the fingerprint of the weights and the export
recipe."""
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
    encoder, pixels, tokenizer = stage.setup(threads=2)
    return (encoder.encode_image(pixels.from_bytes(batch.column("image").to_pylist())),
            encoder.encode_text(tokenizer(batch.column("caption").to_pylist()).numpy()))


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


def _graph_ops(folder: str, tower: str) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(os.path.join(folder, f"{tower}.onnx")).graph.node]


@pytest.mark.parametrize("backend", ["onnx", "onnx_int8"])
def test_attention_is_exported_fused_and_quantised(setup, backend):
    """Each attention block is one fused node (ORT's Attention, QAttention with int8 weights), not the
    exporter's reshapes and transposes; the patch-embedding Conv stays float (ConvInteger is slower)."""
    import open_clip

    from filters.clip_onnx import weights_fingerprint

    ckpt, cache, _ = setup
    _stage(ckpt, cache, backend).setup(threads=1)
    folder = os.path.join(cache, weights_fingerprint(MODEL, ckpt, 0, backend))
    layers = open_clip.get_model_config(MODEL)
    fused = "Attention" if backend == "onnx" else "QAttention"
    image, text = _graph_ops(folder, "image"), _graph_ops(folder, "text")
    assert image.count(fused) == layers["vision_cfg"]["layers"] and text.count(fused) == layers["text_cfg"]["layers"]
    assert "Softmax" not in image + text and image.count("Transpose") <= 1  # the exporter's attention is gone
    if backend == "onnx_int8":
        assert "Conv" in image and "ConvInteger" not in image and "MatMulInteger" in image + text


def test_unfusable_tower_is_exported_plainly_and_still_agrees(setup, tmp_path, monkeypatch):
    import onnx

    from filters import clip_onnx

    ckpt, _, batch = setup
    check = clip_onnx._check

    def refuse_fused(tower, path, inputs, **kw):
        if "Attention" in [n.op_type for n in onnx.load(path).graph.node]:
            raise ValueError("exported tower disagrees with torch (simulated)")
        check(tower, path, inputs, **kw)

    monkeypatch.setattr(clip_onnx, "_check", refuse_fused)
    cache = str(tmp_path / "cache")
    got = _stage(ckpt, cache, "onnx")
    scores = np.array(got.apply(batch).column("clip_score").to_pylist())
    ref = np.array(_stage(ckpt, cache, "torch").apply(batch).column("clip_score").to_pylist())
    assert np.abs(scores - ref).max() < 1e-4
    (folder,) = os.listdir(cache)
    ops = _graph_ops(os.path.join(cache, folder), "image")
    assert "Attention" not in ops and "Softmax" in ops


def test_export_is_cached_by_the_weights_fingerprint(setup, tmp_path):
    import torch

    ckpt, cache, _ = setup
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


def test_fingerprint_covers_the_export_recipe_and_versions(setup, monkeypatch):
    import onnxruntime

    from filters import clip_onnx

    ckpt, _, _ = setup
    fp = clip_onnx.weights_fingerprint(MODEL, ckpt, 0, "onnx")
    assert clip_onnx.weights_fingerprint(MODEL, ckpt, 0, "onnx_int8") != fp
    monkeypatch.setattr(clip_onnx, "EXPORT_VERSION", clip_onnx.EXPORT_VERSION + 1)
    assert clip_onnx.weights_fingerprint(MODEL, ckpt, 0, "onnx") != fp  # a new way of exporting: a new export
    monkeypatch.undo()
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.0")
    assert clip_onnx.weights_fingerprint(MODEL, ckpt, 0, "onnx") != fp


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="clip.backend must be one of torch, onnx, onnx_int8"):
        ClipScore(backend="tensorrt")


def test_model_whose_export_disagrees_fails_naming_the_torch_backend(tmp_path):
    """RN50's image tower exports to a graph that is right for the traced batch size only: refused at
    setup, not scored wrongly."""
    from filters.clip_onnx import ExportError

    with pytest.raises(ExportError, match=r"RN50: CLIP image tower: exported tower disagrees.*use clip.backend: torch"):
        ClipScore(model="RN50", pretrained="", backend="onnx", onnx_cache=str(tmp_path)).setup(threads=1)


def test_text_tower_takes_captions_cut_after_their_end_token(setup):
    """The text graph's sequence axis is dynamic: the batch's captions are cut after the longest one's
    end token, with the same embeddings as the model's own encode_text on all 77 positions."""
    import open_clip
    import torch

    ckpt, cache, _ = setup
    encoder, _, tokenizer = _stage(ckpt, cache, "onnx").setup(threads=1)
    assert encoder.cut
    tokens = tokenizer(["a cat", "a black and white photo of a cameraman on a tripod", "x"]).numpy()
    model = open_clip.create_model(MODEL, pretrained=ckpt).eval()
    with torch.inference_mode():
        ref = model.encode_text(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(encoder.encode_text(tokens), ref, atol=1e-4)
