"""Procedural class-conditional "shapes" dataset (spec §6.1), written as an ImageNet-style folder.

Usage:
    detailflow data synth --name shapes --out /tmp/shapes --size 32 --per-class 200
    # -> /tmp/shapes/train/<class>/<n>.png and /tmp/shapes/val/<class>/<n>.png

    from detailflow.pipelines.data.synth import render, CLASS_NAMES
    img_HWC = render(class_id=3, size=32, rng=np.random.default_rng(0))

10 classes = 5 shapes x 2 palettes. Position, scale and rotation are random; inside the shape a fine
stripe texture (period 2 or 3 px, orientation by shape) carries the high frequencies only late tokens
can reproduce; the background is a smooth gradient. Deterministic for a given seed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("disc", "square", "triangle", "cross", "ring")
PALETTES = ("warm", "cool")
# sorted(CLASS_NAMES) == CLASS_NAMES, so ingest's sorted class index equals the class id here
CLASS_NAMES = [f"{s * 2 + p:02d}_{shape}_{pal}" for s, shape in enumerate(SHAPES)
               for p, pal in enumerate(PALETTES)]

# (stripe colour A, stripe colour B, background start, background end) per palette, RGB 0..1
_PALETTE_COLOURS = {
    0: ((0.95, 0.25, 0.10), (1.00, 0.85, 0.20), (0.10, 0.20, 0.45), (0.35, 0.55, 0.80)),
    1: ((0.10, 0.80, 0.75), (0.20, 0.35, 0.95), (0.55, 0.25, 0.10), (0.95, 0.75, 0.45)),
}


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in the unit-sized shape, in its local (rotated, scaled) coordinates."""
    r = np.hypot(u, v)
    if shape == "disc":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":  # equilateral, circumradius 1, pointing up (-v)
        s3 = np.sqrt(3.0)
        return (v <= 0.5) & (s3 * u - v >= -1.0) & (-s3 * u - v >= -1.0)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    raise ValueError(f"unknown shape {shape!r}")


def render(class_id: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of the class as uint8 H x W x 3."""
    if not 0 <= class_id < len(CLASS_NAMES):
        raise ValueError(f"class_id must be in [0, {len(CLASS_NAMES)}), got {class_id}")
    shape_id, pal = divmod(class_id, 2)
    stripe_a, stripe_b, bg0, bg1 = (np.array(c) for c in _PALETTE_COLOURS[pal])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5

    # smooth background gradient in a random direction, with a little per-image colour jitter
    phi = rng.uniform(0, 2 * np.pi)
    g = ((xx - size / 2) * np.cos(phi) + (yy - size / 2) * np.sin(phi)) / size + 0.5
    g = np.clip(g, 0, 1)[..., None]
    img = bg0 * (1 - g) + bg1 * g + rng.uniform(-0.05, 0.05, size=3)

    # random placement: radius 22-40 % of the side, centre keeps the shape inside
    radius = rng.uniform(0.22, 0.40) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    mask = _shape_mask(SHAPES[shape_id], u, v)

    # class-dependent fine stripes in image axes (period 2 px for warm, 3 px for cool; vertical for
    # even shapes, horizontal for odd ones) so their frequency survives the rotation of the shape
    period = 2 + pal
    coord = np.floor(xx if shape_id % 2 == 0 else yy).astype(np.int64)
    phase = int(rng.integers(0, period))
    on = ((coord + phase) % period) < (period / 2)
    stripes = np.where(on[..., None], stripe_a, stripe_b)
    img = np.where(mask[..., None], stripes, img)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def encode(img_HWC: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(img_HWC).save(buf, format="PNG")
    elif fmt == "jpeg":  # quality 95 with 4:4:4 chroma: lower settings erase the 2 px stripes
        Image.fromarray(img_HWC).save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        raise ValueError(f"format must be 'png' or 'jpeg', got {fmt!r}")
    return buf.getvalue()


def write_folder(out: str | Path, size: int = 32, per_class: int = 100, val_per_class: int | None = None,
                 seed: int = 0, fmt: str = "png", progress=None) -> dict[str, int]:
    """Write train/ and val/ ImageNet-style folders; returns image counts per split."""
    out = Path(out)
    val_per_class = max(1, per_class // 5) if val_per_class is None else val_per_class
    ext = {"png": ".png", "jpeg": ".JPEG"}[fmt]
    counts = {}
    for split_id, (split, n) in enumerate((("train", per_class), ("val", val_per_class))):
        for cid, name in enumerate(CLASS_NAMES):
            d = out / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_id, cid, i])
                (d / f"{name}_{i:06d}{ext}").write_bytes(encode(render(cid, size, rng), fmt))
                if progress is not None:
                    progress(1)
        counts[split] = n * len(CLASS_NAMES)
    return counts
