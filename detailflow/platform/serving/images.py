"""uint8 image arrays -> PNG bytes, grids, base64 (the replica encodes them in a thread, off its loop).

    png = to_png(img_3HW)                       # one image
    png = grid_png(imgs_K3HW, columns=8)        # K images in rows of `columns`, 2 px white gaps
    text = b64(png)
    texts = b64_pngs(imgs_K3HW)                 # one base64 PNG per image (the JSON format)
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np

PNG_LEVEL = 1  # zlib level: fast (level 6 costs ~3x the time for ~10% fewer bytes)
_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(img_HWC: np.ndarray) -> bytes:
    """8-bit RGB PNG of an H x W x 3 uint8 array, written directly (PNG spec: IHDR, one IDAT, IEND).
    Every row uses filter 2 (Up: the byte minus the one above, mod 256), one numpy subtraction; zlib at
    PNG_LEVEL releases the GIL. A 32 x 32 image takes a few tens of microseconds here, where PIL's
    encoder took ~0.6 ms in its per-call set-up, a cost every serving request paid (profiled: 7% of the
    replica's active samples at concurrency 16)."""
    if img_HWC.dtype != np.uint8 or img_HWC.ndim != 3 or img_HWC.shape[2] != 3 or 0 in img_HWC.shape:
        raise ValueError(f"expected a non-empty H x W x 3 uint8 image, got {img_HWC.dtype} {img_HWC.shape}")
    h, w, _ = img_HWC.shape
    rows_HL = img_HWC.reshape(h, 3 * w)
    filtered_HL = np.empty((h, 3 * w + 1), np.uint8)
    filtered_HL[:, 0] = 2  # filter type Up; row 0's "above" is zeros, so it is stored as is
    filtered_HL[0, 1:] = rows_HL[0]
    np.subtract(rows_HL[1:], rows_HL[:-1], out=filtered_HL[1:, 1:])  # uint8 wraps: mod 256
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, no interlace
    return (_SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(filtered_HL.tobytes(), PNG_LEVEL)) + _chunk(b"IEND", b""))


def _hwc(img_3HW: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img_3HW, dtype=np.uint8).transpose(1, 2, 0))


def to_png(img_3HW: np.ndarray) -> bytes:
    return encode_png(_hwc(img_3HW))


def grid_png(imgs_K3HW: np.ndarray, columns: int = 8, pad: int = 2, scale: int = 1) -> bytes:
    """One PNG; a single image is returned without a border. `scale` repeats pixels (nearest)."""
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
    return encode_png(canvas)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64_pngs(imgs_K3HW) -> list[str]:
    return [b64(to_png(x)) for x in imgs_K3HW]


def from_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 3 x H x W (tests and the client)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1).copy()
