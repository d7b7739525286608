"""MNIST-family IDX files (raw or .gz) -> ImageNet-style folder of 32x32 RGB PNGs.

Usage:
    apt-get install -y dataset-fashion-mnist      # Debian: /usr/share/datasets/fashion-mnist/*.gz
    detailflow data import-idx /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
        /usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz --out /tmp/fmnist --split train

The IDX header is: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
big-endian uint32 per dimension. 28x28 greyscale images are zero-padded by 2 px to 32x32 (no
resampling blur) and replicated to 3 channels; other sizes are resized bicubically to --size.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle-boot"]


def _open(path: str | Path) -> bytes:
    data = Path(path).read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (gzip detected by magic bytes) into an ndarray; clear error on bad input."""
    data = _open(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    payload = data[4 + 4 * ndim:]
    if len(payload) != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but payload is {len(payload)} bytes")
    return np.frombuffer(payload, dtype=dtype).reshape(dims)


def write_idx(path: str | Path, arr: np.ndarray, compress: bool | None = None) -> None:
    """Write a uint8 array as IDX (gzip if the name ends in .gz or compress=True); used by tests."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path = Path(path)
    if compress or (compress is None and path.suffix == ".gz"):
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def to_rgb(img_HW: np.ndarray, size: int = 32) -> np.ndarray:
    """Greyscale H x W -> uint8 size x size x 3 (centre zero-pad when it fits, else bicubic resize)."""
    h, w = img_HW.shape
    if h <= size and w <= size:
        out = np.zeros((size, size), np.uint8)
        y0, x0 = (size - h) // 2, (size - w) // 2
        out[y0:y0 + h, x0:x0 + w] = img_HW
    else:
        out = np.asarray(Image.fromarray(img_HW).resize((size, size), Image.Resampling.BICUBIC))
    return np.repeat(out[..., None], 3, axis=2)


def import_idx(images_path: str | Path, labels_path: str | Path, out: str | Path, split: str = "train",
               size: int = 32, class_names: list[str] | None = None, limit: int | None = None,
               progress=None) -> dict[str, int]:
    """Write out/<split>/<NN_class>/<split>_<index>.png; returns counts per class folder."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected N x H x W images, got shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
    n = len(images) if limit is None else min(limit, len(images))
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if class_names is None:
        class_names = FASHION_MNIST_CLASSES if n_classes <= 10 else [str(i) for i in range(n_classes)]
    # a zero-padded index prefix keeps sorted(folder names) == label order for ingest
    folders = [f"{i:02d}_{class_names[i] if i < len(class_names) else i}" for i in range(n_classes)]
    counts: dict[str, int] = {}
    for i in range(n):
        label = int(labels[i])
        d = Path(out) / split / folders[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_rgb(np.asarray(images[i], np.uint8), size)).save(d / f"{split}_{i:06d}.png")
        counts[folders[label]] = counts.get(folders[label], 0) + 1
        if progress is not None:
            progress(1)
    return counts
