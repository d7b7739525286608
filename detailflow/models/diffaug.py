"""DiffAugment (Zhao et al. 2020): differentiable color / translation / cutout for GAN inputs.

Used before the discriminator (spec §1.10): "color,translation,cutout" with cutout 0.2, each op applied
per sample with probability 0.5; the consistency (CR) copies use cutout 0.5 with every op always applied.
Inputs are images in [-1, 1], B x C x H x W.
"""

from __future__ import annotations

import torch


def _rand(shape, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    dev = generator.device if generator is not None else x.device
    return torch.rand(shape, generator=generator, device=dev).to(device=x.device, dtype=x.dtype)


def _randint(hi: int, shape, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    dev = generator.device if generator is not None else x.device
    return torch.randint(hi, shape, generator=generator, device=dev).to(x.device)


def color(x: torch.Tensor, generator=None) -> torch.Tensor:
    b = x.shape[0]
    x = x + (_rand((b, 1, 1, 1), x, generator) - 0.5)  # brightness
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (_rand((b, 1, 1, 1), x, generator) * 2) + mean_c  # saturation
    mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean_all) * (_rand((b, 1, 1, 1), x, generator) + 0.5) + mean_all  # contrast


def translation(x: torch.Tensor, ratio: float = 0.125, generator=None) -> torch.Tensor:
    """Shift by up to ratio * size pixels in each direction; uncovered pixels become 0."""
    b, c, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = _randint(2 * sy + 1, (b, 1, 1), x, generator) - sy
    dx = _randint(2 * sx + 1, (b, 1, 1), x, generator) - sx
    gy = torch.arange(h, device=x.device)[None, :, None] + dy
    gx = torch.arange(w, device=x.device)[None, None, :] + dx
    valid = ((gy >= 0) & (gy < h) & (gx >= 0) & (gx < w)).to(x.dtype)
    flat = (gy.clamp(0, h - 1) * w + gx.clamp(0, w - 1)).reshape(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, flat).reshape(b, c, h, w) * valid[:, None]


def cutout(x: torch.Tensor, ratio: float = 0.5, generator=None) -> torch.Tensor:
    """Zero one square of side ratio * size at a random centre per sample."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = _randint(h + (1 - ch % 2), (b, 1, 1), x, generator)
    cx = _randint(w + (1 - cw % 2), (b, 1, 1), x, generator)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= cy - ch // 2) & (ys < cy - ch // 2 + ch) & (xs >= cx - cw // 2) & (xs < cx - cw // 2 + cw)
    return x * (~inside).to(x.dtype)[:, None]


def diff_augment(
    x: torch.Tensor,
    policy: str = "color,translation,cutout",
    cutout_ratio: float = 0.2,
    prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Apply each op of `policy` per sample with probability `prob` (1.0 = always)."""
    ops = {
        "color": lambda y: color(y, generator),
        "translation": lambda y: translation(y, 0.125, generator),
        "cutout": lambda y: cutout(y, cutout_ratio, generator),
    }
    for name in filter(None, (p.strip() for p in policy.split(","))):
        if name not in ops:
            raise ValueError(f"unknown DiffAugment op {name!r}; known: {sorted(ops)}")
        aug = ops[name](x)
        if prob >= 1.0:
            x = aug
        else:
            keep = (_rand((x.shape[0], 1, 1, 1), x, generator) < prob).to(x.dtype)
            x = keep * aug + (1 - keep) * x
    return x
