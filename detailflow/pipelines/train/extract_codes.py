"""Stage: extract self-correction code triplets with a frozen tokenizer (Ray Data actor pool).

Usage:
    detailflow extract-codes --tokenizer tokenizer-tiny-2026-11-28-1a2b3c4d --dataset shapes
    detailflow extract-codes --tokenizer s3://detailflow/runs/<run>/export --dataset imagenet --views tencrop

    from detailflow.pipelines.train.extract_codes import ExtractConfig, extract_codes
    info = extract_codes(ExtractConfig(tokenizer=run, dataset="shapes"), settings)

Pipeline (all data moves worker -> S3; the driver holds O(row groups + shards) small dicts):
1. read tasks, one per dataset row group: the ORIGINAL encoded bytes -> decode_rgb -> ADM centre crop
   (adm_center_crop: box-halving, then bicubic) to int(1.1 R) for `tencrop` (spec §2.3: TenCrop R is
   cut from that crop of the original) or to R for `tiny`; undecodable images are skipped, counted;
2. `map_batches` actors that each hold the frozen tokenizer (one GPU per actor on GPU nodes, a CPU
   fraction here) make the views (`tencrop`: 10, `tiny`: 4) and call `extract_triplets`: clean /
   input / target codes, one perturbation span per image shared by its views;
3. write tasks take shard_rows code rows each, PUT one shard (write_code_shard: sha256 recorded) under
   s3://<bucket>/codes/<version>/<split>/r-<run>/ and return only its manifest entry;
4. the driver collects the entries and publishes the run's manifest, then LAST the pointer
   codes/<version>/<split>/_manifest.json (see data/codes.py).
A published pointer means done (nothing is recomputed) unless force; an interrupted or forced run
writes a NEW run prefix (fresh run id), so shards the published pointer lists are never overwritten.
Row order is preserved through the pipeline, so a given (dataset, tokenizer, seed, batch_size) gives
the same codes on every run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class ExtractConfig:
    tokenizer: str  # tokenizer run name or s3:// export URI
    dataset: str  # dataset name under s3://<bucket>/datasets/
    split: str = "train"  # split to extract
    views: str = "tiny"  # "tiny" (4 views, spec §6.3) or "tencrop" (10 views, spec §2.3)
    batch_size: int = 64  # images per actor call
    num_actors: int = 1  # actor-pool size (one GPU each when use_gpu)
    use_gpu: bool = False  # one GPU per actor
    cpus_per_actor: float = 0.5  # fractional CPU per actor on CPU machines
    cpus_per_task: float = 0.5  # fractional CPU per decode / write task
    shard_rows: int = 65536  # code rows per Parquet shard (one write task each)
    seed: int = 0  # perturbation-span / noisy-code seed (hashed with each batch's first key)
    version: str = ""  # codes version (default: the tokenizer run name)
    force: bool = False  # re-extract even if the manifest is already published


def adm_center_crop(img, side: int) -> np.ndarray:
    """The ADM centre crop (guided-diffusion `center_crop_arr`, which the public extraction uses):
    BOX-resize to floor(size / 2) while the short side is >= 2 * side, bicubic to short side `side`,
    centre crop -> uint8 3 x side x side. Not images.center_crop: its reduce(2) rounds odd sizes up
    and averages with integer rounding, so on e.g. a 500 x 375 original its pixels differ from ADM's."""
    from PIL import Image

    while min(*img.size) >= 2 * side:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = side / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    arr = np.asarray(img.crop((left, top, left + side, top + side)), dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_originals(units: dict, *, storage, side: int) -> Iterator[dict]:
    """map_batches fn over dataset units: encoded originals -> ADM centre crops, uint8 n x 3 x side x side.
    `skipped` counts images that failed to decode (on the unit's first row; summed downstream)."""
    from detailflow.pipelines.data.images import DecodeError, decode_rgb
    from detailflow.pipelines.data.reader import read_unit_table

    for path, group, size in zip(units["path"], units["row_group"], units["bytes"], strict=True):
        table = read_unit_table(storage, str(path), int(group), int(size))
        keys, labels, crops = [], [], []
        for key, label, data in zip(table["key"].to_pylist(), table["label"].to_pylist(),
                                    table["image"].to_pylist(), strict=True):
            try:
                img = decode_rgb(data)  # full decode: no JPEG draft scaling, the crop sees the original
            except DecodeError:
                continue
            keys.append(str(key))
            labels.append(int(label))
            crops.append(adm_center_crop(img, side))
        skipped = np.zeros(len(keys), np.int64)
        if len(keys):
            skipped[0] = table.num_rows - len(keys)
        yield {"key": np.asarray(keys, dtype=object), "label": np.asarray(labels, np.int32),
               "image": np.stack(crops) if crops else np.zeros((0, 3, side, side), np.uint8),
               "skipped": skipped}


class TripletExtractor:
    """Ray Data actor: loads the frozen tokenizer once, maps image batches to code rows."""

    def __init__(self, settings, tokenizer_ref: str, views: str, seed: int, use_gpu: bool):
        import torch

        from detailflow.pipelines.train.exports import load_tokenizer
        from detailflow.platform.storage import Storage

        torch.set_num_threads(1)
        self.device = "cuda" if use_gpu else "cpu"
        self.tokenizer, _ = load_tokenizer(Storage(settings), tokenizer_ref, device=self.device)
        self.views, self.seed = views, seed

    def __call__(self, batch: dict) -> dict:
        import torch

        from detailflow.models.extraction import extract_triplets

        keys = [str(k) for k in batch["key"]]
        img = torch.from_numpy(np.ascontiguousarray(batch["image"], dtype=np.uint8))
        digest = hashlib.blake2b(f"{self.seed}\0{keys[0]}".encode(), digest_size=8).digest()
        rng = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        out = extract_triplets(self.tokenizer, img.to(self.device), rng, views=self.views)
        b, v, _ = out["clean"].shape
        rows = {name: out[name].reshape(b * v, -1).numpy().astype(np.int32)
                for name in ("clean", "input", "target")}
        rows["key"] = np.repeat(np.asarray(keys, dtype=object), v)
        rows["label"] = np.repeat(np.asarray(batch["label"], np.int32), v)
        rows["view"] = out["view"].reshape(-1).numpy().astype(np.int32)
        rows["skipped"] = np.zeros(b * v, np.int64)
        rows["skipped"][0] = int(np.sum(batch["skipped"]))  # decode failures ride to the write task
        return rows


def shard_batch_rows(shard_rows: int, views: str) -> int:
    """Rows per write task: shard_rows rounded down to whole images (V rows each, at least one image),
    so no image's views are split across two shards (the stream never reads a split image's rows)."""
    from detailflow.models.extraction import num_views

    v = num_views(views)
    return max(v, shard_rows - shard_rows % v)


def write_shards(batch: dict, *, storage, prefix: str) -> dict:
    """map_batches fn: one batch of code rows -> one shard on S3 -> one manifest-entry row."""
    from detailflow.pipelines.data.codes import write_code_shard

    entry = write_code_shard(storage, prefix, keys=[str(k) for k in batch["key"]], labels=batch["label"],
                             views=batch["view"], clean=batch["clean"], input=batch["input"],
                             target=batch["target"])
    entry["skipped"] = int(np.sum(batch["skipped"]))
    return {k: np.asarray([v], dtype=object if isinstance(v, str) else None) for k, v in entry.items()}


def extract_codes(cfg: ExtractConfig, settings) -> dict:
    """Run the extraction; returns {version, prefix, run, num_rows, num_images, skipped_images, skipped}."""
    import ray.data

    from detailflow.models.extraction import view_input_size
    from detailflow.pipelines.data.codes import codes_prefix, new_run_id, publish_codes, run_prefix
    from detailflow.pipelines.data.reader import read_manifest_checked, read_units
    from detailflow.pipelines.train.exports import load_tokenizer, resolve_export
    from detailflow.platform.storage import Storage

    storage = Storage(settings)
    key, version = resolve_export(storage, cfg.tokenizer)
    version = cfg.version or version
    prefix = codes_prefix(version, cfg.split)
    done = storage.read_manifest(prefix)
    if done is not None and not cfg.force:
        return {"version": version, "prefix": prefix, "run": done.get("run"), "num_rows": done["num_rows"],
                "skipped": True}
    tokenizer, tok_config = load_tokenizer(storage, cfg.tokenizer)
    tok_cfg = tokenizer.cfg
    side = view_input_size(cfg.views, tok_cfg.image_size)
    units = read_units(read_manifest_checked(storage, cfg.dataset, cfg.split))
    run = new_run_id()
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    images = ds.map_batches(decode_originals, batch_size=1, batch_format="numpy", num_cpus=cfg.cpus_per_task,
                            fn_kwargs={"storage": storage, "side": side})
    resources = {"num_gpus": 1} if cfg.use_gpu else {"num_cpus": cfg.cpus_per_actor}
    rows = images.map_batches(
        TripletExtractor, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        fn_constructor_kwargs={"settings": settings, "tokenizer_ref": storage.uri(key), "views": cfg.views,
                               "seed": cfg.seed, "use_gpu": cfg.use_gpu},
        **resources)
    written = rows.map_batches(write_shards, batch_size=shard_batch_rows(cfg.shard_rows, cfg.views),
                               batch_format="numpy",
                               num_cpus=cfg.cpus_per_task,
                               fn_kwargs={"storage": storage, "prefix": run_prefix(version, cfg.split, run)})
    # same order in, same actor batches, same codes out: extraction is reproducible
    written.context.execution_options.preserve_order = True
    shards = [{k: (v.item() if hasattr(v, "item") else v) for k, v in e.items()} for e in written.take_all()]
    if not shards:
        raise ValueError(f"dataset {cfg.dataset}/{cfg.split} produced no rows to extract")
    skipped = sum(s.pop("skipped") for s in shards)
    num_views = max(s["num_views"] for s in shards)
    manifest = publish_codes(storage, version, cfg.split, run, shards, meta={
        "codebook_size": tok_cfg.codebook_size, "views": cfg.views, "tokenizer": storage.uri(key),
        "dataset": cfg.dataset, "group_size": tok_cfg.group_size, "seed": cfg.seed,
        "num_images": sum(s["rows"] for s in shards) // num_views, "skipped_images": skipped})
    return {"version": version, "prefix": prefix, "run": run, "num_rows": manifest["num_rows"],
            "num_images": manifest["num_images"], "skipped_images": skipped, "skipped": False,
            "tokenizer_run": tok_config.get("run_name")}
