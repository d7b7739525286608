"""Code datasets for the AR stage: immutable runs of Parquet shards, published through a pointer manifest.

Usage:
    from detailflow.pipelines.data import codes
    run = codes.new_run_id()
    prefix = codes.run_prefix("tok-v3", "train", run)                 # codes/tok-v3/train/r-<run>
    entry = codes.write_code_shard(storage, prefix, keys=keys, labels=labels_B, views=views_B,
                                   clean=clean_BN, input=input_BN, target=target_BN)   # from any worker
    codes.publish_codes(storage, "tok-v3", "train", run, [entry, ...], meta={"views": "tiny"})
    codes.write_codes(storage, "tok-v3", "train", rows)               # all of it, for small row sets

    ds = codes.read_codes_dataset(storage, "tok-v3", "train")          # every row, not shuffled
    stream = CodeStream(storage, "tok-v3", "train", CodeStreamConfig(micro_batch=64), rank=r, world=w)
                                                                       # training: code_stream.py
    for b in codes.iter_code_batches(ds, batch_size=64, correction_prob=0.3, seed=0):
        b["input"], b["target"], b["label"]                            # LongTensors B x N, B

Layout (columns key (string), label (int32), view (int32), clean / input / target: fixed-size lists of
N int32 token ids, one row per image view):
    codes/<version>/<split>/r-<run>/part-<hash>.parquet   one extraction run's shards, never rewritten
    codes/<version>/<split>/r-<run>/_manifest.json        that run's manifest
    codes/<version>/<split>/_manifest.json                the POINTER, written last: full shard keys,
                                                          sizes, sha256; readers open only these keys
A re-extraction writes a new run beside the old one and then replaces the pointer, so a reader
holding the old manifest keeps reading intact shards. Every read task checks the size of the shard
it opens against the manifest (ShardSizeMismatch).

Inside a shard (LAYOUT "view-diagonal"): the images whose V views are all in the shard form blocks
of BLOCK_IMAGES images, and each block is V row groups; row group j of a block holds, for its image
at position p, view (p + j) mod V. Reading ONE row group of a block therefore gives every image of
the block exactly once, with views spread evenly over the block; an epoch of the training stream
picks j per block from (seed, epoch) and reads 1/V of the bytes (code_stream.py). Rows of images
whose views a shard boundary split (extraction's shard_rows not a multiple of V) go in one trailing
row group that only read_codes_dataset (every row) reads.

Self-correction selection (spec §2.3) is done HERE, per sample: with probability correction_prob the
pair is (input, target), otherwise (clean, clean). The draw is a hash of (seed, epoch, key, view),
so it does not depend on worker scheduling; `clean` is also returned for diagnostics.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from collections.abc import Iterator

import numpy as np

FORMAT = "detailflow.codes/v2"
TOKEN_COLUMNS = ("clean", "input", "target")
LAYOUT = "view-diagonal/v1"  # shard layout the training stream reads (diagonal_order)
BLOCK_IMAGES = 256  # images per block at most: its V row groups hold one view of each of its images
MIN_BLOCKS = 16  # blocks per shard at least (a small code set still gives every rank its own blocks)


class ShardSizeMismatch(RuntimeError):
    """A code shard on S3 is not the object its manifest describes (replaced or truncated)."""


def codes_prefix(version: str, split: str) -> str:
    """Where the pointer manifest of a code set lives."""
    return f"codes/{version}/{split}"


def run_prefix(version: str, split: str, run: str) -> str:
    return f"{codes_prefix(version, split)}/r-{run}"


def new_run_id() -> str:
    """A fresh id per extraction (UTC time, sortable, + random suffix). Not a hash of the config:
    `--force` re-runs the SAME config, and its shards must not land on the keys the published pointer
    still lists (a config hash would reuse them and overwrite shards a reader may be reading)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def shard_name(first_key: str, first_view: int) -> str:
    """Deterministic, unique per shard: (key, view) identifies a row and each row is in one shard."""
    digest = hashlib.blake2b(f"{first_key}\0{int(first_view)}".encode(), digest_size=8).hexdigest()
    return f"part-{digest}.parquet"


def diagonal_order(keys, views, num_views: int, block_images: int) -> tuple[np.ndarray, list[int], int]:
    """Row order of the view-diagonal layout. Images with all `num_views` views in the shard ("complete",
    in first-appearance order) form blocks of block_images images; row group (b, j) of block b holds,
    for the image at position p of the block, its view (p + j) mod V. Returns (row order, rows per row
    group, complete images); rows of incomplete images (views split across two shards) follow in one
    trailing row group that the training stream never reads."""
    keys = [str(k) for k in keys]
    views = np.asarray(views, np.int64)
    if views.size and (views.min() < 0 or views.max() >= num_views):
        raise ValueError(f"view ids must lie in [0, {num_views}), got {views.min()}..{views.max()}")
    first: dict[str, dict[int, int]] = {}
    for i, (k, v) in enumerate(zip(keys, views.tolist(), strict=True)):
        if v in first.setdefault(k, {}):
            raise ValueError(f"image {k!r} has view {v} twice in one shard")
        first[k][v] = i
    complete = [rows for rows in first.values() if len(rows) == num_views]
    order, sizes = [], []
    for b in range(0, len(complete), block_images):
        block = complete[b:b + block_images]
        for j in range(num_views):
            order += [rows[(p + j) % num_views] for p, rows in enumerate(block)]
            sizes.append(len(block))
    rest = [i for rows in first.values() if len(rows) != num_views for i in rows.values()]
    if rest:
        order += rest
        sizes.append(len(rest))
    return np.asarray(order, np.int64), sizes, len(complete)


