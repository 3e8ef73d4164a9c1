"""Knowledge density of an image: charts, scientific figures, schematics, diagrams and maps score high,
photographs low (GLM-4.1V favours "high knowledge density" images in interleaved data).

A logistic regression over cheap image statistics of a 128-px thumbnail (share of near-white pixels,
colour count, share of the five commonest colours, edge and flat-area shares, mean saturation, grey
entropy), trained by `benchmarks/interleaved_knowledge_train.py` on figures it makes offline (matplotlib
charts, graphviz diagrams) against photographs shipped in packages (scikit-image, matplotlib), and shipped
as `filters/knowledge_weights.json` (its held-out accuracy on real figures and photos is in that file).

Reads `image` (bytes or its spooled reference); writes `knowledge_score` in [0, 1].
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from filters.base import Stage
from filters.media import column_bytes

KNOWLEDGE_SCORE = "knowledge_score"
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "knowledge_weights.json")
FEATURES = ("white", "colours", "top5", "edges", "flat", "saturation", "entropy")


def image_features(img) -> np.ndarray:
    """The FEATURES of a PIL image."""
    from PIL import Image

    img = img.convert("RGB")
    img.thumbnail((128, 128), Image.Resampling.BILINEAR)
    rgb = np.asarray(img, dtype=np.int32)
    grey = rgb.mean(axis=2)
    white = float((rgb.min(axis=2) > 235).mean())
    q = (rgb >> 4).reshape(-1, 3)
    codes = q[:, 0] * 256 + q[:, 1] * 16 + q[:, 2]
    counts = np.bincount(codes, minlength=4096)
    colours = float(np.log1p((counts > 0).sum()) / np.log(4097))
    top5 = float(np.sort(counts)[-5:].sum() / max(1, codes.size))
    gx, gy = np.abs(np.diff(grey, axis=1)), np.abs(np.diff(grey, axis=0))
    grad = np.concatenate([gx.ravel(), gy.ravel()])
    edges = float((grad > 40).mean())
    flat = float((grad < 2).mean())
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    saturation = float(np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0).mean())
    hist = np.bincount(grey.astype(np.int32).ravel(), minlength=256) / max(1, grey.size)
    entropy = float(-(hist[hist > 0] * np.log2(hist[hist > 0])).sum() / 8)
    return np.array([white, colours, top5, edges, flat, saturation, entropy], dtype=np.float64)


def load_weights(path: str = WEIGHTS) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def score(features: np.ndarray, weights: dict) -> float:
    z = (features - np.array(weights["mean"])) / np.array(weights["std"])
    return float(1.0 / (1.0 + np.exp(-(z @ np.array(weights["coef"]) + weights["bias"]))))


@dataclasses.dataclass(frozen=True)
class KnowledgeScore(Stage):
    name: ClassVar[str] = "knowledge"
    weights: str = ""  # a weights JSON; "": the shipped filters/knowledge_weights.json

    def adds(self) -> list[pa.Field]:
        return [pa.field(KNOWLEDGE_SCORE, pa.float32())]

    def setup(self, threads: int) -> Any:
        return load_weights(self.weights or WEIGHTS)

    def process(self, batch: pa.RecordBatch, state: Any) -> dict[str, list]:
        from PIL import Image

        out = []
        for data in column_bytes(batch, "image"):
            if data is None:
                out.append(None)
                continue
            try:
                out.append(score(image_features(Image.open(io.BytesIO(data))), state))
            except Exception:  # noqa: BLE001 - an image decode passed but this cannot read: no score
                out.append(None)
        return {KNOWLEDGE_SCORE: out}
