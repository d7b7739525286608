"""Summarise a published dataset and write a contact sheet (a few images per class).

Usage:
    detailflow data show shapes --split train --out shapes_train.png --per-class 8

Reads the split's pointer manifest (the current version; manifests from before versioning have no
`version`) and opens shards by their full `key`, so it works for any version layout.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from detailflow.pipelines.data.images import DecodeError, center_crop, decode_rgb
from detailflow.pipelines.data.ingest import dataset_prefix


def summary_lines(manifest: dict, max_classes: int = 20, max_rejected: int = 10) -> list[str]:
    m = manifest
    mb = sum(s["bytes"] for s in m["shards"]) / 1e6
    lines = [
        f"dataset {m['name']}/{m['split']}  version {m.get('version', '-')}  ({m['format']}, "
        f"source {m['source']})",
        f"images {m['num_images']}  classes {m['num_classes']}  shards {len(m['shards'])}  "
        f"bytes {mb:.1f} MB  rejected {m['num_rejected']}",
    ]
    counts = manifest["counts_per_class"]
    for i, c in enumerate(manifest["classes"][:max_classes]):
        lines.append(f"  {i:5d}  {c:30s} {counts.get(c, 0):8d}")
    if manifest["num_classes"] > max_classes:
        lines.append(f"  ... {manifest['num_classes'] - max_classes} more classes")
    for r in manifest["rejected"][:max_rejected]:
        lines.append(f"  rejected {r['key']}: {r['reason']}")
    if manifest["num_rejected"] > max_rejected:
        lines.append(f"  ... {manifest['num_rejected'] - max_rejected} more rejected")
    return lines


def contact_sheet(storage, manifest: dict, per_class: int = 8, thumb: int = 64, max_classes: int = 20,
                  max_shards: int = 4) -> Image.Image:
    """Grid with one row per class (first max_classes) and per_class centre-cropped thumbnails."""
    import pyarrow.parquet as pq

    n_cls = min(max_classes, manifest["num_classes"])
    picked: dict[int, list[np.ndarray]] = {i: [] for i in range(n_cls)}
    for shard in manifest["shards"][:max_shards]:  # checksum-verified read of whole shards
        table = pq.read_table(io.BytesIO(storage.get_bytes(shard["key"], expected_sha256=shard["sha256"])),
                              columns=["label", "image"])
        for label, data in zip(table["label"].to_pylist(), table["image"].to_pylist(), strict=True):
            if label < n_cls and len(picked[label]) < per_class:
                try:
                    picked[label].append(center_crop(decode_rgb(data), thumb).transpose(1, 2, 0))
                except DecodeError:
                    continue
        if all(len(v) >= per_class for v in picked.values()):
            break
    sheet = np.full((n_cls * (thumb + 2), per_class * (thumb + 2), 3), 255, np.uint8)
    for row, imgs in picked.items():
        for col, img in enumerate(imgs):
            y, x = row * (thumb + 2) + 1, col * (thumb + 2) + 1
            sheet[y:y + thumb, x:x + thumb] = img
    return Image.fromarray(sheet)


def show(storage, name: str, split: str, out: str | None, per_class: int = 8, thumb: int = 64) -> list[str]:
    manifest = storage.read_manifest(dataset_prefix(name, split))
    if manifest is None:
        raise FileNotFoundError(f"dataset {storage.uri(dataset_prefix(name, split))} is not published")
    lines = summary_lines(manifest)
    if out:
        contact_sheet(storage, manifest, per_class=per_class, thumb=thumb).save(out)
        lines.append(f"contact sheet -> {out}")
    return lines
