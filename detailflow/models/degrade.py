"""Degraded (coarse-to-fine) supervision (spec §1.6): the prefix-length sampler and the target op.

Usage:
    import numpy as np
    from detailflow.models.degrade import sample_prefix_len, degrade_to_prefix, prefix_probabilities
    t = sample_prefix_len(rmap, degrade_prob=0.2, rng=np.random.default_rng(0))
    target_BCcc = degrade_to_prefix(img_BCHW, t, rmap)     # img in [-1, 1], R x R

One t is drawn per step (the whole local batch shares it). With probability 1 - p, t = N; otherwise
u ~ Uniform{1..N-g} and t = u if u <= causal_num else g * ceil(u / g). t = N never comes from the
degraded branch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from detailflow.models.resolution import ResolutionMap


def _check_prob(degrade_prob: float) -> float:
    p = float(degrade_prob)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"degrade_prob must be in [0, 1], got {degrade_prob}")
    return p


def _degraded_t(rmap: ResolutionMap, u: int) -> int:
    return u if u <= rmap.causal_num else rmap.group_size * math.ceil(u / rmap.group_size)


def sample_prefix_len(rmap: ResolutionMap, degrade_prob: float, rng: np.random.Generator) -> int:
    """Draw one prefix length t with the exact distribution of spec §1.6."""
    p = _check_prob(degrade_prob)
    n, g = rmap.num_tokens, rmap.group_size
    if n - g < 1 or rng.random() >= p:
        return n
    u = int(rng.integers(1, n - g + 1))  # uniform over {1, ..., N - g}
    return _degraded_t(rmap, u)


def prefix_probabilities(rmap: ResolutionMap, degrade_prob: float) -> dict[int, float]:
    """Exact P(t) of sample_prefix_len (sums to 1); keys are the support, in increasing order."""
    p = _check_prob(degrade_prob)
    n, g = rmap.num_tokens, rmap.group_size
    probs: dict[int, float] = {}
    if n - g >= 1:
        for u in range(1, n - g + 1):
            t = _degraded_t(rmap, u)
            probs[t] = probs.get(t, 0.0) + p / (n - g)
        probs[n] = probs.get(n, 0.0) + 1.0 - p
    else:
        probs[n] = 1.0
    return {t: probs[t] for t in sorted(probs) if probs[t] > 0}


def degrade_to_prefix(img_BCHW: torch.Tensor, t: int, rmap: ResolutionMap) -> torch.Tensor:
    """Target for prefix t: area-downsample to r(t), bicubic-upsample (align_corners=False) to c(t).

    Returns the input object unchanged when t == N. Works on any device; half-precision inputs are
    resampled in float32 and cast back, so the output has the input's dtype and device.
    """
    if img_BCHW.ndim != 4:
        raise ValueError(f"expected a B x C x H x W tensor, got shape {tuple(img_BCHW.shape)}")
    if not img_BCHW.is_floating_point():
        raise TypeError(f"expected a float image in [-1, 1], got dtype {img_BCHW.dtype}")
    h, w = img_BCHW.shape[-2:]
    if h != w or h != rmap.image_size:
        raise ValueError(f"expected a {rmap.image_size}x{rmap.image_size} image, got {h}x{w}")
    t = int(t)
    rmap.check_admissible(t)
    if t == rmap.num_tokens:
        return img_BCHW
    r, c = rmap.content_size(t), rmap.canvas_size(t)
    x = img_BCHW if img_BCHW.dtype in (torch.float32, torch.float64) else img_BCHW.float()
    if r != h:
        x = F.interpolate(x, size=(r, r), mode="area")
    if c != r:
        x = F.interpolate(x, size=(c, c), mode="bicubic", align_corners=False)
    return x.to(img_BCHW.dtype)
