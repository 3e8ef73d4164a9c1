"""CLIP embeddings of a clip for dedup's second tier: the video embedding (the mean of its frames'
L2-normalised CLIP image embeddings, normalised again) and its caption's text embedding.

Reads `frames` (or `frames_ref`), `frame_sizes` and `caption`; writes `video_embedding` and
`text_embedding` (float32 lists; the text one null without a caption). The model is the image_text
CLIP stage's (`filters.clip.ClipScore`: same weights, same loader, loaded once per worker); frames are
subsampled to at most `max_frames` evenly spaced ones (embedding 600 frames per clip would cost more
than the whole rest of the clip's path).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from filters.base import Stage
from filters.clip import ClipScore, normalise
from filters.media import column_bytes
from schemas import video as S

VIDEO_EMBEDDING, TEXT_EMBEDDING = "video_embedding", "text_embedding"


@dataclasses.dataclass(frozen=True)
class ClipEmbed(Stage):
    name: ClassVar[str] = "video_embed"
    clip: ClipScore = ClipScore()
    max_frames: int = 8

    def adds(self) -> list[pa.Field]:
        return [pa.field(VIDEO_EMBEDDING, pa.list_(pa.float32())), pa.field(TEXT_EMBEDDING, pa.list_(pa.float32()))]

    def cache_key(self) -> Any:
        return (self.clip.cache_key(), self.max_frames)

    def setup(self, threads: int) -> Any:
        return self.clip.state(threads)

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        import torch
        from PIL import Image

        encoder, preprocess, tokenizer = state  # filters.clip's encoder: numpy in, numpy out, any backend
        blobs = column_bytes(batch, S.FRAMES)
        sizes = batch.column(S.FRAME_SIZES).to_pylist()
        captions = batch.column(S.CAPTION).to_pylist()
        videos: list[list[float] | None] = []
        texts: list[list[float] | None] = [None] * len(captions)
        for blob, frame_sizes in zip(blobs, sizes):
            if blob is None or not frame_sizes:
                videos.append(None)
                continue
            offsets = [sum(frame_sizes[:i]) for i in range(len(frame_sizes))]
            n = len(frame_sizes)
            picks = sorted({round(k * (n - 1) / max(1, self.max_frames - 1)) for k in range(min(n, self.max_frames))})
            pixels = [preprocess(Image.open(io.BytesIO(blob[offsets[i]:offsets[i] + frame_sizes[i]])).convert("RGB"))
                      for i in picks]
            with torch.inference_mode():
                mean = normalise(encoder.encode_image(torch.stack(pixels).numpy())).mean(0)
            videos.append((mean / np.linalg.norm(mean)).tolist())
        todo = [i for i, c in enumerate(captions) if c]
        if todo:
            with torch.inference_mode():
                emb = normalise(encoder.encode_text(tokenizer([captions[i] for i in todo]).numpy()))
            for i, row in zip(todo, emb.tolist()):
                texts[i] = row
        return {VIDEO_EMBEDDING: videos, TEXT_EMBEDDING: texts}
