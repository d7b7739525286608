"""Pre-LN ViT building blocks shared by the tokenizer encoder/decoder and the frozen feature nets.

Attention goes through torch SDPA; a boolean mask (True = may attend) or an additive float mask
of shape L x L (or B x 1 x L x L) is passed straight to it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

LN_EPS = 1e-6  # SigLIP blocks use eps 1e-6 (spec §1.2)


def _init_recursive(module: nn.Module, init_weight) -> None:
    """init_weight on every Linear weight, zero biases, unit LayerNorms (applied recursively)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            init_weight(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_linear(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal Linear weights (std 0.02 by default), zero biases, unit LayerNorms."""
    _init_recursive(module, lambda w: nn.init.trunc_normal_(w, std=std))


def init_siglip(module: nn.Module) -> None:
    """SigLIP's random init: xavier-uniform Linear weights, zero biases, unit LayerNorms.
    Width-aware on purpose: a fixed std of 0.02 suits widths near 1152, but at width 64 it
    gives near-uniform attention and a residual stream where image content is swamped by the latent
    queries/positions, so every latent slot quantises to one per-position code whatever the image."""
    _init_recursive(module, nn.init.xavier_uniform_)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLD: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x_BLD), "b l (s h d) -> s b h l d", s=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class Block(nn.Module):
    """x + Attn(LN(x)); x + MLP(LN(x)) with a gelu-tanh MLP (SigLIP style)."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.fc1 = nn.Linear(width, mlp)
        self.fc2 = nn.Linear(mlp, width)

    def forward(self, x_BLD: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x_BLD = x_BLD + self.attn(self.norm1(x_BLD), mask)
        return x_BLD + self.fc2(F.gelu(self.fc1(self.norm2(x_BLD)), approximate="tanh"))


class Transformer(nn.Module):
    """A stack of blocks followed by a final LayerNorm applied to every token."""

    def __init__(self, width: int, depth: int, heads: int, mlp: int):
        super().__init__()
        self.blocks = nn.ModuleList([Block(width, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=LN_EPS)

    def forward(self, x_BLD: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.blocks:
            x_BLD = blk(x_BLD, mask)
        return self.norm(x_BLD)


def resize_pos_2d(table_HWD: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Resize a learned H x W x D position table to h x w (bilinear, antialias) -> (h*w) x D."""
    if table_HWD.shape[:2] != (h, w):
        grid = rearrange(table_HWD, "h w d -> 1 d h w")
        grid = F.interpolate(grid.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        table_HWD = rearrange(grid, "1 d h w -> h w d").to(table_HWD.dtype)
    return rearrange(table_HWD, "h w d -> (h w) d")


def patchify(img_BCHW: torch.Tensor, patch: int) -> torch.Tensor:
    """B x C x H x W -> B x (H/p * W/p) x (p*p*C), pixel order inside a patch: row, column, channel."""
    return rearrange(img_BCHW, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch)


def unpatchify(x_BLP: torch.Tensor, patch: int, side: int, channels: int = 3) -> torch.Tensor:
    """Inverse of patchify for a square side x side grid of patches."""
    return rearrange(
        x_BLP, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=side, w=side, p1=patch, p2=patch, c=channels
    )
