"""CLIP image-text relevance (GLM-4.1V keeps pairs with cosine > 0.3).

Reads `image` (JPEG bytes) and `caption`; writes `clip_score` (cosine of the L2-normalised open_clip
embeddings). The model loads once per Python worker, with torch limited to the task's cores.
Weights: an open_clip pretrained tag (downloaded when online) or a local checkpoint file. When none
can be had, `resolve_weights` on the driver says so and the stage runs with seeded random weights:
scores are recorded but the pipeline does not apply the threshold (never drop data on noise).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from filters.base import Stage
from filters.media import column_bytes
from schemas import image_text as S

log = logging.getLogger(__name__)


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

    def adds(self) -> list[pa.Field]:
        return [pa.field(S.CLIP_SCORE, pa.float32())]

    def cache_key(self) -> Any:
        # the scores depend on the weights only: the threshold is applied later, batch size and
        # device do not change them
        return (self.model, self.pretrained, self.seed)

    def setup(self, threads: int) -> Any:
        import open_clip
        import torch

        torch.set_num_threads(threads)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        torch.manual_seed(self.seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.model, pretrained=self.pretrained or None, device=device, weights_only=False)
        model.eval()
        return model, preprocess, open_clip.get_tokenizer(self.model), device

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        import torch
        from PIL import Image

        model, preprocess, tokenizer, device = state
        images = column_bytes(batch, S.IMAGE)
        captions = batch.column(S.CAPTION).to_pylist()
        scores: list[float | None] = [None] * len(images)
        todo = [i for i, (im, cap) in enumerate(zip(images, captions)) if im is not None and cap]
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            pixels = []
            for i in idx:
                img = Image.open(io.BytesIO(images[i]))
                img.draft("RGB", (448, 448))  # JPEG DCT scaling: decode near the model's size, not full size
                pixels.append(preprocess(img.convert("RGB")))
            with torch.inference_mode():
                img_emb = model.encode_image(torch.stack(pixels).to(device))
                txt_emb = model.encode_text(tokenizer([captions[i] for i in idx]).to(device))
                img_emb = img_emb / img_emb.norm(dim=-1, keepdim=True)
                txt_emb = txt_emb / txt_emb.norm(dim=-1, keepdim=True)
                sims = (img_emb * txt_emb).sum(-1).float().cpu().numpy()
            for i, s in zip(idx, sims):
                scores[i] = float(np.round(s, 6))
        return {S.CLIP_SCORE: scores}


def resolve_weights(stage: ClipScore) -> tuple[ClipScore, bool, str]:
    """On the driver, before any Spark work: can real weights be had?

    Returns the stage to run (pretrained cleared when no weights can be had), whether its weights are
    real, and a message for the log and the summary.
    """
    import open_clip

    if stage.model not in open_clip.list_models():
        raise ValueError(f"clip.model '{stage.model}' is not an open_clip model")
    tag = stage.pretrained
    if not tag:
        return stage, False, "clip.pretrained is empty: random weights by request"
    if os.path.sep in tag or tag.endswith((".pt", ".bin", ".safetensors", ".pth")):
        if os.path.isfile(tag):
            return stage, True, f"local checkpoint {tag}"
        return _random(stage, f"checkpoint file {tag} does not exist")
    cfg = open_clip.get_pretrained_cfg(stage.model, tag)
    if not cfg:
        return _random(stage, f"open_clip has no pretrained tag '{tag}' for {stage.model}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline and not _reachable("huggingface.co", 443):
        # the hub client would retry with back-off for about a minute before giving up
        return _random(stage, "offline: huggingface.co is unreachable (set HF_HUB_OFFLINE=1 to use a cached copy)")
    try:
        path = open_clip.download_pretrained(cfg)
        if not path:
            return _random(stage, f"no download source for {stage.model}/{tag}")
    except Exception as e:  # noqa: BLE001 - offline, hub refused, ...: fall back, loudly
        return _random(stage, f"could not fetch {stage.model}/{tag}: {type(e).__name__}: {str(e)[:200]}")
    return dataclasses.replace(stage, pretrained=path), True, f"{stage.model}/{tag} from {path}"


def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _random(stage: ClipScore, why: str) -> tuple[ClipScore, bool, str]:
    msg = (f"CLIP WEIGHTS UNAVAILABLE ({why}); scoring with RANDOM weights: scores are recorded "
           f"but the {stage.threshold} threshold is NOT applied")
    log.warning(msg)
    return dataclasses.replace(stage, pretrained=""), False, msg
