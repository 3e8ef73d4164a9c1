"""Image processing as GLM-4.1V's: 28-pixel multiples in the pixel budget, a duplicated frame, merge order."""
from __future__ import annotations

import numpy as np
import pytest

from trainer.images import CLIP_MEAN, CLIP_STD, ImageConfig, merged_tokens, smart_resize, to_patches
from trainer.model import vision_coords

CFG = ImageConfig(min_pixels=16 * 784, max_pixels=64 * 784)


@pytest.mark.parametrize("h,w", [(64, 64), (200, 90), (90, 240), (1000, 1000), (480, 640), (30, 5000),
                                 (5000, 27)])
def test_smart_resize_multiples_of_28_within_budget(h, w):
    rh, rw = smart_resize(h, w, CFG)
    assert rh % 28 == 0 and rw % 28 == 0
    assert CFG.min_pixels <= rh * rw <= CFG.max_pixels
    if max(h, w) / min(h, w) < 3:  # the aspect ratio survives (up to the 28-pixel rounding)
        assert abs(np.log((rh / rw) / (h / w))) < 0.35


def test_smart_resize_rejects_aspect_ratio_of_200():
    with pytest.raises(ValueError, match="aspect"):
        smart_resize(10, 2000, CFG)
    assert smart_resize(28, 28 * 199, ImageConfig(max_pixels=6144 * 784)) == (28, 28 * 199)


def test_smart_resize_keeps_an_image_already_on_the_grid():
    assert smart_resize(224, 168, CFG) == (224, 168)


def test_single_image_is_duplicated_to_fill_the_temporal_patch():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, size=(56, 84, 3), dtype=np.uint8)
    patches, grid = to_patches([frame], CFG)
    assert grid == (1, 4, 6)
    assert patches.shape == (24, 3 * 2 * 14 * 14)
    per = patches.reshape(24, 3, 2, 14, 14)
    np.testing.assert_array_equal(per[:, :, 0], per[:, :, 1])
    assert merged_tokens(grid) == 6


def test_patch_order_puts_each_2x2_merge_group_together():
    # give every pixel its own (row, col) so each patch says where it came from
    H, W = 56, 84
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    frame = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)
    patches, grid = to_patches([frame], CFG)
    per = patches.reshape(-1, 3, 2, 14, 14)
    # undo the normalisation of channel 0 (rows) and 1 (cols), read the top-left pixel of each patch
    top_row = np.rint((per[:, 0, 0, 0, 0] * CLIP_STD[0] + CLIP_MEAN[0]) * 255).astype(int)
    left_col = np.rint((per[:, 1, 0, 0, 0] * CLIP_STD[1] + CLIP_MEAN[1]) * 255).astype(int)
    pos, size = vision_coords([grid])
    np.testing.assert_array_equal(top_row, pos[:, 0] * 14)
    np.testing.assert_array_equal(left_col, pos[:, 1] * 14)
    np.testing.assert_array_equal(size, np.tile([[4, 6]], (24, 1)))
    # the first four patches form the top-left 2x2 group
    assert [tuple(p) for p in pos[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
