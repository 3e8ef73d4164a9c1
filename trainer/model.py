"""GLM-4.1V's architecture at toy scale: a native-resolution ViT, a 2x2 patch merger and a 3D-RoPE decoder.

- Vision: 14-pixel patches over a temporal patch of 2 frames (one linear layer, the same as GLM's Conv3d
  with stride = kernel), learned absolute positions interpolated bicubically to each image's grid, 2D-RoPE
  (half the rotary frequencies follow the patch row, half the column), pre-norm blocks with SwiGLU.
  Attention stays inside each image, so any number of images of any shape go through in one call.
- Merger: the four patches of each 2x2 group (contiguous by construction, see images.py) are concatenated,
  projected to the LM width and passed through an MLP projector.
- LM: decoder-only, RMSNorm, grouped-query attention, SwiGLU, 3D-RoPE: the rotary frequencies are split
  into (t, h, w) sections; text tokens have t = h = w (so it is 1D RoPE for text), image tokens their
  grid coordinates offset by the position where the image starts, and text after an image continues from
  the largest of them + 1 (as in GLM-4.1V / Qwen2-VL's get_rope_index).
- Packing: several samples share a row; a boolean block-diagonal causal mask keeps each token inside its
  own sample and positions restart at 0 for every sample.

Every size is a ModelConfig field. SDPA with a dense boolean mask is fine at toy scale; at 8k+ tokens a
varlen / flex-attention kernel would replace it without changing the interface.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    rope_theta: float = 10000.0
    # rotary frequency pairs given to (t, h, w); empty = GLM-4.1V's split [8, 12, 12] of 32, scaled
    mrope_section: list[int] = field(default_factory=list)
    norm_eps: float = 1e-5
    image_token_id: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    vision_hidden_size: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate_size: int = 344
    vision_pos_grid: int = 16  # side of the learned absolute position table, interpolated per image
    vision_rope_theta: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self):
        hd = self.head_dim
        if self.hidden_size % self.num_heads or hd % 2:
            raise ValueError("hidden_size must split into num_heads even-sized heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.vision_hidden_size % self.vision_heads or (self.vision_hidden_size // self.vision_heads) % 4:
            raise ValueError("vision head size must be a multiple of 4 (2D-RoPE splits it in h and w halves)")
        if not self.mrope_section:
            half = hd // 2
            t = half // 4
            self.mrope_section = [t, (half - t) // 2, half - t - (half - t) // 2]
        self.mrope_section = [int(s) for s in self.mrope_section]
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != hd // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must be 3 numbers summing to "
                             f"head_dim/2 = {hd // 2}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def to_dict(self) -> dict:
        return asdict(self)


# --- positions (numpy: computed in the data workers) ---------------------------------------------------

def rope_positions(ids: np.ndarray, grids: list[tuple[int, int, int]], image_token_id: int,
                   merge_size: int = 2) -> np.ndarray:
    """3D-RoPE positions (3, n) for one sample: rows t, h, w.

    Text: all three equal, counting up. An image block of merged grid (t, h, w) starting at position p
    gets (p + ti, p + hi, p + wi); the next text token takes p + max(t, h, w).
    """
    ids = np.asarray(ids)
    n = len(ids)
    pos = np.empty((3, n), dtype=np.int64)
    is_img = ids == image_token_id
    cur, i, k = 0, 0, 0
    while i < n:
        if is_img[i]:
            t, h, w = grids[k]
            h, w = h // merge_size, w // merge_size
            cnt = t * h * w
            pos[0, i:i + cnt] = cur + np.repeat(np.arange(t), h * w)
            pos[1, i:i + cnt] = cur + np.tile(np.repeat(np.arange(h), w), t)
            pos[2, i:i + cnt] = cur + np.tile(np.arange(w), t * h)
            cur += max(t, h, w)
            i += cnt
            k += 1
        else:
            nxt = np.flatnonzero(is_img[i:])
            j = i + int(nxt[0]) if len(nxt) else n
            pos[:, i:j] = cur + np.arange(j - i)
            cur += j - i
            i = j
    if k != len(grids):
        raise ValueError(f"{len(grids)} images but {k} image blocks in the token sequence")
    return pos


def vision_coords(grids: list[tuple[int, int, int]], merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per ViT patch, in patch order (t, h/2, w/2, 2, 2): its (row, col) and its image's (rows, cols)."""
    pos, size = [], []
    m = merge_size
    for t, h, w in grids:
        hb = np.arange(h // m)[:, None, None, None] * m + np.arange(m)[None, None, :, None]
        wb = np.arange(w // m)[None, :, None, None] * m + np.arange(m)[None, None, None, :]
        hh, ww = np.broadcast_arrays(hb, wb)
        one = np.stack([hh.reshape(-1), ww.reshape(-1)], axis=1)
        pos.append(np.tile(one, (t, 1)))
        size.append(np.tile(np.array([[h, w]]), (t * h * w, 1)))
    if not pos:
        return np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64)
    return np.concatenate(pos).astype(np.int64), np.concatenate(size).astype(np.int64)


def packed_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean: query i may attend key j iff same segment and j <= i (block-diagonal causal)."""
    L = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal).unsqueeze(1)


# --- building blocks -----------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 (the weight's dtype): stable under bf16 autocast and the fused kernel applies
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # in x's dtype: under bf16 autocast q and k must stay bf16 to meet v in attention
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


# --- vision --------------------------------------------------------------------------------------------

class VisionBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.vision_hidden_size
        self.heads = cfg.vision_heads
        self.norm1 = RMSNorm(d, cfg.norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=True)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = RMSNorm(d, cfg.norm_eps)
        self.mlp = SwiGLU(d, cfg.vision_intermediate_size)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  sizes: list[int]) -> torch.Tensor:
        n, d = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, d // self.heads).unbind(1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # heads, n, hd
        # one attention call per image: no patch sees another image, and memory stays linear in images
        out = [F.scaled_dot_product_attention(qi, ki, vi)
               for qi, ki, vi in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1))]
        return self.proj(torch.cat(out, dim=1).transpose(0, 1).reshape(n, d))

    def forward(self, x, cos, sin, sizes):
        x = x + self.attention(self.norm1(x), cos, sin, sizes)
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    """pixel patches (N, 3*2*14*14) -> one LM-width feature per 2x2 group (N/4, hidden_size)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.vision_hidden_size
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, d, bias=False)
        self.embed_norm = RMSNorm(d, cfg.norm_eps)
        self.pos_embed = nn.Parameter(torch.zeros(d, cfg.vision_pos_grid, cfg.vision_pos_grid))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vision_layers))
        self.post_norm = RMSNorm(d, cfg.norm_eps)
        m2 = cfg.merge_size ** 2
        self.downsample = nn.Linear(m2 * d, cfg.hidden_size, bias=False)  # = GLM's 2x2 stride-2 conv
        self.proj_norm = nn.LayerNorm(cfg.hidden_size)
        self.projector = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        hd = d // cfg.vision_heads
        rot = hd // 2
        inv_freq = 1.0 / cfg.vision_rope_theta ** (torch.arange(0, rot, 2).float() / rot)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, patch_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = patch_pos.float()[..., None] * self.inv_freq  # N, 2, hd/4
        f = f.flatten(1)  # N, hd/2: first half from rows, second from columns
        emb = torch.cat((f, f), dim=-1)[:, None, :]  # N, 1 (heads), hd
        return emb.cos(), emb.sin()

    def abs_pos(self, patch_pos: torch.Tensor, patch_hw: torch.Tensor) -> torch.Tensor:
        # sample the learned table at each patch's centre, in [-1, 1] of its own image: any resolution fits
        xy = (patch_pos.flip(-1).float() + 0.5) / patch_hw.flip(-1).float() * 2 - 1
        table = self.pos_embed.float()[None]
        out = F.grid_sample(table, xy[None, None], mode="bicubic", align_corners=False)
        return out[0, :, 0].t()

    def forward(self, pixels, patch_pos, patch_hw, sizes: list[int]) -> torch.Tensor:
        x = self.embed_norm(self.patch_embed(pixels))
        x = x + self.abs_pos(patch_pos, patch_hw).to(x.dtype)
        cos, sin = self.rope(patch_pos)
        for block in self.blocks:
            x = block(x, cos, sin, sizes)
        x = self.post_norm(x)
        x = x.reshape(-1, self.cfg.merge_size ** 2 * x.shape[-1])
        x = F.gelu(self.proj_norm(self.downsample(x)))
        return self.projector(x)


