"""2D rotary position embedding on the AR model's group grid (spec §2.1).

Sequence element s >= 1 sits at row (s-1) // g, column (s-1) % g. The head dimension is split in
half: the first half's interleaved pairs rotate with the row index, the second half's with the column
index, both with frequencies base^(-2k / (head_dim/2)).

Faithful quirk (LlamaGen/DetailFlow): the class token (s = 0) gets cos = sin = 0, which zeroes its
query and key, so every attention score involving the class token's key is exactly 0. We keep it so
that weights trained with the released code would behave the same here.
"""

from __future__ import annotations

import torch


def rope_2d_tables(seq_len: int, group_size: int, head_dim: int, base: float = 10000.0,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each seq_len x head_dim/2 in float32; row 0 (class token) is all zeros."""
    if head_dim % 4:
        raise ValueError(f"head_dim={head_dim} must be divisible by 4 for 2D RoPE")
    half = head_dim // 2
    freqs = base ** (-torch.arange(0, half, 2, dtype=torch.float64, device=device) / half)  # half/2 values
    s = torch.arange(1, seq_len, dtype=torch.float64, device=device)
    rows, cols = torch.div(s - 1, group_size, rounding_mode="floor"), torch.remainder(s - 1, group_size)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)  # (seq_len-1) x half
    cos = torch.cat([torch.zeros(1, half, dtype=torch.float64, device=device), angles.cos()])
    sin = torch.cat([torch.zeros(1, half, dtype=torch.float64, device=device), angles.sin()])
    return cos.float(), sin.float()


def apply_rope(x_BHLD: torch.Tensor, cos_LP: torch.Tensor, sin_LP: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the given angles; computed in float32."""
    x = x_BHLD.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack([x0 * cos_LP - x1 * sin_LP, x1 * cos_LP + x0 * sin_LP], dim=-1)
    return out.flatten(-2).type_as(x_BHLD)