def _encode(keys, labels, views, tokens: dict[str, np.ndarray], order: np.ndarray, sizes: list[int]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_tok = tokens["clean"].shape[1]
    cols = {"key": pa.array([str(keys[i]) for i in order], pa.string()),
            "label": pa.array(np.asarray(labels, np.int32)[order]),
            "view": pa.array(np.asarray(views, np.int32)[order])}
    for name in TOKEN_COLUMNS:
        flat = pa.array(np.ascontiguousarray(tokens[name][order], np.int32).reshape(-1))
        cols[name] = pa.FixedSizeListArray.from_arrays(flat, n_tok)
    table = pa.table(cols)
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema) as writer:
        start = 0
        for n in sizes:  # one write per row group: the layout's unit of reading
            writer.write_table(table.slice(start, n), row_group_size=n)
            start += n
    return buf.getvalue()


def write_code_shard(storage, prefix: str, *, keys, labels, views, clean, input, target,
                     name: str | None = None, num_views: int | None = None,
                     block_images: int | None = None) -> dict:
    """Write one shard under `prefix` (atomic PUT, sha256 recorded) in the view-diagonal layout
    (diagonal_order); returns its manifest entry. Token arrays are n x N integers; the default name
    derives from the first row (shard_name); num_views defaults to max(views) + 1; block_images to
    BLOCK_IMAGES, less for a small shard so that it holds MIN_BLOCKS blocks."""
    tokens = {"clean": np.asarray(clean), "input": np.asarray(input), "target": np.asarray(target)}
    n = len(keys)
    if n == 0:
        raise ValueError("a code shard needs at least one row")
    for tname, arr in tokens.items():
        if arr.ndim != 2 or arr.shape[0] != n or arr.shape != tokens["clean"].shape:
            raise ValueError(f"{tname}: expected {n} x N token ids like `clean`, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{tname}: token ids must be non-negative int32")
    if len(labels) != n or len(views) != n:
        raise ValueError(f"keys/labels/views lengths differ: {n}/{len(labels)}/{len(views)}")
    num_views = int(num_views or int(np.max(views)) + 1)
    if block_images is None:
        block_images = min(BLOCK_IMAGES, max(1, -(-n // num_views // MIN_BLOCKS)))
    if block_images < 1:
        raise ValueError(f"block_images must be >= 1, got {block_images}")
    name = name or shard_name(str(keys[0]), int(views[0]))
    order, sizes, images = diagonal_order(keys, views, num_views, block_images)
    data = _encode(keys, labels, views, tokens, order, sizes)
    key = f"{prefix.rstrip('/')}/{name}"
    sha = storage.put_bytes(key, data)
    blocks = -(-images // block_images)
    return {"name": name, "key": key, "sha256": sha, "rows": n, "bytes": len(data),
            "num_tokens": int(tokens["clean"].shape[1]), "num_views": num_views,
            "layout": LAYOUT, "images": images, "block_images": block_images, "blocks": blocks,
            "row_groups": len(sizes), "partial_rows": n - images * num_views}


def _manifest(version: str, split: str, run: str, shards: list[dict], base: str, meta: dict | None) -> dict:
    widths = {s["num_tokens"] for s in shards}
    if len(widths) > 1:
        raise ValueError(f"shards disagree on the number of tokens: {sorted(widths)}")
    return {"format": FORMAT, "version": version, "split": split, "run": run,
            "run_prefix": run_prefix(version, split, run),
            "num_rows": sum(s["rows"] for s in shards), "num_tokens": widths.pop() if widths else None,
            "num_views": max((s.get("num_views", 1) for s in shards), default=0),
            "shards": shards,
            # `files` is what Storage.publish_manifest checks exists, relative to the manifest's prefix
            "files": {s["key"][len(base) + 1:]: {"sha256": s["sha256"], "size": s["bytes"]} for s in shards},
            **(meta or {})}


def publish_codes(storage, version: str, split: str, run: str, shards: list[dict],
                  meta: dict | None = None) -> dict:
    """After every shard of `run` exists: its own manifest, then LAST the pointer to it."""
    shards = sorted(shards, key=lambda s: s["key"])
    own = run_prefix(version, split, run)
    if not shards or any(not s["key"].startswith(own + "/") for s in shards):
        raise ValueError(f"publish needs the shards of run {run} (keys under {own}/), got {len(shards)}")
    storage.publish_manifest(own, _manifest(version, split, run, shards, own, meta))
    pointer = _manifest(version, split, run, shards, codes_prefix(version, split), meta)
    storage.publish_manifest(codes_prefix(version, split), pointer)
    return pointer


def write_codes(storage, version: str, split: str, rows: dict, shard_rows: int = 65536,
                meta: dict | None = None, block_images: int | None = None) -> dict:
    """Write rows {key, label, view, clean, input, target} as one new run of shards, then publish."""
    run = new_run_id()
    num_views = int(np.max(rows["view"])) + 1
    shards = []
    for start in range(0, len(rows["key"]), shard_rows):
        sl = slice(start, start + shard_rows)
        shards.append(write_code_shard(storage, run_prefix(version, split, run), keys=rows["key"][sl],
                                       labels=rows["label"][sl], views=rows["view"][sl],
                                       clean=rows["clean"][sl], input=rows["input"][sl],
                                       target=rows["target"][sl], num_views=num_views,
                                       block_images=block_images))
    return publish_codes(storage, version, split, run, shards, meta)


def read_published_manifest(storage, version: str, split: str) -> dict:
    prefix = codes_prefix(version, split)
    manifest = storage.read_manifest(prefix)
    if manifest is None:
        raise FileNotFoundError(f"codes {storage.uri(prefix)} are not published (no _manifest.json); "
                                "run the extract-codes stage first")
    if not manifest["shards"]:
        raise ValueError(f"codes {storage.uri(prefix)} have no shards")
    return manifest


def _read_units(manifest: dict) -> list[dict]:
    """(shard key, row group, shard bytes): O(row groups) small dicts, the only per-shard driver state."""
    units = []
    for s in manifest["shards"]:
        groups = s.get("row_groups")
        for g in range(groups) if groups else [-1]:  # -1: the whole shard
            units.append({"path": s["key"], "row_group": g, "bytes": int(s["bytes"])})
    return units


def _filesystem(storage):
    from detailflow.platform.storage import cached_filesystem

    return cached_filesystem(storage)


def read_code_units(units: dict, *, storage) -> Iterator[dict]:
    """map_batches fn: read row groups (after checking the shard's size), every row."""
    for path, group, size in zip(units["path"], units["row_group"], units["bytes"], strict=True):
        yield table_to_batch(read_code_table(storage, str(path), int(group), int(size)))


def read_code_table(storage, path: str, group: int, size: int):
    """One row group (-1: the whole shard) of a code shard, after checking the shard's size."""
    import pyarrow.parquet as pq

    with _filesystem(storage).open_input_file(storage.fs_path(path)) as f:
        if f.size() != int(size):
            raise ShardSizeMismatch(
                f"code shard {storage.uri(path)} is {f.size()} bytes but the manifest lists "
                f"{int(size)} bytes: it was replaced or truncated after publishing; re-read the "
                "current manifest or re-run extract-codes")
        pf = pq.ParquetFile(f)
        return pf.read() if group < 0 else pf.read_row_group(group)


def table_to_batch(table) -> dict:
    """Arrow table of code rows -> numpy batch {key (object), label, view, clean/input/target n x N}."""
    batch = {"key": np.asarray(table["key"].to_pylist(), dtype=object),
             "label": table["label"].to_numpy(), "view": table["view"].to_numpy()}
    for c in TOKEN_COLUMNS:
        col = table[c].combine_chunks()  # flatten() honours slice offsets (.values would not)
        batch[c] = col.flatten().to_numpy().reshape(len(col), -1)
    return batch


def read_codes_dataset(storage, version: str, split: str, num_cpus: float = 0.5,
                       manifest: dict | None = None):
    """Ray Dataset over exactly the shards the published pointer lists (every row, not shuffled).
    Pass `manifest` (one read earlier) to keep reading that version after the pointer moved on."""
    import ray.data

    units = _read_units(manifest or read_published_manifest(storage, version, split))
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    return ds.map_batches(read_code_units, batch_size=1, batch_format="numpy", num_cpus=num_cpus,
                          fn_kwargs={"storage": storage})


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
    """Yield torch batches {input, target, clean, label, view, corrected} (see select_pairs). A dataset
    with an `epoch` column (shuffled_codes_dataset) draws the pairs with that epoch, else `epoch`."""
    import torch

    shuffle_seed = None if shuffle_buffer is None else seed + epoch
    for batch in ds_or_shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                                          local_shuffle_buffer_size=shuffle_buffer,
                                          local_shuffle_seed=shuffle_seed):
        ep = int(batch["epoch"][0]) if "epoch" in batch and len(batch["epoch"]) else epoch
        sel = select_pairs(batch, correction_prob, seed, ep)
        yield {k: torch.from_numpy(v).to(device) for k, v in sel.items()}
