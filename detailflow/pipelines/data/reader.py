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

The driver plans each epoch from the manifest alone (plan_microbatches): row groups in a seeded
order, rows permuted inside each group, cut into micro-batches (train drops the final partial one).
One Ray task per few micro-batches reads the row groups it needs from S3 once, decodes, crops (ADM
random-resize crop + flip with a per-row generator from (seed, epoch, key), or a centre crop), draws
t with sample_prefix_len from (seed, epoch, batch index), builds targets with degrade_to_prefix and
emits ONE row per micro-batch. Composition, crops and t depend only on (seed, epoch), never on
scheduling. Rows carry flat bytes plus shape columns (batch, size, canvas), so micro-batches of
different canvas sizes never meet Ray's fixed-shape tensor columns; iter_microbatches hides this.
A t = N row ships no target bytes: the target is the image itself (degrade_to_prefix is the identity).

Images that fail to decode (ingest already rejected undecodable files, so this means damage after
ingest) are skipped and counted (column `skipped`, summed by iter_microbatches' `stats`); that
micro-batch is then smaller than micro_batch rather than padded.
"""

from __future__ import annotations

import json
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
    num_cpus: float = 0.5  # CPUs per Ray Data task: fractional so trainers never starve it (pitfall 3)
    jpeg_draft: bool = True  # let libjpeg scale down large JPEGs during decode (DCT scaling)
    batches_per_task: int = 4  # micro-batches per Ray task (each task reads its row groups once)
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
def prefix_rng(seed: int, epoch: int, draw_key: str | int) -> np.random.Generator:
    """Generator of a micro-batch's t: from (seed, epoch, batch index) or (seed, epoch, first key)."""
    tag = draw_key if isinstance(draw_key, int) else zlib.crc32(str(draw_key).encode())
    return np.random.default_rng([seed, epoch, int(tag), 0x7D])


def degrade_batch(batch: dict, *, rmap, micro_batch: int, degrade_prob: float, seed: int, epoch: int,
                  train: bool, fixed_t: int | None, all_t: bool, batch_index: int | None = None,
                  drop_partial: bool | None = None) -> dict:
    """One micro-batch of decoded rows -> one output row (or one per admissible t with all_t).

    t is drawn from (seed, epoch, batch_index) when given, else from (seed, epoch, first key).
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
        ts = [sample_prefix_len(rmap, degrade_prob,
                                prefix_rng(seed, epoch, keys[0] if batch_index is None else batch_index))]
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


_FS_CACHE: dict = {}


def _filesystem(storage):
    """One pyarrow S3FileSystem per worker process (building one costs ~0.4 s)."""
    key = repr(storage.settings)
    if key not in _FS_CACHE:
        _FS_CACHE[key] = storage.filesystem()
    return _FS_CACHE[key]


def read_units(manifest: dict) -> list[dict]:
    """(shard key, row group) pairs: the reader's unit of parallel work."""
    units = []
    for s in manifest["shards"]:
        groups = s.get("row_groups")
        for g in range(groups) if groups and s.get("row_group_rows") else [-1]:  # -1: whole shard
            units.append({"path": s["key"], "row_group": g})
    return units


def read_unit_table(storage, path: str, row_group: int):
    import pyarrow.parquet as pq

    with _filesystem(storage).open_input_file(storage.fs_path(path)) as f:
        pf = pq.ParquetFile(f)
        cols = ["key", "label", "image"]
        return pf.read(columns=cols) if row_group < 0 else pf.read_row_group(row_group, columns=cols)


def read_decode_units(units: dict, *, storage, **decode_kwargs) -> Iterator[dict]:
    """map_batches fn: for each unit, read its row group from S3 and decode + crop it."""
    for path, group in zip(units["path"], units["row_group"], strict=True):
        table = read_unit_table(storage, str(path), int(group))
        batch = {"key": np.array(table["key"].to_pylist(), dtype=object), "label": table["label"].to_numpy(),
                 "image": np.array(table["image"].to_pylist(), dtype=object)}
        yield decode_crop_batch(batch, **decode_kwargs)


def build_image_dataset(storage, name: str, split: str, cfg: ReaderConfig, epoch: int | None = None):
    """Decoded, cropped images: rows {key, label, image uint8 3 x R x R, skipped}."""
    import ray.data

    epoch = cfg.epoch if epoch is None else epoch
    units = read_units(read_manifest_checked(storage, name, split))
    if cfg.train and cfg.shuffle_files:
        order = np.random.default_rng([cfg.seed, epoch, 0x5EED]).permutation(len(units))
        units = [units[i] for i in order]
    # Ray's own read_parquet lists files in a task (~6 s of latency here) and merges small files into
    # one read task; explicit units keep every CPU busy from the first second
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    return ds.map_batches(
        read_decode_units, batch_size=1, batch_format="numpy", num_cpus=cfg.num_cpus,
        fn_kwargs={"storage": storage, "image_size": cfg.image_size, "seed": cfg.seed, "epoch": epoch,
                   "train": cfg.train, "flip": cfg.flip, "max_scale": cfg.max_scale,
                   "jpeg_draft": cfg.jpeg_draft})


def _row_groups(manifest: dict) -> list[tuple[str, int, int]]:
    """(shard key, row group, rows) for every row group; -1 = whole shard (manifest without counts)."""
    out = []
    for s in manifest["shards"]:
        groups, per, rows = s.get("row_groups"), s.get("row_group_rows"), s["rows"]
        if not groups or not per:
            out.append((s["key"], -1, rows))
            continue
        out += [(s["key"], g, min(per, rows - g * per)) for g in range(groups)]
    return out


def plan_microbatches(manifest: dict, cfg: ReaderConfig, epoch: int) -> list[dict]:
    """Deterministic micro-batch plan of one epoch, cut into Ray tasks of cfg.batches_per_task.

    Train: row groups in a seeded order, rows permuted inside each group, consecutive runs of
    micro_batch rows, the final partial micro-batch dropped. Eval: manifest order, partial kept.
    Each unit lists its micro-batches as (batch index, [(group id, row), ...])."""
    groups = _row_groups(manifest)
    order = np.arange(len(groups))
    if cfg.train and cfg.shuffle_files:
        order = np.random.default_rng([cfg.seed, epoch, 0x5EED]).permutation(len(groups))
    seq_g, seq_r = [], []
    for gi in order:
        rows = np.arange(groups[gi][2])
        if cfg.train:
            rows = np.random.default_rng([cfg.seed, epoch, int(gi), 0xA11]).permutation(rows)
        seq_g.append(np.full(len(rows), gi))
        seq_r.append(rows)
    seq_g, seq_r = np.concatenate(seq_g), np.concatenate(seq_r)
    n_batches = len(seq_g) // cfg.micro_batch if cfg.train else -(-len(seq_g) // cfg.micro_batch)
    units = []
    for first in range(0, n_batches, cfg.batches_per_task):
        batches = []
        for bi in range(first, min(n_batches, first + cfg.batches_per_task)):
            sl = slice(bi * cfg.micro_batch, (bi + 1) * cfg.micro_batch)
            batches.append([bi, [[int(g), int(r)] for g, r in zip(seq_g[sl], seq_r[sl], strict=True)]])
        used = sorted({g for _, rows in batches for g, _ in rows})
        units.append({"epoch": epoch, "plan": json.dumps({
            "groups": {str(g): [groups[g][0], groups[g][1]] for g in used}, "batches": batches})})
    return units


def microbatch_task(units: dict, *, storage, rmap, cfg: ReaderConfig) -> Iterator[dict]:
    """map_batches fn: read each needed row group once, decode + crop, degrade, one row per batch."""
    import torch

    if torch.get_num_threads() != 1:  # Ray runs one task per CPU share: intra-op threads oversubscribe
        torch.set_num_threads(1)
    for epoch, plan_json in zip(units["epoch"], units["plan"], strict=True):
        epoch, plan = int(epoch), json.loads(plan_json)
        tables = {g: read_unit_table(storage, path, rg) for g, (path, rg) in plan["groups"].items()}
        for batch_index, rows in plan["batches"]:
            raw = {"key": np.array([tables[str(g)]["key"][r].as_py() for g, r in rows], dtype=object),
                   "label": np.array([tables[str(g)]["label"][r].as_py() for g, r in rows], np.int32),
                   "image": np.array([tables[str(g)]["image"][r].as_py() for g, r in rows], dtype=object)}
            batch = decode_crop_batch(raw, image_size=cfg.image_size, seed=cfg.seed, epoch=epoch,
                                      train=cfg.train, flip=cfg.flip, max_scale=cfg.max_scale,
                                      jpeg_draft=cfg.jpeg_draft)
            yield degrade_batch(batch, rmap=rmap, micro_batch=cfg.micro_batch, degrade_prob=cfg.degrade_prob,
                                seed=cfg.seed, epoch=epoch, train=cfg.train, fixed_t=cfg.fixed_t,
                                all_t=cfg.all_t, batch_index=int(batch_index), drop_partial=False)


def build_degraded_dataset(storage, name: str, split: str, cfg: ReaderConfig, rmap):
    """One row per micro-batch (images, degraded targets, t), for cfg.num_epochs epochs in sequence."""
    import ray.data

    if rmap.image_size != cfg.image_size:
        raise ValueError(f"ReaderConfig.image_size={cfg.image_size} but the resolution map is for "
                         f"{rmap.image_size} px")
    manifest = read_manifest_checked(storage, name, split)
    epochs = range(cfg.epoch, cfg.epoch + cfg.num_epochs)
    units = [u for e in epochs for u in plan_microbatches(manifest, cfg, e)]
    if not units:
        raise ValueError(f"{name}/{split} has fewer than micro_batch={cfg.micro_batch} images")
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(microbatch_task, batch_size=1, batch_format="numpy", num_cpus=cfg.num_cpus,
                        fn_kwargs={"storage": storage, "rmap": rmap, "cfg": cfg})
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
        from detailflow.models.tokenizer import to_model_range

        targets = to_model_range(images)
    else:
        targets = torch.from_numpy(np.frombuffer(raw, np.float32).reshape(b, 3, c, c).copy()).to(device)
    labels = torch.from_numpy(np.frombuffer(row["labels"][0], np.int32).astype(np.int64)).to(device)
    keys = str(row["keys"][0]).split("\n")
    return MicroBatch(images, targets, t, labels, keys, int(row["skipped"][0]))


def iter_microbatches(ds_or_shard, device="cpu", *, with_info: bool = False, stats: dict | None = None,
                      prefetch_batches: int = 2) -> Iterator:
    """Yield (images uint8 B x 3 x R x R, targets float B x 3 x c x c, t) per micro-batch, or the full
    MicroBatch with with_info=True. `stats` (if given) accumulates batches / images / skipped."""
    # whole blocks (one per Ray task, a few micro-batch rows each): iter_batches(batch_size=1) costs
    # ~0.2 s per row in Ray's batcher here, block iteration almost nothing
    for block in ds_or_shard.iter_batches(batch_size=None, batch_format="numpy",
                                          prefetch_batches=prefetch_batches):
        for i in range(len(block["t"])):
            mb = row_to_microbatch({k: v[i:i + 1] for k, v in block.items()}, device)
            if stats is not None:
                stats["batches"] = stats.get("batches", 0) + 1
                stats["images"] = stats.get("images", 0) + len(mb.keys)
                stats["skipped"] = stats.get("skipped", 0) + mb.skipped
            yield mb if with_info else (mb.images, mb.targets, mb.t)
