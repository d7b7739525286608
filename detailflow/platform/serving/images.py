"""uint8 image arrays -> PNG bytes, grids, base64 (the replica encodes them in a thread, off its loop).

    png = to_png(img_3HW)                       # one image
    png = grid_png(imgs_K3HW, columns=8)        # K images in rows of `columns`, 2 px white gaps
    text = b64(png)
    texts = b64_pngs(imgs_K3HW)                 # one base64 PNG per image (the JSON format)
"""

from __future__ import annotations

import base64
import io

import numpy as np

PNG_LEVEL = 1  # zlib level: fast (level 6, PIL's default, costs ~3x the time for ~10% fewer bytes)


def _hwc(img_3HW: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img_3HW, dtype=np.uint8).transpose(1, 2, 0))


def to_png(img_3HW: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_hwc(img_3HW)).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def grid_png(imgs_K3HW: np.ndarray, columns: int = 8, pad: int = 2, scale: int = 1) -> bytes:
    """One PNG; a single image is returned without a border. `scale` repeats pixels (nearest)."""
    from PIL import Image

    imgs = np.asarray(imgs_K3HW, dtype=np.uint8)
    if imgs.ndim != 4 or imgs.shape[1] != 3 or len(imgs) == 0:
        raise ValueError(f"expected K x 3 x H x W uint8 images, got shape {imgs.shape}")
    if scale > 1:
        imgs = imgs.repeat(scale, axis=2).repeat(scale, axis=3)
    if len(imgs) == 1:
        return to_png(imgs[0])
    k, _, h, w = imgs.shape
    cols = min(columns, k)
    rows = -(-k // cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(k):
        y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        canvas[y:y + h, x:x + w] = _hwc(imgs[i])
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64_pngs(imgs_K3HW) -> list[str]:
    return [b64(to_png(x)) for x in imgs_K3HW]


def from_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 3 x H x W (tests and the client)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1).copy()
