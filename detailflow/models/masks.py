"""Encoder attention mask (spec §1.2): patches see patches, latents see every patch, patches never see
latents; among latents the first `causal_num` are token-causal and later groups are block-causal.
"""

from __future__ import annotations

import torch


def latent_block_ids(num_tokens: int, causal_num: int, group_size: int) -> torch.Tensor:
    """Block id of each latent: its own index inside the causal prefix, one id per later group."""
    idx = torch.arange(num_tokens)
    later = causal_num + torch.div(idx - causal_num, group_size, rounding_mode="floor")
    return torch.where(idx < causal_num, idx, later)


def encoder_mask(
    num_patches: int,
    num_tokens: int,
    causal_num: int,
    group_size: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean (P+N) x (P+N) mask, True = row token may attend to column token (SDPA convention)."""
    total = num_patches + num_tokens
    allowed = torch.zeros(total, total, dtype=torch.bool)
    allowed[:num_patches, :num_patches] = True  # patch -> patch
    allowed[num_patches:, :num_patches] = True  # latent -> patch
    blocks = latent_block_ids(num_tokens, causal_num, group_size)
    allowed[num_patches:, num_patches:] = blocks[None, :] <= blocks[:, None]  # latent -> earlier blocks
    return allowed.to(device) if device is not None else allowed
