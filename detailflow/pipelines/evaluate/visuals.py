"""PNG grids for MLflow: reconstructions with their coarse-to-fine prefix strips, class samples.

    png = grid_png([[orig_CHW, recon_t1_CHW, ...], ...], cell=64)   # rows of images in [-1, 1]
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F


def to_uint8_hwc(img_CHW: torch.Tensor, cell: int) -> np.ndarray:
    """[-1, 1] C x h x w -> uint8 cell x cell x 3 (nearest upscaling keeps the coarse canvases honest)."""
    x = img_CHW.detach().float().cpu().clamp(-1, 1)[None]
    x = F.interpolate(x, size=(cell, cell), mode="nearest")[0]
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def grid_png(rows: list[list[torch.Tensor]], cell: int = 64, pad: int = 2) -> bytes:
    """One PNG with len(rows) rows of cells; rows may differ in length (short rows are padded white)."""
    from PIL import Image

    if not rows or not any(rows):
        raise ValueError("grid_png needs at least one image")
    ncol = max(len(r) for r in rows)
    h, w = len(rows) * (cell + pad) + pad, ncol * (cell + pad) + pad
    canvas = np.full((h, w, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (cell + pad), pad + j * (cell + pad)
            canvas[y:y + cell, x:x + cell] = to_uint8_hwc(img, cell)
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def strip_prefixes(admissible: list[int], count: int = 6) -> list[int]:
    """About `count` prefix lengths spread over the admissible ones, always ending at N."""
    if len(admissible) <= count:
        return list(admissible)
    idx = np.unique(np.round(np.linspace(0, len(admissible) - 1, count)).astype(int))
    return [admissible[i] for i in idx]
