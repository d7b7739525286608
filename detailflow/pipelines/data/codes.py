"""Code datasets for the AR stage: Parquet shards of token ids, published with `_manifest.json` LAST.

Usage:
    from detailflow.pipelines.data import codes
    entry = codes.write_code_shard(storage, "tok-v3", "train", 0, keys=keys, labels=labels_B,
                                   views=views_B, clean=clean_BN, input=input_BN, target=target_BN)
    codes.publish_codes_manifest(storage, "tok-v3", "train", [entry, ...], meta={"num_tokens": 32})
    codes.write_codes(storage, "tok-v3", "train", rows)               # both steps, any number of rows

    ds = codes.read_codes_dataset(storage, "tok-v3", "train")          # ray.data.Dataset
    for b in codes.iter_code_batches(ds, batch_size=64, correction_prob=0.3, seed=0):
        b["input"], b["target"], b["label"]                            # LongTensors B x N, B

Layout: s3://<bucket>/codes/<tokenizer-version>/<split>/part-NNNNN.parquet, columns key (string),
label (int32), view (int32), clean / input / target (fixed-size lists of N int32 token ids).

Self-correction selection (spec §2.3) is done HERE, per sample: with probability correction_prob the
pair is (input, target), otherwise (clean, clean). The draw is a hash of (seed, epoch, key, view),
so it does not depend on worker scheduling; `clean` is also returned for diagnostics.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

import numpy as np

FORMAT = "detailflow.codes/v1"
TOKEN_COLUMNS = ("clean", "input", "target")


def codes_prefix(version: str, split: str) -> str:
    return f"codes/{version}/{split}"


def _encode(keys, labels, views, tokens: dict[str, np.ndarray]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_tok = tokens["clean"].shape[1]
    cols = {"key": pa.array([str(k) for k in keys], pa.string()),
            "label": pa.array(np.asarray(labels, np.int32)),
            "view": pa.array(np.asarray(views, np.int32))}
    for name in TOKEN_COLUMNS:
        flat = pa.array(np.ascontiguousarray(tokens[name], np.int32).reshape(-1))
        cols[name] = pa.FixedSizeListArray.from_arrays(flat, n_tok)
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, row_group_size=8192)
    return buf.getvalue()


def write_code_shard(storage, version: str, split: str, index: int, *, keys, labels, views, clean, input,
                     target) -> dict:
    """Write one shard (atomic PUT); returns its manifest entry. Token arrays are n x N integers."""
    tokens = {"clean": np.asarray(clean), "input": np.asarray(input), "target": np.asarray(target)}
    n = len(keys)
    for name, arr in tokens.items():
        if arr.ndim != 2 or arr.shape[0] != n or arr.shape != tokens["clean"].shape:
            raise ValueError(f"{name}: expected {n} x N token ids like `clean`, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{name}: token ids must be non-negative int32")
    if len(labels) != n or len(views) != n:
        raise ValueError(f"keys/labels/views lengths differ: {n}/{len(labels)}/{len(views)}")
    name = f"part-{index:05d}.parquet"
    data = _encode(keys, labels, views, tokens)
    sha = storage.put_bytes(f"{codes_prefix(version, split)}/{name}", data)
    return {"name": name, "key": f"{codes_prefix(version, split)}/{name}", "sha256": sha, "rows": n,
            "bytes": len(data), "num_tokens": int(tokens["clean"].shape[1])}


def publish_codes_manifest(storage, version: str, split: str, shards: list[dict],
                           meta: dict | None = None) -> dict:
    """Write `_manifest.json` after every shard exists (Storage.publish_manifest checks `files`)."""
    shards = sorted(shards, key=lambda s: s["name"])
    widths = {s["num_tokens"] for s in shards}
    if len(widths) > 1:
        raise ValueError(f"shards disagree on the number of tokens: {sorted(widths)}")
    manifest = {"format": FORMAT, "version": version, "split": split,
                "num_rows": sum(s["rows"] for s in shards), "num_tokens": widths.pop() if widths else None,
                "shards": shards,
                "files": {s["name"]: {"sha256": s["sha256"], "size": s["bytes"]} for s in shards},
                **(meta or {})}
    storage.publish_manifest(codes_prefix(version, split), manifest)
    return manifest


def write_codes(storage, version: str, split: str, rows: dict, shard_rows: int = 65536,
                meta: dict | None = None) -> dict:
    """Write rows {key, label, view, clean, input, target} as shards of shard_rows, then the manifest."""
    n = len(rows["key"])
    shards = []
    for i, start in enumerate(range(0, n, shard_rows)):
        sl = slice(start, start + shard_rows)
        shards.append(write_code_shard(storage, version, split, i, keys=rows["key"][sl],
                                       labels=rows["label"][sl], views=rows["view"][sl],
                                       clean=rows["clean"][sl],
                                       input=rows["input"][sl], target=rows["target"][sl]))
    return publish_codes_manifest(storage, version, split, shards, meta)


def read_codes_dataset(storage, version: str, split: str, num_cpus: float = 0.5):
    """Ray Dataset over exactly the shards the published manifest lists."""
    import ray.data

    prefix = codes_prefix(version, split)
    manifest = storage.read_manifest(prefix)
    if manifest is None:
        raise FileNotFoundError(f"codes {storage.uri(prefix)} are not published (no _manifest.json); "
                                "run the extract-codes stage first")
    if not manifest["shards"]:
        raise ValueError(f"codes {storage.uri(prefix)} have no shards")
    paths = [storage.fs_path(s["key"]) for s in manifest["shards"]]
    return ray.data.read_parquet(paths, filesystem=storage.filesystem(), partitioning=None, num_cpus=num_cpus)


def _as_matrix(col) -> np.ndarray:
    """Token column of a numpy batch (2-D array, or object array of 1-D arrays) -> int64 n x N."""
    arr = np.asarray(col)
    if arr.dtype == object:
        arr = np.stack([np.asarray(x) for x in arr]) if len(arr) else np.zeros((0, 0))
    return arr.astype(np.int64)


def correction_mask(keys, views, seed: int, epoch: int, prob: float) -> np.ndarray:
    """Per-sample Bernoulli(prob) from a hash of (seed, epoch, key, view): scheduling-independent."""
    out = np.empty(len(keys), bool)
    for i, (k, v) in enumerate(zip(keys, views, strict=True)):
        h = hashlib.blake2b(f"{seed}\0{epoch}\0{k}\0{int(v)}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") / 2.0**64 < prob
    return out


def select_pairs(batch: dict, correction_prob: float, seed: int, epoch: int = 0) -> dict:
    """numpy batch -> {input, target, clean: int64 B x N; label, view: int64 B; corrected: bool B}."""
    clean, inp, tgt = (_as_matrix(batch[c]) for c in TOKEN_COLUMNS)
    use = correction_mask(batch["key"], batch["view"], seed, epoch, correction_prob)
    return {"input": np.where(use[:, None], inp, clean), "target": np.where(use[:, None], tgt, clean),
            "clean": clean, "label": np.asarray(batch["label"], np.int64),
            "view": np.asarray(batch["view"], np.int64), "corrected": use}


def iter_code_batches(ds_or_shard, batch_size: int, correction_prob: float, seed: int, *, epoch: int = 0,
                      drop_last: bool = True, device="cpu",
                      shuffle_buffer: int | None = None) -> Iterator[dict]:
    """Yield torch batches {input, target, clean, label, view, corrected} (see select_pairs)."""
    import torch

    shuffle_seed = None if shuffle_buffer is None else seed + epoch
    for batch in ds_or_shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                                          local_shuffle_buffer_size=shuffle_buffer,
                                          local_shuffle_seed=shuffle_seed):
        sel = select_pairs(batch, correction_prob, seed, epoch)
        yield {k: torch.from_numpy(v).to(device) for k, v in sel.items()}
