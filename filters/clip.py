"""CLIP image-text relevance (GLM-4.1V keeps pairs with cosine > 0.3).

Reads `image` (JPEG bytes) and `caption`; writes `clip_score` (cosine of the L2-normalised open_clip
embeddings). The model loads once per Python worker, with torch limited to the task's cores.
Weights: an open_clip pretrained tag (downloaded when online) or a checkpoint file on the driver.
`resolve_weights` runs on the driver before any Spark work: it fetches and test-loads the weights and
ships the file to every executor (`SparkContext.addFile`; `setup` reads the shipped copy where the
path does not exist on the executor's machine). Weights that cannot be loaded fail the run with a
`ClipConfigError` naming the recipe key, unless `allow_random_weights` is set: then, as with
`pretrained: ""` (random weights by request), the stage runs with seeded random weights, scores are
recorded and the pipeline does not apply the threshold (never drop data on noise).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import logging
import os
import pathlib
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from filters.base import Stage
from filters.media import column_bytes
from schemas import image_text as S

log = logging.getLogger(__name__)
CHECKPOINT_SUFFIXES = (".pt", ".bin", ".safetensors", ".pth")


class ClipConfigError(ValueError):
    """A CLIP recipe setting that cannot be honoured (weights that cannot be loaded, an unknown model).
    Raised on the driver before any Spark work; jobs/build_pretrain.py exits 2 with its message."""


@dataclasses.dataclass(frozen=True)
class ClipScore(Stage):
    name: ClassVar[str] = "clip"
    enabled: bool = True
    model: str = "ViT-B-32"
    pretrained: str = "openai"  # open_clip tag, or a path to a checkpoint file; "" = random weights
    threshold: float = 0.3
    batch_size: int = 32
    device: str = "auto"  # auto: cuda when available
    seed: int = 0  # for random initialisation when no weights are available
    # weights that cannot be loaded: score with seeded random weights (threshold not applied) instead of
    # failing the run. For the bundled sample and `make demo` only: a real run must not silently lose its filter
    allow_random_weights: bool = False
    # torch | onnx | onnx_int8 (filters/clip_onnx.py: the model in use exported to ONNX Runtime at first
    # need, cached by a fingerprint of its weights in onnx_cache, default ~/.cache/vlcurate/clip-onnx)
    backend: str = "torch"
    onnx_cache: str = ""

    def __post_init__(self) -> None:
        from filters.clip_onnx import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"clip.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.CLIP_SCORE, pa.float32())]

    def cache_key(self) -> Any:
        # the scores depend on the weights and the backend (int8 moves them a little) only: the threshold
        # is applied later, batch size and device do not change them
        return (self.model, self.pretrained, self.seed) + ((self.backend,) if self.backend != "torch" else ())

    def setup(self, threads: int) -> Any:
        import open_clip
        import torch

        torch.set_num_threads(threads)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        torch.manual_seed(self.seed)
        weights = local_weights(self.pretrained)
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.model, pretrained=weights or None, device="cpu" if self.backend != "torch" else device,
            weights_only=False)
        model.eval()
        tokenizer = open_clip.get_tokenizer(self.model)
        pixels = ClipPixels(open_clip.get_model_preprocess_cfg(model), preprocess)
        if self.backend == "torch" and device.startswith("cuda"):
            from filters.clip_gpu import GpuClip  # fp16, pinned non-blocking uploads (run: overlapped decode)

            return GpuClip(model, device), pixels, tokenizer
        if self.backend == "torch":
            return _TorchClip(model, device), pixels, tokenizer
        from filters import clip_onnx

        return clip_onnx.load(model, self.model, weights, self.seed, self.backend, threads, self.onnx_cache,
                              device), pixels, tokenizer

    def on_gpu(self) -> bool:
        """Whether this worker scores on a GPU (torch backend, `device` cuda, or auto with CUDA present)."""
        if self.backend != "torch" or not (self.device == "auto" or self.device.startswith("cuda")):
            return False
        import torch

        return self.device != "auto" or torch.cuda.is_available()

    def run(self, batches, threads: int = 1, timing: list[float] | None = None):
        """On a GPU (filters/clip_gpu.py): the GPU Spark gave this task, decode on `threads` CPU threads
        overlapped with the model, sub-batches of `batch_size` that span Arrow batches (128 rows)."""
        if not self.on_gpu():
            return super().run(batches, threads, timing)
        from filters.clip_gpu import run_stage

        stage = dataclasses.replace(self, device="cuda") if self.device == "auto" else self
        return run_stage(stage, batches, threads, timing, S.IMAGE, S.CAPTION)

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        encoder, pixels, tokenizer = state
        images = column_bytes(batch, S.IMAGE)
        captions = batch.column(S.CAPTION).to_pylist()
        scores: list[float | None] = [None] * len(images)
        todo = [i for i, (im, cap) in enumerate(zip(images, captions)) if im is not None and cap]
        # captions of a length together: the text tower runs up to each batch's longest (cut_captions)
        todo.sort(key=lambda i: len(captions[i]))
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            img_emb = normalise(encoder.encode_image(pixels.from_bytes([images[i] for i in idx])))
            txt_emb = normalise(encoder.encode_text(tokenizer([captions[i] for i in idx]).numpy()))
            for i, s in zip(idx, (img_emb * txt_emb).sum(-1)):
                scores[i] = float(np.round(s, 6))
        return {S.CLIP_SCORE: scores}


class ClipPixels:
    """The model's image transform: `from_bytes(blobs)` makes the input batch, (n, 3, size, size) float32
    in numpy, from encoded images; calling it on one PIL image is open_clip's own transform (a torch
    tensor), so it stands in where that was used (filters/video_embed.py).

    `from_bytes`: JPEGs decode in draft mode (libjpeg's DCT scaling to the smallest 1/2, 1/4 or 1/8
    of the image that still covers the model's input size on both sides: most of the decode's cost on
    web photos is saved). Then, for open_clip's usual eval transform (shorter side resized to `size`,
    bicubic or bilinear; centre crop), the same PIL resize and crop that torchvision makes, and one
    vectorised normalisation for the whole batch instead of ToTensor and Normalize per image: the
    same pixels as the model's transform on the draft-decoded image. Other transforms (`squash`,
    `longest`, non-square sizes) run the model's own transform per image after the draft decode.
    """

    def __init__(self, cfg: dict, transform: Callable):
        from PIL import Image

        size = cfg.get("size", 224)
        self.size = tuple(size) if isinstance(size, tuple | list) else (size, size)
        interpolation = cfg.get("interpolation", "bicubic")
        self.fast = (cfg.get("resize_mode", "shortest") == "shortest" and self.size[0] == self.size[1]
                     and interpolation in ("bicubic", "bilinear"))
        self.resample = Image.Resampling.BILINEAR if interpolation == "bilinear" else Image.Resampling.BICUBIC
        mean, std = np.asarray(cfg["mean"], np.float64), np.asarray(cfg["std"], np.float64)
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)[:, None, None]
        self.offset = (mean / std).astype(np.float32)[:, None, None]
        self.transform = transform

    def decode(self, data: bytes):
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        img.draft("RGB", self.size[::-1])  # JPEG only; every side stays >= the model's
        return img.convert("RGB")

    def resized(self, img):
        """The shorter side resized to `size` and centre-cropped, as torchvision's Resize(size) and
        CenterCrop(size) compute it on a PIL image."""
        s = self.size[0]
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        new_w, new_h = (s, new_long) if w <= h else (new_long, s)
        left, top = round((new_w - s) / 2.0), round((new_h - s) / 2.0)  # torchvision rounds half to even too
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), self.resample)
        return img.crop((left, top, left + s, top + s))

    def __call__(self, img):
        return self.transform(img)

    def from_bytes(self, blobs: list[bytes]) -> np.ndarray:
        if not self.fast:
            return np.stack([self.transform(self.decode(b)).numpy() for b in blobs]).astype(np.float32)
        s = self.size[0]
        u8 = np.empty((len(blobs), s, s, 3), np.uint8)
        for k, data in enumerate(blobs):
            u8[k] = np.asarray(self.resized(self.decode(data)))
        # channels first while still bytes: a quarter of the memory traffic of transposing the floats
        out = np.multiply(np.ascontiguousarray(u8.transpose(0, 3, 1, 2)), self.scale, dtype=np.float32)
        out -= self.offset
        return out


def normalise(emb: np.ndarray) -> np.ndarray:
    emb = emb.astype(np.float32)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


class _TorchClip:
    """The open_clip model behind the same numpy-in, numpy-out interface as filters.clip_onnx.OnnxClip."""

    def __init__(self, model, device: str):
        self.model, self.device = model, device
        self.cut = causal_text(model)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model.encode_image(torch.from_numpy(pixels).to(self.device)).float().cpu().numpy()

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            if self.cut:
                emb = encode_text_prefix(self.model, torch.from_numpy(cut_captions(tokens)).to(self.device))
            else:
                emb = self.model.encode_text(torch.from_numpy(tokens).to(self.device))
            return emb.float().cpu().numpy()


def causal_text(model) -> bool:
    """Whether the text tower's embedding of a caption depends on its tokens up to the end token only:
    open_clip's CLIP text tower, causal mask, pooled at the end token (argmax: the highest token id).
    Then a batch of captions can be cut after the longest one's end token (`cut_captions`) before the
    tower: the same embeddings for a fraction of the work (captions are 10 to 30 tokens of 77)."""
    import open_clip
    import torch

    mask = getattr(model, "attn_mask", None)
    if type(model) is not open_clip.model.CLIP or getattr(model, "text_pool_type", None) != "argmax" \
            or mask is None or mask.dim() != 2:
        return False
    return torch.equal(mask.float().cpu(), torch.full(mask.shape, float("-inf")).triu(1))


def cut_captions(tokens: np.ndarray) -> np.ndarray:
    """Token rows cut after the batch's last end token (the highest id of each row, as argmax pooling
    finds it); only padding goes."""
    return tokens[:, : int(tokens.argmax(-1).max()) + 1]


def encode_text_prefix(model, tokens):
    """open_clip's CLIP.encode_text for token rows of any length up to the context length (positional
    embedding and causal mask cut to it); for models where `causal_text` holds."""
    from open_clip.transformer import text_global_pool

    seq = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:seq].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:seq, :seq]))
    x = text_global_pool(x, tokens, "argmax")
    if model.text_projection is None:
        return x
    return model.text_projection(x) if callable(model.text_projection) else x @ model.text_projection


def is_checkpoint_path(pretrained: str) -> bool:
    """A file path rather than an open_clip tag ("openai", "laion2b_s34b_b79k", ...)."""
    return os.path.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES)


def local_weights(pretrained: str) -> str:
    """`pretrained` as this machine can open it: the path itself where it exists (the driver, a shared
    mount), else the copy the driver shipped with the job (`SparkContext.addFile`, by file name)."""
    if not pretrained or not is_checkpoint_path(pretrained) or os.path.exists(pretrained):
        return pretrained
    try:
        from pyspark import SparkFiles

        shipped = SparkFiles.get(os.path.basename(pretrained))
    except Exception:  # noqa: BLE001 - no Spark here, or no file shipped: say so below
        shipped = None
    if shipped and os.path.isfile(shipped):
        return shipped
    raise FileNotFoundError(f"CLIP checkpoint {pretrained} is not on this machine and was not shipped with the job "
                            "(resolve_weights on the driver ships it with SparkContext.addFile)")


def check_gpu_scheduling(stage: ClipScore, key: str, conf: dict[str, str], master: str) -> None:
    """On the driver: a `device: cuda` stage on a cluster needs Spark's GPU scheduling, or every task
    would use GPU 0 of its machine. Raises ClipConfigError naming the Spark keys to set (they must be
    given at submit time, e.g. `--conf spark.executor.resource.gpu.amount=1 --conf
    spark.task.resource.gpu.amount=0.25 --conf spark.executor.resource.gpu.discoveryScript=bin/gpu-discovery`)."""
    if not stage.device.startswith("cuda") or stage.backend != "torch":
        return
    from filters.clip_gpu import spark_gpu_settings

    missing, problems = spark_gpu_settings(conf, master)
    problems += [f"{k} is not set (e.g. {k}={v})" for k, v in missing.items()]
    if problems:
        raise ClipConfigError(f"{key}.device={stage.device} on {master}: " + "; ".join(problems))


def resolve_weights(stage: ClipScore, key: str = "image_text.clip",
                    ship: Callable[[str], None] | None = None, spark=None) -> tuple[ClipScore, bool, str]:
    """On the driver, before any Spark work: check GPU scheduling, fetch the weights, load them once,
    ship them.

    `key` is the stage's recipe section (for messages); `ship(path)` makes a local file readable by every
    executor (default with `spark`: its `SparkContext.addFile`); with `spark`, a cuda device is checked
    against its GPU scheduling settings (`check_gpu_scheduling`). Returns the stage to run (`pretrained` a
    local file, or "" for random weights), whether its weights are real, and a message for the log and
    the summary. Raises `ClipConfigError`, naming `{key}.pretrained`, what was tried and why it failed,
    when the weights cannot be loaded and `allow_random_weights` is false. `pretrained: ""` asks for
    random weights explicitly and never fails.
    """
    if spark is not None:
        sc = spark.sparkContext
        check_gpu_scheduling(stage, key, dict(sc.getConf().getAll()), sc.master)
        ship = ship or sc.addFile
    if stage.model not in known_models():
        raise ClipConfigError(f"{key}.model '{stage.model}' is not an open_clip model")
    if not stage.pretrained:
        msg = (f"{key}.pretrained is empty: RANDOM weights by request; scores are recorded but the "
               f"{stage.threshold} threshold is NOT applied")
        log.warning(msg)
        return stage, False, msg
    tried = (f"checkpoint file {stage.pretrained}" if is_checkpoint_path(stage.pretrained)
             else f"open_clip tag '{stage.pretrained}' for {stage.model}")
    try:
        path = _fetch(stage)
        _load(stage.model, path)
    except _Unavailable as e:
        if not stage.allow_random_weights:
            raise ClipConfigError(
                f"{key}.pretrained: cannot load CLIP weights: tried {tried}: {e}. Set {key}.pretrained to an "
                f"open_clip tag that can be downloaded (or is cached, with HF_HUB_OFFLINE=1) or to a checkpoint "
                f"file on the driver; '{key}.pretrained=' (empty) scores with random weights and applies no "
                f"threshold; {key}.allow_random_weights=true falls back to that instead of failing") from None
        return _random(stage, f"{key}.pretrained: tried {tried}: {e}")
    if ship is not None:
        ship(path)  # executors read it with SparkFiles.get when the path is not on their machine
    what = f"local checkpoint {path}" if path == stage.pretrained else f"{stage.model}/{stage.pretrained} from {path}"
    return dataclasses.replace(stage, pretrained=path), True, what


def known_models() -> list[str]:
    """open_clip's model names (`open_clip.list_models()`), read from the configs the package ships,
    without importing it: importing open_clip imports torch, torchvision (and through it torch._dynamo)
    and timm, ~8 CPU s and ~0.8 GB, which a driver that scores nothing itself (random weights, checked
    here) need not pay before its first Spark job."""
    spec = importlib.util.find_spec("open_clip")
    folders = [pathlib.Path(p, "model_configs") for p in (spec.submodule_search_locations or [])] if spec else []
    return sorted(f.stem for folder in folders for f in folder.glob("*.json"))


class _Unavailable(Exception):
    """Why the configured weights cannot be had (the message says it)."""


def _fetch(stage: ClipScore) -> str:
    """The configured weights as a local file on the driver."""
    import open_clip

    tag = stage.pretrained
    if is_checkpoint_path(tag):
        if tag.startswith(("s3://", "s3a://", "hdfs://", "http://", "https://")):
            raise _Unavailable("only local files are read (copy the checkpoint to the driver; it is shipped "
                               "to the executors)")
        if not os.path.isfile(tag):
            raise _Unavailable("the file does not exist" if not os.path.exists(tag) else "not a regular file")
        return tag
    cfg = open_clip.get_pretrained_cfg(stage.model, tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(stage.model)) or "none"
        raise _Unavailable(f"open_clip has no such tag for {stage.model} (known: {known})")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline and not _reachable("huggingface.co", 443):
        # the hub client would retry with back-off for about a minute before giving up
        raise _Unavailable("offline: huggingface.co is unreachable (set HF_HUB_OFFLINE=1 to use a cached copy)")
    try:
        path = open_clip.download_pretrained(cfg)
    except Exception as e:  # noqa: BLE001 - offline, not cached, hub refused, ...
        raise _Unavailable(f"download failed: {type(e).__name__}: {str(e)[:200]}") from None
    if not path:
        raise _Unavailable("open_clip has no download source for it")
    return path


def _load(model: str, path: str) -> None:
    """Load the weights once on the driver, so a corrupt or mismatched file fails here, not in every task."""
    import open_clip

    try:
        m = open_clip.create_model(model, pretrained=path, device="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - not a checkpoint, wrong architecture, truncated, ...
        raise _Unavailable(f"{path} could not be loaded as {model} weights: {type(e).__name__}: "
                           f"{str(e)[:300]}") from None
    del m


def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _random(stage: ClipScore, why: str) -> tuple[ClipScore, bool, str]:
    msg = (f"CLIP WEIGHTS UNAVAILABLE ({why}); allow_random_weights is set, so scoring with RANDOM weights: "
           f"scores are recorded but the {stage.threshold} threshold is NOT applied")
    log.warning(msg)
    return dataclasses.replace(stage, pretrained=""), False, msg
