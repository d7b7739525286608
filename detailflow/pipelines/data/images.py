"""Image decode and augmentation shared by ingest, the streaming reader and the benchmark.

Usage:
    from detailflow.pipelines.data.images import decode_rgb, random_resized_crop, center_crop, row_rng
    img = decode_rgb(jpeg_bytes)                          # PIL RGB (CMYK/L/P/16-bit/PNG-in-.JPEG)
    rng = row_rng(seed, epoch, key)                       # per-image generator: scheduling-independent
    arr_CHW = random_resized_crop(img, 256, rng)          # ADM crop + flip, uint8 3 x 256 x 256
    arr_CHW = center_crop(img, 256)                       # eval: uint8 3 x 256 x 256

The ADM recipe (spec §1.11): short side -> uniform integer in [res, 1.25 res]; box-halving while the
image is at least twice that size, then bicubic; random res x res crop; horizontal flip with p = 0.5.

High-depth single-channel modes (16-bit grey PNG/TIFF opens as "I;16", int32 as "I", float as "F")
are scaled to 8 bits, because PIL's own convert() clips them at 255 (a mid-grey 16-bit PNG would
decode almost white). 16-bit RGB(A) PNGs already open as 8-bit "RGB"/"RGBA" (PIL keeps the high byte).
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# a single decoded image never legitimately needs more; refuse decompression bombs explicitly
MAX_PIXELS = 16384 * 16384


class DecodeError(ValueError):
    """The bytes are not a decodable image (empty, truncated, not an image)."""


def _reason(e: Exception) -> str:
    """A stable, readable reason (PIL messages embed object addresses, which differ per run)."""
    if isinstance(e, UnidentifiedImageError):
        return "cannot identify image format (not an image file)"
    return re.sub(r"<[^>]* at 0x[0-9a-fA-F]+>", "<bytes>", f"{type(e).__name__}: {e}")


def inspect_image(data: bytes) -> tuple[int, int, str, str]:
    """Fully decode once (catching truncation) and return (width, height, mode, format)."""
    if not data:
        raise DecodeError("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise DecodeError(f"image too large: {img.width}x{img.height}")
                img.load()  # forces the full decode: truncated files raise here
                return img.width, img.height, img.mode, str(img.format)
    except DecodeError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise DecodeError(_reason(e)) from e


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """I;16* / I / F -> 8-bit "L", scaled by the container's range rather than clipped."""
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "F" and a.size and a.min() >= 0 and a.max() <= 1.0:
        top = 1.0  # float images are conventionally in [0, 1]
    else:
        # "I" / out-of-range "F" do not record their bit depth: take the smallest of 8/16/32 bits
        # that holds the maximum (a 16-bit PNG opened as "I" by older PIL lands on 16)
        peak = float(a.max()) if a.size else 0.0
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else 2.0 ** 31 - 1
    out = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def decode_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode to an RGB PIL image. draft_size lets the JPEG decoder scale by 1/2..1/8 (DCT scaling)
    while keeping the short side >= draft_size, which is much cheaper for large photos."""
    if not data:
        raise DecodeError("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            if draft_size and img.format == "JPEG":
                w, h = img.size
                scale = draft_size / min(w, h)
                if scale < 0.5:
                    img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
            img.load()
            if img.mode.startswith("I;16") or img.mode in ("I", "F"):
                img = _high_depth_to_l(img)
            if img.mode == "P" or img.mode == "LA" or img.mode == "PA":
                img = img.convert("RGBA")
            if img.mode != "RGB":
                img = img.convert("RGB")  # CMYK, L, RGBA (alpha dropped), YCbCr ...
            return img
    except Exception as e:
        raise DecodeError(_reason(e)) from e


def row_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, key), never on which worker sees the row."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF,
                                  int.from_bytes(digest, "little")])


def _resize_short_side(img: Image.Image, short: int) -> Image.Image:
    # box-halving first (cheap, alias-free) while the image is at least twice the target
    while min(img.size) >= 2 * short:
        img = img.reduce(2)
    w, h = img.size
    scale = short / min(w, h)
    new = (max(short, round(w * scale)), max(short, round(h * scale)))
    if new != img.size:
        img = img.resize(new, resample=Image.Resampling.BICUBIC)
    return img


def _to_chw(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def random_resized_crop(img: Image.Image, res: int, rng: np.random.Generator, flip: bool = True,
                        max_scale: float = 1.25) -> np.ndarray:
    """ADM random-resize crop (+ optional horizontal flip) -> uint8 3 x res x res."""
    short = int(rng.integers(res, int(res * max_scale) + 1))  # uniform integer in [res, 1.25 res]
    img = _resize_short_side(img, short)
    w, h = img.size
    x0 = int(rng.integers(0, w - res + 1))
    y0 = int(rng.integers(0, h - res + 1))
    do_flip = bool(rng.random() < 0.5)  # always drawn so the stream of draws does not depend on `flip`
    arr = _to_chw(img.crop((x0, y0, x0 + res, y0 + res)))
    if flip and do_flip:
        arr = np.ascontiguousarray(arr[:, :, ::-1])
    return arr


def center_crop(img: Image.Image, res: int) -> np.ndarray:
    """Evaluation crop: short side -> res, centre res x res -> uint8 3 x res x res."""
    img = _resize_short_side(img, res)
    w, h = img.size
    x0, y0 = (w - res) // 2, (h - res) // 2
    return _to_chw(img.crop((x0, y0, x0 + res, y0 + res)))


def to_signed_float(arr_BCHW: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return arr_BCHW.astype(np.float32) / 127.5 - 1.0
