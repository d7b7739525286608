"""Codes -> pixels for serving and evaluation (spec §3.9): full images and coarse prefix previews.

Usage:
    from detailflow.models.generator import codes_to_uint8, prefix_previews
    codes_BN = sample(ar_model, class_ids_B, cfg_scale=1.5)
    imgs_B3RR = codes_to_uint8(tokenizer, codes_BN)                 # uint8, full resolution R
    previews = prefix_previews(tokenizer, codes_BN, [1, 4, 8, 16])   # list of uint8 B x 3 x c(t) x c(t)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def to_uint8(img_BCHW: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] -> uint8: clamp(127.5 * x + 128, 0, 255), truncated (spec §3.9)."""
    return (127.5 * img_BCHW.float() + 128.0).clamp_(0.0, 255.0).to(torch.uint8)


@torch.no_grad()
def _decode(tokenizer, codes_BN: torch.Tensor, t: int | None) -> torch.Tensor:
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        return to_uint8(tokenizer.decode(codes_BN, t))
    finally:
        tokenizer.train(was_training)


def codes_to_uint8(tokenizer, codes_BN: torch.Tensor) -> torch.Tensor:
    """All N codes -> uint8 images B x 3 x R x R (on the tokenizer's device)."""
    n = tokenizer.cfg.num_tokens
    if codes_BN.ndim != 2 or codes_BN.shape[1] != n:
        raise ValueError(f"expected codes B x {n}, got shape {tuple(codes_BN.shape)}")
    return _decode(tokenizer, codes_BN, n)


def prefix_previews(tokenizer, codes_BN: torch.Tensor, ts: Iterable[int] | None = None) -> list[torch.Tensor]:
    """The first t codes decoded at canvas c(t), for each t in ts (default: every admissible t)."""
    ts = list(tokenizer.rmap.admissible if ts is None else ts)
    for t in ts:
        tokenizer.rmap.check_admissible(t)  # fail before decoding anything
    return [_decode(tokenizer, codes_BN, t) for t in ts]
