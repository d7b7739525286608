"""Stage: extract self-correction code triplets with a frozen tokenizer (Ray Data actor pool).

Usage:
    detailflow extract-codes --tokenizer tokenizer-tiny-2026-11-28-1a2b3c4d --dataset shapes
    detailflow extract-codes --tokenizer s3://detailflow/runs/<run>/export --dataset imagenet --views tencrop

    from detailflow.pipelines.extract_codes import ExtractConfig, extract_codes
    info = extract_codes(ExtractConfig(tokenizer=run, dataset="shapes"), settings)

Reads the dataset's images (centre crop, no flip), and in `map_batches` actors that each hold the
frozen tokenizer (one GPU per actor on GPU nodes, a CPU fraction here) makes the views of spec §2.3
(`tencrop`: 10 views; `tiny`: 4) and calls `extract_triplets`: clean / input / target codes, one
perturbation span per image shared by its views. Rows (one per image view) are written as code shards
under s3://<bucket>/codes/<tokenizer run>/<split>/ and the manifest is published last. Resumable: a
published manifest means done (nothing is recomputed); an interrupted run rewrites its shards (same
names) and publishes at the end.
"""

from __future__ import annotations

import hashlib
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
    shard_rows: int = 65536  # code rows per Parquet shard
    seed: int = 0  # perturbation-span / noisy-code seed (hashed with each batch's first key)
    version: str = ""  # codes version (default: the tokenizer run name)
    force: bool = False  # re-extract even if the manifest is already published


class TripletExtractor:
    """Ray Data actor: loads the frozen tokenizer once, maps image batches to code rows."""

    def __init__(self, settings, tokenizer_ref: str, views: str, seed: int, use_gpu: bool):
        import torch

        from detailflow.pipelines.exports import load_tokenizer
        from detailflow.platform.storage import Storage

        torch.set_num_threads(1)
        self.device = "cuda" if use_gpu else "cpu"
        self.tokenizer, _ = load_tokenizer(Storage(settings), tokenizer_ref, device=self.device)
        self.views, self.seed = views, seed

    def __call__(self, batch: dict) -> dict:
        import torch

        from detailflow.models.extraction import extract_triplets
        from detailflow.models.tokenizer import to_model_range

        keys = [str(k) for k in batch["key"]]
        img = to_model_range(torch.from_numpy(np.stack(list(batch["image"]))))
        digest = hashlib.blake2b(f"{self.seed}\0{keys[0]}".encode(), digest_size=8).digest()
        rng = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        out = extract_triplets(self.tokenizer, img.to(self.device), rng, views=self.views)
        b, v, _ = out["clean"].shape
        rows = {name: out[name].reshape(b * v, -1).numpy().astype(np.int32)
                for name in ("clean", "input", "target")}
        rows["key"] = np.repeat(np.asarray(keys, dtype=object), v)
        rows["label"] = np.repeat(np.asarray(batch["label"], np.int32), v)
        rows["view"] = out["view"].reshape(-1).numpy().astype(np.int32)
        return rows


def extract_codes(cfg: ExtractConfig, settings) -> dict:
    """Run the extraction; returns {version, prefix, num_rows, skipped}."""
    import ray.data

    from detailflow.pipelines.data.codes import codes_prefix, publish_codes_manifest, write_code_shard
    from detailflow.pipelines.data.reader import ReaderConfig, build_image_dataset
    from detailflow.pipelines.exports import load_tokenizer, resolve_export
    from detailflow.platform.storage import Storage

    storage = Storage(settings)
    key, version = resolve_export(storage, cfg.tokenizer)
    version = cfg.version or version
    prefix = codes_prefix(version, cfg.split)
    done = storage.read_manifest(prefix)
    if done is not None and not cfg.force:
        return {"version": version, "prefix": prefix, "num_rows": done["num_rows"], "skipped": True}
    tokenizer, tok_config = load_tokenizer(storage, cfg.tokenizer)
    tok_cfg = tokenizer.cfg
    reader = ReaderConfig(image_size=tok_cfg.image_size, train=False, flip=False, seed=cfg.seed,
                          preserve_order=True)
    images = build_image_dataset(storage, cfg.dataset, cfg.split, reader)
    resources = {"num_gpus": 1} if cfg.use_gpu else {"num_cpus": cfg.cpus_per_actor}
    rows = images.map_batches(
        TripletExtractor, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        fn_constructor_kwargs={"settings": settings, "tokenizer_ref": storage.uri(key), "views": cfg.views,
                               "seed": cfg.seed, "use_gpu": cfg.use_gpu},
        **resources)
    shards, total = [], 0
    for i, batch in enumerate(rows.iter_batches(batch_size=cfg.shard_rows, batch_format="numpy")):
        tokens = {c: np.stack(list(batch[c])) for c in ("clean", "input", "target")}
        shards.append(write_code_shard(storage, version, cfg.split, i, keys=list(batch["key"]),
                                       labels=batch["label"], views=batch["view"], **tokens))
        total += len(batch["key"])
    if not shards:
        raise ValueError(f"dataset {cfg.dataset}/{cfg.split} produced no rows to extract")
    publish_codes_manifest(storage, version, cfg.split, shards,
                           meta={"codebook_size": tok_cfg.codebook_size, "views": cfg.views,
                                 "tokenizer": storage.uri(key), "dataset": cfg.dataset,
                                 "group_size": tok_cfg.group_size, "seed": cfg.seed})
    return {"version": version, "prefix": prefix, "num_rows": total, "skipped": False,
            "tokenizer_run": tok_config.get("run_name")}
