"""Per-micro-batch image work of the reader (reader.py), run inside its Ray tasks.

    out = decode_crop_batch({"key", "label", "image" bytes}, image_size=32, seed=0, epoch=0, train=True,
                            flip=True, max_scale=1.0, jpeg_draft=False)    # -> uint8 n x 3 x R x R
    row = degrade_batch(out, rmap=rmap, micro_batch=32, degrade_prob=0.2, seed=0, epoch=0, train=True,
                        fixed_t=None, all_t=False)                           # -> one output row per t

Stage 1 decodes and crops (ADM random-resize crop + flip with a per-row generator from (seed, epoch,
key), or a centre crop) and mixes rows inside the batch; stage 2 draws t and degrades the targets with
degrade_to_prefix (spec §1.6).
"""

from __future__ import annotations

import zlib

import numpy as np

from detailflow.pipelines.data.images import (
    DecodeError,
    center_crop,
    decode_rgb,
    random_resized_crop,
    row_rng,
    to_signed_float,
)


# ---- stage 1: decode + crop ---------------------------------------------------------------------
def decode_crop_batch(batch: dict, *, image_size: int, seed: int, epoch: int, train: bool, flip: bool,
                      max_scale: float, jpeg_draft: bool) -> dict:
    """numpy batch {key, label, image bytes} -> {key, label, image uint8 n x 3 x R x R, skipped}."""
    keys, labels, out = [], [], []
    draft = int(image_size * max_scale) if jpeg_draft else None
    for key, label, data in zip(batch["key"], batch["label"], batch["image"], strict=True):
        key = str(key)
        try:
            img = decode_rgb(bytes(data), draft_size=draft)
        except DecodeError:
            continue
        if train:
            arr = random_resized_crop(img, image_size, row_rng(seed, epoch, key), flip=flip,
                                      max_scale=max_scale)
        else:
            arr = center_crop(img, image_size)
        keys.append(key)
        labels.append(int(label))
        out.append(arr)
    n_bad = len(batch["key"]) - len(keys)
    order = np.arange(len(keys))
    if train and len(keys) > 1:  # mix rows inside the batch so micro-batches are not shard-ordered runs
        order = np.random.default_rng([seed, epoch, zlib.crc32(keys[0].encode())]).permutation(len(keys))
    skipped = np.zeros(len(keys), np.int32)
    if len(keys):
        skipped[0] = n_bad  # failures ride on the first surviving row and are summed downstream
    images = np.stack(out) if out else np.zeros((0, 3, image_size, image_size), np.uint8)
    return {"key": np.array(keys, dtype=object)[order], "label": np.array(labels, np.int32)[order],
            "image": images[order], "skipped": skipped}


# ---- stage 2: group + degrade --------------------------------------------------------------------
def prefix_rng(seed: int, epoch: int, draw_key: str | int) -> np.random.Generator:
    """Generator of a micro-batch's t from (seed, epoch, first key) (batches outside a stream plan)."""
    tag = draw_key if isinstance(draw_key, int) else zlib.crc32(str(draw_key).encode())
    return np.random.default_rng([seed, epoch, int(tag), 0x7D])


def degrade_batch(batch: dict, *, rmap, micro_batch: int, degrade_prob: float, seed: int, epoch: int,
                  train: bool, fixed_t: int | None, all_t: bool, drop_partial: bool | None = None,
                  rng: np.random.Generator | None = None) -> dict:
    """One micro-batch of decoded rows -> one output row (or one per admissible t with all_t).

    In train mode t is drawn with `rng` (the stream passes one seeded by its plan position), else
    from (seed, epoch, first key).
    A batch smaller than micro_batch is dropped when drop_partial (default: train)."""
    import torch

    from detailflow.models.degrade import degrade_to_prefix, sample_prefix_len

    keys = [str(k) for k in batch["key"]]
    b = len(keys)
    empty = {"images": [], "targets": [], "t": [], "canvas": [], "batch": [], "size": [],
             "labels": [], "keys": [], "skipped": []}
    drop_partial = train if drop_partial is None else drop_partial
    if b == 0 or (drop_partial and b < micro_batch):
        return {k: np.array(v, dtype=object if k in ("images", "targets", "labels", "keys") else np.int64)
                for k, v in empty.items()}
    images = np.ascontiguousarray(batch["image"], dtype=np.uint8)
    if fixed_t is not None:
        ts = [rmap.check_admissible(fixed_t)]
    elif all_t:
        ts = list(rmap.admissible)
    elif train:
        rng = rng if rng is not None else prefix_rng(seed, epoch, keys[0])
        ts = [sample_prefix_len(rmap, degrade_prob, rng)]
    else:
        ts = [rmap.num_tokens]
    x = torch.from_numpy(to_signed_float(images)) if min(ts) < rmap.num_tokens else None
    out = {k: [] for k in empty}
    for t in ts:
        if t == rmap.num_tokens:
            target = b""  # identity: iter_microbatches rebuilds it from the images
        else:
            target = degrade_to_prefix(x, t, rmap).contiguous().numpy().tobytes()
        out["images"].append(images.tobytes())
        out["targets"].append(target)
        out["t"].append(t)
        out["canvas"].append(rmap.canvas_size(t))
        out["batch"].append(b)
        out["size"].append(images.shape[-1])
        out["labels"].append(np.asarray(batch["label"], np.int32).tobytes())
        out["keys"].append("\n".join(keys))
        out["skipped"].append(int(np.sum(batch["skipped"])) if t == ts[0] else 0)  # count once
    return {k: np.array(v, dtype=object if k in ("images", "targets", "labels", "keys") else np.int64)
            for k, v in out.items()}
