"""CLIP scoring with real open_clip code: random weights, a checkpoint saved by the test, weights that
cannot be loaded (the run fails unless allow_random_weights), and the copy shipped to executors."""
from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image

from filters.clip import ClipConfigError, ClipScore, known_models, local_weights, resolve_weights
from jobs.make_sample import load_photo

# the smallest open_clip architecture keeps the test fast; the default recipe uses ViT-B-32
MODEL = "RN50"


def _checkpoint(path, seed=123):
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, path)
    return model


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


def test_local_checkpoint_is_loaded_shipped_and_counts_as_real(tmp_path, batch):
    import open_clip
    import torch

    ckpt = tmp_path / "clip.pt"
    model = _checkpoint(ckpt)
    shipped = []
    stage, real, msg = resolve_weights(ClipScore(model=MODEL, pretrained=str(ckpt)), ship=shipped.append)
    assert real and str(ckpt) in msg and stage.pretrained == str(ckpt)
    assert shipped == [str(ckpt)]  # handed to SparkContext.addFile by the pipeline
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


@pytest.fixture
def unloadable(tmp_path, monkeypatch):
    """pretrained values whose weights cannot be had, with what the error must say was tried."""
    from huggingface_hub import constants

    # offline, with an empty cache: no network probe, no download (the hub client reads its
    # constants at import, so they are patched too)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    return {
        "missing file": (str(tmp_path / "nope.pt"), "does not exist"),
        "corrupt file": (str(corrupt), "could not be loaded as RN50 weights"),
        "unknown tag": ("laion9000", "no such tag for RN50"),
        "tag not cached, offline": ("openai", "download failed"),
        "object store": ("s3://bucket/clip.pt", "only local files"),
    }


@pytest.mark.parametrize("case", ["missing file", "corrupt file", "unknown tag", "tag not cached, offline",
                                  "object store"])
def test_unloadable_weights_fail_naming_the_recipe_key(unloadable, case):
    pretrained, why = unloadable[case]
    shipped = []
    with pytest.raises(ClipConfigError) as err:
        resolve_weights(ClipScore(model=MODEL, pretrained=pretrained), ship=shipped.append)
    msg = str(err.value)
    assert msg.startswith("image_text.clip.pretrained: cannot load CLIP weights")
    assert pretrained in msg and why in msg  # what was tried, and why it failed
    assert "image_text.clip.allow_random_weights=true" in msg  # the way out, named
    assert shipped == []


def test_allow_random_weights_falls_back_loudly(unloadable, caplog):
    for pretrained, why in unloadable.values():
        stage, real, msg = resolve_weights(ClipScore(model=MODEL, pretrained=pretrained, allow_random_weights=True))
        assert not real and stage.pretrained == "" and stage.allow_random_weights
        assert "RANDOM" in msg and "NOT applied" in msg and pretrained in msg and why in msg
        assert msg in caplog.text


def test_empty_pretrained_is_random_by_request_without_the_flag(caplog):
    stage, real, msg = resolve_weights(ClipScore(model=MODEL, pretrained=""))
    assert not real and stage.pretrained == "" and "by request" in msg and "NOT applied" in msg
    assert "RANDOM" in caplog.text


def test_executor_reads_the_copy_shipped_with_the_job(tmp_path, monkeypatch):
    """Where the driver's path does not exist (another machine), setup opens SparkFiles.get(name), the
    copy SparkContext.addFile put in the executor's files folder (simulated here, as a Python worker sees it)."""
    from pyspark import SparkFiles

    files = tmp_path / "executor-files"
    files.mkdir()
    monkeypatch.setattr(SparkFiles, "_root_directory", str(files))
    monkeypatch.setattr(SparkFiles, "_is_running_on_worker", True)
    on_driver = str(tmp_path / "driver-only" / "clip.pt")
    with pytest.raises(FileNotFoundError, match="not on this machine and was not shipped"):
        local_weights(on_driver)
    _checkpoint(files / "clip.pt")
    assert local_weights(on_driver) == str(files / "clip.pt")
    assert local_weights("openai") == "openai" and local_weights("") == ""  # tags go to open_clip unchanged
    state = ClipScore(model=MODEL, pretrained=on_driver).setup(threads=1)
    assert state[0] is not None


def test_unknown_model_is_a_config_error():
    with pytest.raises(ClipConfigError, match="image_text.clip.model 'ViT-Nope' is not an open_clip model"):
        resolve_weights(ClipScore(model="ViT-Nope"))


def test_random_weights_are_resolved_without_importing_open_clip():
    """The driver checks the model name against the configs open_clip ships (the same names as its
    list_models) and, for random weights, never imports it (torch, torchvision, timm: ~8 CPU s)."""
    import subprocess
    import sys

    code = ("import sys; from filters.clip import ClipScore, resolve_weights; "
            f"resolve_weights(ClipScore(model={MODEL!r}, pretrained='')); "
            "print(sorted(m for m in ('open_clip', 'torch', 'torchvision', 'timm') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr
    import open_clip

    assert known_models() == sorted(open_clip.list_models())


@pytest.mark.parametrize("model", ["RN50", "ViT-B-32"])
def test_pixels_from_bytes_are_the_models_own_transform_after_a_draft_decode(model):
    """The stage's batch path (draft decode, PIL resize and crop, one normalisation in numpy) gives the
    pixels open_clip's own eval transform gives on the same decoded image, for any aspect ratio and for
    images smaller than the model's input; big JPEGs decode at a DCT scale that still covers it."""
    import numpy as np
    import open_clip

    *_, transform = open_clip.create_model_and_transforms(model, pretrained=None)
    pixels = ClipScore(model=model, pretrained="").state(1)[1]
    photo = load_photo("astronaut")
    sizes = [(640, 480), (480, 640), (333, 517), (224, 300), (224, 224), (100, 80), (1024, 768), (2001, 999)]
    blobs = [_jpeg(photo.resize(size)) for size in sizes]
    got = pixels.from_bytes(blobs)
    assert got.shape == (len(sizes), 3, 224, 224) and got.dtype == np.float32
    for blob, row in zip(blobs, got):
        assert np.abs(transform(pixels.decode(blob)).numpy() - row).max() < 1e-5
    assert pixels.decode(blobs[sizes.index((2001, 999))]).size == (501, 250)  # 1/4 scale: both sides >= 224
    assert pixels.decode(blobs[sizes.index((640, 480))]).size == (320, 240)
    assert pixels(photo.convert("RGB")).shape == (3, 224, 224)  # one PIL image: open_clip's transform, as before


@pytest.mark.parametrize("model", ["RN50", "ViT-B-32"])
def test_captions_cut_after_the_end_token_give_the_same_text_embeddings(model):
    """A causal text tower pooled at the end token ignores the padding after it: the torch encoder runs
    only up to the batch's longest caption, with the embeddings of the model's own encode_text."""
    import numpy as np
    import open_clip
    import torch

    from filters.clip import _TorchClip, causal_text, cut_captions

    torch.manual_seed(0)
    m = open_clip.create_model(model, pretrained=None).eval()
    tokens = open_clip.get_tokenizer(model)(["a cat", "two dogs playing in the snow at night", ""]).numpy()
    assert causal_text(m) and cut_captions(tokens).shape == (3, 10)
    with torch.inference_mode():
        ref = m.encode_text(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(_TorchClip(m, "cpu").encode_text(tokens), ref, atol=1e-4)
    m.text_pool_type = "last"  # pooled at the last position: every position counts, nothing is cut
    assert not causal_text(m) and _TorchClip(m, "cpu").cut is False