# --- language model ------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=True)
        self.kv = nn.Linear(cfg.hidden_size, 2 * self.nkv * self.hd, bias=True)
        self.o = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.nh, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(B, L, 2, self.nkv, self.hd).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nh != self.nkv)
        return self.o(y.transpose(1, 2).reshape(B, L, self.nh * self.hd))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        hd = cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm scales
                nn.init.ones_(p)
            elif name.endswith(("o.weight", "down.weight", "proj.weight")):
                # residual-branch outputs: scaled so the residual stream does not grow with depth
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.num_layers))
            else:
                nn.init.normal_(p, std=std)

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (3, B, L) -> cos, sin (B, 1, L, head_dim) with the (t, h, w) frequency sections."""
        f = position_ids.float()[..., None] * self.inv_freq  # 3, B, L, hd/2
        parts = f.split(self.cfg.mrope_section, dim=-1)
        f = torch.cat([parts[axis][axis] for axis in range(3)], dim=-1)  # B, L, hd/2
        emb = torch.cat((f, f), dim=-1)[:, None]
        return emb.cos(), emb.sin()

    def forward(self, input_ids, position_ids, segment_ids, pixel_values, patch_pos, patch_hw,
                image_sizes: list[int], labels=None):
        """Returns logits (B, L, V) without labels, else (summed loss over label != -100, count)."""
        h = self.embed(input_ids)
        if pixel_values.shape[0]:
            feats = self.vision(pixel_values.to(h.dtype), patch_pos, patch_hw, image_sizes)
            h = h.masked_scatter((input_ids == self.cfg.image_token_id)[..., None], feats.to(h.dtype))
        else:
            # a batch without images still touches the vision weights, so DDP finds a gradient for each
            h = h + 0.0 * sum(p.reshape(-1)[0] for p in self.vision.parameters())
        cos, sin = self.rope(position_ids)
        mask = packed_mask(segment_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        h = self.norm(h)
        if labels is None:
            return self.lm_head(h)
        keep = labels != -100
        logits = self.lm_head(h[keep]).float()  # only where there is a target: saves the full (B, L, V)
        return F.cross_entropy(logits, labels[keep], reduction="sum"), keep.sum()

    def num_params(self) -> dict[str, int]:
        vision = sum(p.numel() for p in self.vision.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "vision": vision, "language": total - vision}
