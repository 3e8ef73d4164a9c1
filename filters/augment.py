"""Nougat-style document augmentations (erosion or dilation, Gaussian noise, blur, JPEG compression,
small rotations), for the synthetic and academic OCR branches.

Deterministic: `augment(img, boxes, seed, cfg)` draws every choice from `random.Random(seed)` and
returns the record (`{"seed", "ops": [{"op", ...parameters}]}`) that the sample's json carries, so
the same seed gives the same pixels. A rotation moves the line boxes with the text (each box becomes
the bounding box of its rotated corners, clipped to the image).
"""
from __future__ import annotations

import dataclasses
import io
import math
import random

import numpy as np
from PIL import Image, ImageFilter


@dataclasses.dataclass(frozen=True)
class Augment:
    """The recipe's `ocr.augment`: `probability` that a sample is augmented at all; then each op with its own."""

    probability: float = 0.5
    erosion: float = 0.15  # MinFilter(3) (thicker dark strokes) or MaxFilter(3) (thinner), half each
    noise: float = 0.3  # Gaussian noise, sigma in noise_sigma
    noise_sigma: tuple[float, float] = (2.0, 8.0)
    blur: float = 0.3  # Gaussian blur, radius in blur_radius
    blur_radius: tuple[float, float] = (0.3, 0.9)
    jpeg: float = 0.3  # a JPEG round trip at a quality in jpeg_quality
    jpeg_quality: tuple[int, int] = (40, 90)
    rotation: float = 0.3  # a rotation of up to max_rotation degrees either way
    max_rotation: float = 2.0


def rotate_point(x: float, y: float, cx: float, cy: float, degrees: float) -> tuple[float, float]:
    """Where PIL's `rotate(degrees)` (counter-clockwise, about the centre) moves pixel (x, y)."""
    a = math.radians(degrees)
    dx, dy = x - cx, y - cy
    return cx + dx * math.cos(a) + dy * math.sin(a), cy - dx * math.sin(a) + dy * math.cos(a)


def augment(img: Image.Image, boxes: list[tuple[float, float, float, float]], seed: int,
            cfg: Augment) -> tuple[Image.Image, list[tuple[float, float, float, float]], dict | None]:
    """(image, boxes in pixels, record or None when nothing was applied)."""
    rng = random.Random(seed)
    if rng.random() >= cfg.probability:
        return img, boxes, None
    ops: list[dict] = []
    img = img.convert("RGB")
    if rng.random() < cfg.rotation:
        deg = round(rng.uniform(-cfg.max_rotation, cfg.max_rotation), 2)
        fill = tuple(int(v) for v in np.asarray(img)[[0, 0, -1, -1], [0, -1, 0, -1]].mean(axis=0))
        w, h = img.size
        img = img.rotate(deg, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=fill)
        cx, cy = w / 2, h / 2
        moved = []
        for x1, y1, x2, y2 in boxes:
            pts = [rotate_point(x, y, cx, cy, deg) for x, y in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            moved.append((max(0.0, min(xs)), max(0.0, min(ys)), min(float(w), max(xs)), min(float(h), max(ys))))
        boxes = moved
        ops.append({"op": "rotate", "degrees": deg})
    if rng.random() < cfg.erosion:
        kind = rng.choice(("erode", "dilate"))
        img = img.filter(ImageFilter.MinFilter(3) if kind == "erode" else ImageFilter.MaxFilter(3))
        ops.append({"op": kind, "size": 3})
    if rng.random() < cfg.blur:
        radius = round(rng.uniform(*cfg.blur_radius), 2)
        img = img.filter(ImageFilter.GaussianBlur(radius))
        ops.append({"op": "blur", "radius": radius})
    if rng.random() < cfg.noise:
        sigma = round(rng.uniform(*cfg.noise_sigma), 2)
        noise = np.random.default_rng(seed).normal(0.0, sigma, (img.height, img.width, 1))
        arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        ops.append({"op": "noise", "sigma": sigma})
    if rng.random() < cfg.jpeg:
        quality = rng.randint(*cfg.jpeg_quality)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        ops.append({"op": "jpeg", "quality": quality})
    if not ops:
        return img, boxes, None
    return img, boxes, {"seed": seed, "ops": ops}
