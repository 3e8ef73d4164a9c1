"""The model on CPU: shapes through forward and backward, 3D-RoPE positions, packing isolation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer import formatters
from trainer.formatters import FormatContext
from trainer.images import ImageConfig
from trainer.model import VisionLanguageModel, rope_positions
from trainer.packing import IGNORE, MODEL_INPUTS, collate, prepare

IMG = ImageConfig(min_pixels=4 * 784, max_pixels=16 * 784)


def samples(tok, idx, corpus, max_len=96):
    ctx = FormatContext(tok, IMG, max_len)
    return [prepare(formatters.get("image_text").format(corpus.image_text(i), ctx), tok) for i in idx]


def batch_of(rows, tok, max_len=96):
    return collate(rows, max_len, tok.pad_id, tok.image_id)


def inputs(b):
    return {k: b[k] for k in MODEL_INPUTS}


def test_forward_and_backward_shapes(tok, tiny_config, corpus):
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config)
    s = samples(tok, [0, 1, 2, 3], corpus)
    b = batch_of([[s[0], s[1]], [s[2], s[3]]], tok)
    logits = model(**inputs(b))
    assert logits.shape == (2, 96, tiny_config.vocab_size)
    loss_sum, n = model(**inputs(b), labels=b["labels"])
    assert loss_sum.shape == () and int(n) == b["stats"]["targets"] > 0
    (loss_sum / n).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.vision.patch_embed.weight.grad.abs().sum() > 0  # the image reached the loss


def test_a_batch_without_images_still_gives_every_weight_a_gradient(tok, tiny_config):
    # DDP needs a gradient for every parameter on every rank, even when a batch holds only text
    model = VisionLanguageModel(tiny_config)
    ids = np.array(tok.encode("a red circle on a blue background") + [tok.eos_id])
    from trainer.packing import Prepared

    labels = np.full(len(ids), IGNORE)
    labels[:-1] = ids[1:]
    p = Prepared(ids, labels, rope_positions(ids, [], tok.image_id), [], "text")
    b = batch_of([[p]], tok, 32)
    loss_sum, _ = model(**inputs(b), labels=b["labels"])
    loss_sum.backward()
    assert all(p.grad is not None for p in model.vision.parameters())


def test_rope_positions_for_an_image_then_text(tok):
    # text "x y", then an image of 4x6 patches (2x3 after the merge), then text
    boi, img, eoi = tok.begin_image_id, tok.image_id, tok.end_image_id
    ids = [50, 51, boi] + [img] * 6 + [eoi, 60, 61]
    pos = rope_positions(np.array(ids), [(1, 4, 6)], img)
    assert pos.shape == (3, len(ids))
    # text: t = h = w, counting from 0; <|begin_of_image|> is text too
    np.testing.assert_array_equal(pos[:, :3], [[0, 1, 2]] * 3)
    # image starts at 3: t stays 3, h = 3 + row, w = 3 + column
    np.testing.assert_array_equal(pos[0, 3:9], [3] * 6)
    np.testing.assert_array_equal(pos[1, 3:9], [3, 3, 3, 4, 4, 4])
    np.testing.assert_array_equal(pos[2, 3:9], [3, 4, 5, 3, 4, 5])
    # text after the image continues at start + max(t, h, w) = 3 + 3
    np.testing.assert_array_equal(pos[:, 9:], [[6, 7, 8]] * 3)


def test_3d_rope_on_text_is_plain_1d_rope(tiny_config):
    model = VisionLanguageModel(tiny_config)
    L = 10
    pos = torch.arange(L).repeat(3, 1, 1)  # 3, B=1, L
    cos, sin = model.rope(pos)
    hd = tiny_config.head_dim
    inv = 1.0 / tiny_config.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    f = torch.arange(L).float()[:, None] * inv
    emb = torch.cat((f, f), -1)
    torch.testing.assert_close(cos[0, 0], emb.cos())
    torch.testing.assert_close(sin[0, 0], emb.sin())


def test_image_sections_follow_height_and_width(tiny_config):
    # for one image token, the t section rotates by t, the h section by h, the w section by w
    model = VisionLanguageModel(tiny_config)
    pos = torch.tensor([2, 5, 7]).view(3, 1, 1)
    cos, _ = model.rope(pos)
    st, sh, _ = tiny_config.mrope_section
    hd = tiny_config.head_dim
    inv = 1.0 / tiny_config.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    want = torch.cat([2 * inv[:st], 5 * inv[st:st + sh], 7 * inv[st + sh:]])
    torch.testing.assert_close(cos[0, 0, 0, :hd // 2], want.cos())


def test_packing_isolation(tok, tiny_config, corpus):
    """Changing one packed sample (text and image) leaves every other sample's logits unchanged."""
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config).eval()
    s = samples(tok, [0, 1, 2, 3, 4], corpus)
    other = samples(tok, [9], corpus)[0]  # a different caption and a different image, same length or not
    rows_a = [[s[0], s[1], s[2]], [s[3], s[4]]]
    rows_b = [[s[0], other, s[2]], [s[3], s[4]]]
    ba, bb = batch_of(rows_a, tok), batch_of(rows_b, tok)
    with torch.no_grad():
        la, lb = model(**inputs(ba)), model(**inputs(bb))

    def span(rows, r, k):
        start = sum(len(x) for x in rows[r][:k])
        return slice(start, start + len(rows[r][k]))

    for r, k in [(0, 0), (1, 0), (1, 1)]:  # samples before the change, and in the other row
        torch.testing.assert_close(la[r, span(rows_a, r, k)], lb[r, span(rows_b, r, k)], rtol=0, atol=1e-5)
    # the sample after the changed one moved (when lengths differ) but must compute the same
    torch.testing.assert_close(la[0, span(rows_a, 0, 2)], lb[0, span(rows_b, 0, 2)], rtol=0, atol=1e-5)
    # and the change itself is visible
    assert not torch.allclose(la[0, span(rows_a, 0, 1)][:4], lb[0, span(rows_b, 0, 1)][:4])


