"""Sequence packing: samples -> fixed-shape rows of max_len tokens, and what keeps the samples apart.

Each row holds whole samples back to back (next-fit, in stream order). A sample's tokens carry its segment
number (1, 2, ... within the row; 0 = padding), so the model's block-diagonal mask stops any token from
attending across samples, and its 3D-RoPE positions restart at 0. Labels are the next token inside the same
sample, only where that token is text: image placeholders and the tokens framing images and videos are
never targets. Image tokens do count toward the row length.

Next-fit keeps packing a pure function of the sample order, which is what makes resume exact: the state
between two batches is only "where the stream is" (see data.py). Rows are always max_len long, so every
batch has the same shape (no recompiles under torch.compile, no ragged all-reduce under DDP).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.formatters import Formatted
from trainer.images import merged_tokens
from trainer.model import rope_positions, vision_coords
from trainer.tokenizer import TextTokenizer

IGNORE = -100


@dataclass
class Prepared:
    """One sample ready to place in a row."""

    ids: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int64, IGNORE where no target
    positions: np.ndarray  # (3, n) int64
    images: list  # [(patches, grid)]
    kind: str

    def __len__(self) -> int:
        return len(self.ids)


def prepare(f: Formatted, tok: TextTokenizer, merge_size: int = 2) -> Prepared:
    ids = np.asarray(f.ids, dtype=np.int64)
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    nxt = ids[1:]
    is_target = ~np.isin(nxt, np.fromiter(tok.structural_ids, dtype=np.int64))
    labels[:-1][is_target] = nxt[is_target]
    grids = [g for _, g in f.images]
    return Prepared(ids, labels, rope_positions(ids, grids, tok.image_id, merge_size), f.images, f.kind)


def collate(rows: list[list[Prepared]], max_len: int, pad_id: int, image_token_id: int,
            merge_size: int = 2) -> dict:
    """Rows of samples -> the model's inputs as tensors, plus counts for the logs."""
    R = len(rows)
    input_ids = np.full((R, max_len), pad_id, dtype=np.int64)
    labels = np.full((R, max_len), IGNORE, dtype=np.int64)
    positions = np.zeros((3, R, max_len), dtype=np.int64)
    segments = np.zeros((R, max_len), dtype=np.int64)
    patches, grids = [], []
    n_samples, kinds = 0, {}
    for r, row in enumerate(rows):
        at = 0
        for seg, s in enumerate(row, start=1):
            n = len(s)
            if at + n > max_len:
                raise ValueError(f"row {r} overflows max_len {max_len}")
            input_ids[r, at:at + n] = s.ids
            labels[r, at:at + n] = s.labels
            positions[:, r, at:at + n] = s.positions
            segments[r, at:at + n] = seg
            for p, g in s.images:
                patches.append(p)
                grids.append(g)
            at += n
            n_samples += 1
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
    n_image_tokens = int((input_ids == image_token_id).sum())
    if n_image_tokens != sum(merged_tokens(g) for g in grids):
        raise AssertionError("image placeholders and image features disagree")  # a formatter bug, not data
    patch_pos, patch_hw = vision_coords(grids, merge_size)
    patch_dim = patches[0].shape[1] if patches else 0
    n_pad = int((segments == 0).sum())
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "segment_ids": torch.from_numpy(segments),
        "pixel_values": torch.from_numpy(np.concatenate(patches) if patches
                                         else np.zeros((0, patch_dim), np.float32)),
        "patch_pos": torch.from_numpy(patch_pos),
        "patch_hw": torch.from_numpy(patch_hw),
        "image_sizes": [g[0] * g[1] * g[2] for g in grids],
        "stats": {
            "samples": n_samples, "kinds": kinds, "tokens": R * max_len - n_pad, "pad": n_pad,
            "targets": int((labels != IGNORE).sum()), "image_tokens": n_image_tokens, "images": len(grids),
        },
    }


MODEL_INPUTS = ("input_ids", "position_ids", "segment_ids", "pixel_values", "patch_pos", "patch_hw",
                "image_sizes")


class Packer:
    """Pulls samples from `next_sample()` and emits batches of `rows` rows (next-fit packing).

    With pack=False every sample gets a row of its own (the baseline for the padding benchmark).
    `cursor()` is the stream position to restart from to get the very next batch: before the sample that
    is held over (it did not fit), or after the last sample used when none is held.
    """

    def __init__(self, next_sample, stream_cursor, rows: int, max_len: int, tok: TextTokenizer,
                 pack: bool = True, merge_size: int = 2):
        self.next_sample, self.stream_cursor = next_sample, stream_cursor
        self.rows, self.max_len, self.tok, self.pack, self.merge_size = rows, max_len, tok, pack, merge_size
        self.held: tuple[Prepared, object] | None = None

    def cursor(self):
        return self.held[1] if self.held is not None else self.stream_cursor()

    def _pull(self) -> Prepared:
        if self.held is None:
            before = self.stream_cursor()
            self.held = (prepare(self.next_sample(), self.tok, self.merge_size), before)
        return self.held[0]

    def next_batch(self) -> dict:
        out: list[list[Prepared]] = []
        row: list[Prepared] = []
        used = 0
        while len(out) < self.rows:
            s = self._pull()
            if row and used + len(s) > self.max_len:
                out.append(row)
                row, used = [], 0
                continue
            row.append(s)
            used += len(s)
            self.held = None
            if not self.pack or used == self.max_len:
                out.append(row)
                row, used = [], 0
        return collate(out, self.max_len, self.tok.pad_id, self.tok.image_id, self.merge_size)
