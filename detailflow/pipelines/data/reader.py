"""Streaming reader: Parquet shards on S3 -> decode, crop, flip -> degraded micro-batches (Ray Data).

Usage:
    from detailflow.pipelines.data.reader import ReaderConfig, build_degraded_dataset, iter_microbatches
    rmap = ResolutionMap.from_config(get_model_config("tiny").tokenizer)
    cfg = ReaderConfig(image_size=32, micro_batch=32, degrade_prob=0.2, seed=0, train=True)
    ds = build_degraded_dataset(storage, "shapes", "train", cfg, rmap)     # one row per micro-batch
    for img_BCHW, target_BCcc, t in iter_microbatches(ds, device="cuda"):  # or a Ray Train shard
        ...

    # in a Ray Train worker: TorchTrainer(..., datasets={"train": ds}) and
    # iter_microbatches(ray.train.get_dataset_shard("train"), device)

Stages: read_parquet (only the shards the manifest lists) -> map_batches(decode + ADM crop/flip or
centre crop, per-row generator from (seed, epoch, key)) -> repartition into exact micro-batch blocks
-> map_batches(batch_size=micro_batch): draw t once per micro-batch with sample_prefix_len (generator
from (seed, epoch, first key)), build targets with degrade_to_prefix, emit ONE row per micro-batch.
Rows carry flat bytes plus shape columns (batch, size, canvas), so micro-batches of different canvas
sizes never meet Ray's fixed-shape tensor columns; iter_microbatches hides this. A t = N row ships no
target bytes: the target is the image itself (degrade_to_prefix is the identity there).

Images that fail to decode are skipped and counted (column `skipped`, summed by iter_microbatches'
`stats`); the only uncounted case is a decode batch in which every image fails.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from detailflow.pipelines.data.images import (
    DecodeError,
    center_crop,
    decode_rgb,
    random_resized_crop,
    row_rng,
    to_signed_float,
)
from detailflow.pipelines.data.ingest import dataset_prefix


@dataclass
class ReaderConfig:
    image_size: int  # R: output crop size in pixels (the tokenizer's image_size)
    micro_batch: int = 32  # images per emitted row = per training step per worker
    degrade_prob: float = 0.2  # p of spec §1.6 (train mode)
    seed: int = 0  # base seed of crops, flips, shuffles and t draws
    train: bool = True  # train: random crop + flip, drawn t, drop the final partial micro-batch
    epoch: int = 0  # first epoch number (enters every seed)
    num_epochs: int = 1  # epochs chained into one stream, each re-seeded with its own epoch number
    fixed_t: int | None = None  # every micro-batch uses this prefix length (evaluation)
    all_t: bool = False  # emit every micro-batch once per admissible t (evaluation curves)
    max_scale: float = 1.25  # ADM short side uniform in [R, max_scale * R]
    flip: bool = True  # horizontal flip with p = 0.5 in train mode
    shuffle_files: bool = True  # train: shard order shuffled per epoch (seeded)
    decode_batch: int = 64  # rows per decode call (larger amortises Ray overhead)
    num_cpus: float = 0.5  # CPUs per Ray Data task: fractional so trainers never starve it (pitfall 3)
    jpeg_draft: bool = True  # let libjpeg scale down large JPEGs during decode (DCT scaling)
    preserve_order: bool = False  # deterministic row order (slower); per-row results are seeded anyway

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.image_size < 1:
            raise ValueError("micro_batch and image_size must be >= 1")
        if self.fixed_t is not None and self.all_t:
            raise ValueError("fixed_t and all_t are exclusive")


class MicroBatch(NamedTuple):
    images: object  # uint8 B x 3 x R x R torch tensor
    targets: object  # float [-1, 1] B x 3 x c x c torch tensor
    t: int  # prefix length shared by the micro-batch
    labels: object  # int64 B torch tensor
    keys: list[str]  # source keys, in row order
    skipped: int  # images dropped for decode failures before this micro-batch


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
def prefix_rng(seed: int, epoch: int, first_key: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(first_key.encode()), 0x7D])


def degrade_batch(batch: dict, *, rmap, micro_batch: int, degrade_prob: float, seed: int, epoch: int,
                  train: bool, fixed_t: int | None, all_t: bool) -> dict:
    """One micro-batch of decoded rows -> one output row (or one per admissible t with all_t)."""
    import torch

    from detailflow.models.degrade import degrade_to_prefix, sample_prefix_len

    torch.set_num_threads(1)  # Ray runs one task per (fractional) CPU; intra-op threads oversubscribe
    keys = [str(k) for k in batch["key"]]
    b = len(keys)
    empty = {"images": [], "targets": [], "t": [], "canvas": [], "batch": [], "size": [],
             "labels": [], "keys": [], "skipped": []}
    if b == 0 or (train and b < micro_batch):
        return {k: np.array(v, dtype=object if k in ("images", "targets", "labels", "keys") else np.int64)
                for k, v in empty.items()}
    images = np.ascontiguousarray(batch["image"], dtype=np.uint8)
    if fixed_t is not None:
        ts = [rmap.check_admissible(fixed_t)]
    elif all_t:
        ts = list(rmap.admissible)
    elif train:
        ts = [sample_prefix_len(rmap, degrade_prob, prefix_rng(seed, epoch, keys[0]))]
    else:
        ts = [rmap.num_tokens]
    x = torch.from_numpy(to_signed_float(images))
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


# ---- dataset builders ------------------------------------------------------------------------------
def read_manifest_checked(storage, name: str, split: str) -> dict:
    """The published manifest of a split, or a clear error naming the command that creates it."""
    prefix = dataset_prefix(name, split)
    manifest = storage.read_manifest(prefix)
    if manifest is None:
        raise FileNotFoundError(f"dataset {storage.uri(prefix)} is not published (no _manifest.json); "
                                f"run `detailflow data ingest SRC --name {name} --split {split}` first")
    if not manifest["shards"]:
        raise ValueError(f"dataset {storage.uri(prefix)} has no shards (every file was rejected?)")
    return manifest


def build_image_dataset(storage, name: str, split: str, cfg: ReaderConfig, epoch: int | None = None):
    """Decoded, cropped images: rows {key, label, image uint8 3 x R x R, skipped}."""
    import ray.data

    epoch = cfg.epoch if epoch is None else epoch
    shuffle = ray.data.FileShuffleConfig(seed=cfg.seed * 1000003 + epoch) if (
        cfg.train and cfg.shuffle_files) else None
    manifest = read_manifest_checked(storage, name, split)
    paths = [storage.fs_path(s["key"]) for s in manifest["shards"]]
    # about 4 decode batches per read block: enough blocks to keep every CPU busy on small sets,
    # few enough that per-task overhead stays small (Ray's default of 200 blocks is far too many)
    blocks = max(len(paths), min(4096, -(-manifest["num_images"] // (4 * cfg.decode_batch))))
    ds = ray.data.read_parquet(paths, filesystem=storage.filesystem(), shuffle=shuffle, partitioning=None,
                               override_num_blocks=blocks, num_cpus=cfg.num_cpus)
    ds = ds.select_columns(["key", "label", "image"])
    return ds.map_batches(
        decode_crop_batch, batch_size=cfg.decode_batch, batch_format="numpy", num_cpus=cfg.num_cpus,
        fn_kwargs={"image_size": cfg.image_size, "seed": cfg.seed, "epoch": epoch, "train": cfg.train,
                   "flip": cfg.flip, "max_scale": cfg.max_scale, "jpeg_draft": cfg.jpeg_draft})


def build_degraded_dataset(storage, name: str, split: str, cfg: ReaderConfig, rmap):
    """One row per micro-batch (images, degraded targets, t), for cfg.num_epochs epochs in sequence."""
    if rmap.image_size != cfg.image_size:
        raise ValueError(f"ReaderConfig.image_size={cfg.image_size} but the resolution map is for "
                         f"{rmap.image_size} px")
    epochs = []
    for e in range(cfg.epoch, cfg.epoch + cfg.num_epochs):
        ds = build_image_dataset(storage, name, split, cfg, epoch=e)
        # exact micro-batch blocks, so map_batches below sees full batches except the very last one
        ds = ds.repartition(target_num_rows_per_block=cfg.micro_batch, strict=True)
        ds = ds.map_batches(
            degrade_batch, batch_size=cfg.micro_batch, batch_format="numpy", num_cpus=cfg.num_cpus,
            fn_kwargs={"rmap": rmap, "micro_batch": cfg.micro_batch, "degrade_prob": cfg.degrade_prob,
                       "seed": cfg.seed, "epoch": e, "train": cfg.train, "fixed_t": cfg.fixed_t,
                       "all_t": cfg.all_t})
        epochs.append(ds)
    ds = epochs[0].union(*epochs[1:]) if len(epochs) > 1 else epochs[0]
    if cfg.preserve_order:
        ds.context.execution_options.preserve_order = True
    return ds


# ---- consumer ---------------------------------------------------------------------------------------
def row_to_microbatch(row: dict, device="cpu") -> MicroBatch:
    """Decode one emitted row (numpy batch of size 1, index 0) into torch tensors on `device`."""
    import torch

    b, r, c, t = int(row["batch"][0]), int(row["size"][0]), int(row["canvas"][0]), int(row["t"][0])
    images = torch.from_numpy(np.frombuffer(row["images"][0], np.uint8).reshape(b, 3, r, r).copy())
    images = images.to(device, non_blocking=True)
    raw = row["targets"][0]
    if len(raw) == 0:  # t == N: the target is the full image in [-1, 1] (same formula as the reader)
        targets = images.float() / 127.5 - 1.0
    else:
        targets = torch.from_numpy(np.frombuffer(raw, np.float32).reshape(b, 3, c, c).copy()).to(device)
    labels = torch.from_numpy(np.frombuffer(row["labels"][0], np.int32).astype(np.int64)).to(device)
    keys = str(row["keys"][0]).split("\n")
    return MicroBatch(images, targets, t, labels, keys, int(row["skipped"][0]))


def iter_microbatches(ds_or_shard, device="cpu", *, with_info: bool = False, stats: dict | None = None,
                      prefetch_batches: int = 2) -> Iterator:
    """Yield (images uint8 B x 3 x R x R, targets float B x 3 x c x c, t) per micro-batch, or the full
    MicroBatch with with_info=True. `stats` (if given) accumulates batches / images / skipped."""
    for row in ds_or_shard.iter_batches(batch_size=1, batch_format="numpy",
                                        prefetch_batches=prefetch_batches):
        mb = row_to_microbatch(row, device)
        if stats is not None:
            stats["batches"] = stats.get("batches", 0) + 1
            stats["images"] = stats.get("images", 0) + len(mb.keys)
            stats["skipped"] = stats.get("skipped", 0) + mb.skipped
        yield mb if with_info else (mb.images, mb.targets, mb.t)