def test_packed_equals_alone(tok, tiny_config, corpus):
    """A sample computes the same logits packed with others as alone in its row."""
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config).eval()
    s = samples(tok, [0, 1], corpus)
    with torch.no_grad():
        packed = model(**inputs(batch_of([[s[0], s[1]]], tok)))
        alone = model(**inputs(batch_of([[s[1]]], tok)))
    n0, n1 = len(s[0]), len(s[1])
    torch.testing.assert_close(packed[0, n0:n0 + n1], alone[0, :n1], rtol=0, atol=1e-5)


def test_labels_are_text_only_and_stay_inside_each_sample(tok, corpus):
    s = samples(tok, [0, 1], corpus)
    b = batch_of([[s[0], s[1]]], tok)
    ids, labels, seg = b["input_ids"][0], b["labels"][0], b["segment_ids"][0]
    structural = torch.tensor(sorted(tok.structural_ids))
    targets = labels[labels != IGNORE]
    assert not torch.isin(targets, structural).any()
    n0 = len(s[0])
    assert labels[n0 - 1] == IGNORE  # the last token of sample 1 does not predict sample 2's first
    assert (labels[seg == 0] == IGNORE).all()  # padding
    # each label is the next token of the same sample
    where = (labels != IGNORE).nonzero().flatten()
    torch.testing.assert_close(labels[where], ids[where + 1])
    assert (seg[where] == seg[where + 1]).all()
    # positions restart for the second sample
    assert b["position_ids"][:, 0, n0].tolist() == [0, 0, 0]


def test_config_validates_sizes():
    from trainer.model import ModelConfig

    with pytest.raises(ValueError):
        ModelConfig(hidden_size=60, num_heads=4, mrope_section=[1, 1, 1])
    with pytest.raises(ValueError):
        ModelConfig(vision_hidden_size=24, vision_heads=4)


def test_bf16_autocast_forward_and_backward(tok, tiny_config, corpus):
    # the GPU path runs under bf16 autocast; the CPU autocast checks that the dtypes meet in attention
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config)
    s = samples(tok, [0, 1, 2], corpus)
    b = batch_of([[s[0], s[1]], [s[2]]], tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, n = model(**inputs(b), labels=b["labels"])
    assert torch.isfinite(loss_sum)
    (loss_sum / n).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
