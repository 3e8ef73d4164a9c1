"""Image processing as GLM-4.1V's processor does it: resize to multiples of 28, patchify in merge order.

One LLM token stands for 28x28 pixels: the ViT cuts 14-pixel patches, two frames form a temporal patch
(a still image is duplicated to fill it) and a 2x2 merge joins four neighbouring patches. Patches are laid
out so that each 2x2 merge group is contiguous, which lets the merger be a plain reshape.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# GLM-4.1V normalises with the OpenAI CLIP statistics (its ViT starts from AIMv2, trained with them).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class ImageConfig:
    """Resize and patch geometry. Pixel budgets are per frame; tokens = pixels / (28*28)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 16 * 28 * 28  # 112*112, the real model's floor
    max_pixels: int = 64 * 28 * 28  # toy default; the real model allows 6,144 tokens
    max_aspect_ratio: float = 200.0

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


def smart_resize(height: int, width: int, cfg: ImageConfig = ImageConfig()) -> tuple[int, int]:
    """(height, width) rounded to multiples of 28 with min_pixels <= h*w <= max_pixels, aspect kept.

    Raises ValueError for an aspect ratio at or above cfg.max_aspect_ratio (the model's limit is 200:1).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"empty image {width}x{height}")
    if max(height, width) / min(height, width) >= cfg.max_aspect_ratio:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"aspect ratio {ratio:.1f} >= {cfg.max_aspect_ratio}")
    f = cfg.factor
    # a side thinner than one merged patch: scale up, keeping the aspect (as the processor does)
    if height < f:
        width, height = round(width * f / height), f
    if width < f:
        height, width = round(height * f / width), f
    h_bar = max(f, round(height / f) * f)
    w_bar = max(f, round(width / f) * f)
    if h_bar * w_bar > cfg.max_pixels:
        beta = math.sqrt(height * width / cfg.max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
        # a very long, thin image hits the 28-pixel floor on its short side: take the excess off the long one
        if h_bar * w_bar > cfg.max_pixels:
            if h_bar == f:
                w_bar = max(f, cfg.max_pixels // (f * f) * f)
            else:
                h_bar = max(f, cfg.max_pixels // (f * f) * f)
    elif h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return h_bar, w_bar


def decode_resized(data: bytes, size: tuple[int, int] | None = None,
                   cfg: ImageConfig = ImageConfig()) -> np.ndarray:
    """Encoded image -> RGB uint8 array (H, W, 3) at `size` (h, w), or at smart_resize of its own size."""
    img = Image.open(io.BytesIO(data))
    h, w = size if size is not None else smart_resize(img.height, img.width, cfg)
    # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT: a large photo shrunk to a few
    # hundred pixels decodes several times faster. It never goes below the requested size.
    img.draft("RGB", (w, h))
    img = img.convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def to_patches(frames: list[np.ndarray],
               cfg: ImageConfig = ImageConfig()) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Frames (each H, W, 3 uint8, same size) -> (patches (t*h*w, 3*2*14*14) float32, grid (t, h, w)).

    Grid counts ViT patches. A single frame is duplicated to fill the temporal patch; an odd count repeats
    the last frame. Patch order is (t, h/2, w/2, 2, 2): each 2x2 merge group is contiguous.
    """
    if not frames:
        raise ValueError("no frames")
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if len(frames) % tp:
        frames = list(frames) + [frames[-1]] * (tp - len(frames) % tp)
    x = np.stack(frames).astype(np.float32) / 255.0
    x = (x - CLIP_MEAN) / CLIP_STD
    x = x.transpose(0, 3, 1, 2)  # T, C, H, W
    T, C, H, W = x.shape
    if H % (p * m) or W % (p * m):
        raise ValueError(f"frame {W}x{H} is not a multiple of {p * m}")
    gt, gh, gw = T // tp, H // p, W // p
    x = x.reshape(gt, tp, C, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, C * tp * p * p)), (gt, gh, gw)


def image_patches(data: bytes, cfg: ImageConfig = ImageConfig()) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One encoded still image -> its patches and grid (1, h, w)."""
    return to_patches([decode_resized(data, None, cfg)], cfg)


def merged_tokens(grid: tuple[int, int, int], cfg: ImageConfig = ImageConfig()) -> int:
    """How many LLM tokens an image of this patch grid becomes after the 2x2 merge."""
    t, h, w = grid
    return t * h * w // (cfg.merge_size ** 2)
