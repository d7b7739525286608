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
    ds = codes.shuffled_codes_dataset(storage, "tok-v3", "train", seed=0)   # training: see below
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

Training order (shuffled_codes_dataset): each execution of the dataset is one epoch e = first_epoch +
the execution index Ray Data keeps in DataContext._execution_idx (private, but the counter Ray's own
reseeding shuffles use; each pass over a Ray Train get_dataset_shard re-executes the dataset, and
tests/test_codes_mixing.py fails if a Ray upgrade stops advancing it). The read tasks keep
ONE view per image, view = h(seed, e, key) mod V, and give it the sort key h'(seed, e, key); Ray
Data's distributed sort then puts the epoch in that order: a uniform random permutation of the
images, fixed by (seed, e), different every epoch, computed worker-side (the driver only holds the
O(row groups) read units and the sort's boundary samples). So the views of one image never share a
micro-batch and micro-batch membership changes every epoch.

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
ROW_GROUP_ROWS = 8192  # rows per Parquet row group = per read task of a code shard


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
    pq.write_table(pa.table(cols), buf, row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


def write_code_shard(storage, prefix: str, *, keys, labels, views, clean, input, target,
                     name: str | None = None) -> dict:
    """Write one shard under `prefix` (atomic PUT, sha256 recorded); returns its manifest entry.
    Token arrays are n x N integers; the default name derives from the first row (shard_name)."""
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
    name = name or shard_name(str(keys[0]), int(views[0]))
    data = _encode(keys, labels, views, tokens)
    key = f"{prefix.rstrip('/')}/{name}"
    sha = storage.put_bytes(key, data)
    return {"name": name, "key": key, "sha256": sha, "rows": n, "bytes": len(data),
            "num_tokens": int(tokens["clean"].shape[1]), "num_views": int(np.max(views)) + 1,
            "row_groups": -(-n // ROW_GROUP_ROWS), "row_group_rows": ROW_GROUP_ROWS}


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
                meta: dict | None = None) -> dict:
    """Write rows {key, label, view, clean, input, target} as one new run of shards, then publish."""
    run = new_run_id()
    shards = []
    for start in range(0, len(rows["key"]), shard_rows):
        sl = slice(start, start + shard_rows)
        shards.append(write_code_shard(storage, run_prefix(version, split, run), keys=rows["key"][sl],
                                       labels=rows["label"][sl], views=rows["view"][sl],
                                       clean=rows["clean"][sl], input=rows["input"][sl],
                                       target=rows["target"][sl]))
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
        groups = s.get("row_groups") if s.get("row_group_rows") else None
        for g in range(groups) if groups else [-1]:  # -1: the whole shard
            units.append({"path": s["key"], "row_group": g, "bytes": int(s["bytes"])})
    return units


def view_choice(keys, seed: int, epoch: int, num_views: int) -> tuple[np.ndarray, np.ndarray]:
    """Per key: (chosen view in [0, num_views), int64 sort key), both from hash(seed, epoch, key)."""
    view, order = np.empty(len(keys), np.int64), np.empty(len(keys), np.int64)
    for i, k in enumerate(keys):
        h = hashlib.blake2b(f"{seed}\0{epoch}\0{k}".encode(), digest_size=16).digest()
        view[i] = int.from_bytes(h[:8], "little") % num_views
        order[i] = int.from_bytes(h[8:], "little") >> 1  # 63 bits: a non-negative int64
    return view, order


def _execution_epoch() -> int:
    """The Ray Data execution index of the running dataset: 0, 1, 2, ... per re-execution (epoch)."""
    from ray.data import DataContext

    return int(DataContext.get_current()._execution_idx)


def _filesystem(storage):
    from detailflow.platform.storage import cached_filesystem

    return cached_filesystem(storage)


def read_code_units(units: dict, *, storage, sample: dict | None = None) -> Iterator[dict]:
    """map_batches fn: read row groups (after checking the shard's size); with `sample`, keep one view
    per image for this execution's epoch and add its sort key."""
    import pyarrow.parquet as pq

    fs = _filesystem(storage)
    for path, group, size in zip(units["path"], units["row_group"], units["bytes"], strict=True):
        with fs.open_input_file(storage.fs_path(str(path))) as f:
            if f.size() != int(size):
                raise ShardSizeMismatch(
                    f"code shard {storage.uri(str(path))} is {f.size()} bytes but the manifest lists "
                    f"{int(size)} bytes: it was replaced or truncated after publishing; re-read the "
                    "current manifest or re-run extract-codes")
            pf = pq.ParquetFile(f)
            table = pf.read() if int(group) < 0 else pf.read_row_group(int(group))
        batch = {"key": np.asarray(table["key"].to_pylist(), dtype=object),
                 "label": table["label"].to_numpy(), "view": table["view"].to_numpy()}
        for c in TOKEN_COLUMNS:
            col = table[c].combine_chunks()  # flatten() honours slice offsets (.values would not)
            batch[c] = col.flatten().to_numpy().reshape(len(col), -1)
        if sample is None:
            yield batch
            continue
        per_pass = int(sample.get("epochs_per_pass", 1))
        first = sample["first_epoch"] + _execution_epoch() * per_pass
        for epoch in range(first, first + per_pass):
            view, order = view_choice(batch["key"], sample["seed"], epoch, sample["num_views"])
            keep = batch["view"] == view
            out = {k: v[keep] for k, v in batch.items()}
            out["order"] = order[keep]
            out["epoch"] = np.full(int(keep.sum()), epoch, np.int64)
            yield out


def read_codes_dataset(storage, version: str, split: str, num_cpus: float = 0.5,
                       manifest: dict | None = None):
    """Ray Dataset over exactly the shards the published pointer lists (every row, not shuffled).
    Pass `manifest` (one read earlier) to keep reading that version after the pointer moved on."""
    import ray.data

    units = _read_units(manifest or read_published_manifest(storage, version, split))
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    return ds.map_batches(read_code_units, batch_size=1, batch_format="numpy", num_cpus=num_cpus,
                          fn_kwargs={"storage": storage})


def epochs_per_pass(manifest: dict, min_images_per_pass: int) -> int:
    """Epochs chained into one pass (execution) so that a pass holds >= min_images_per_pass images."""
    images = max(1, int(manifest["num_rows"]) // max(1, int(manifest.get("num_views") or 1)))
    return max(1, -(-int(min_images_per_pass) // images))


def shuffled_codes_dataset(storage, version: str, split: str, seed: int, num_cpus: float = 0.5,
                           first_epoch: int = 0, epochs_per_pass: int = 1):
    """Training order: execution i holds epochs first_epoch + i*K ... + K - 1 (K = epochs_per_pass),
    each with one seeded view per image, sorted by (epoch, seeded hash), i.e. every epoch globally
    shuffled and the epochs in order; rows carry `epoch` (iter_code_batches uses it). K > 1 is for
    small sets: re-executing the dataset (task start-up, the sort) costs seconds, which a pass of a
    few steps would leave the trainers waiting for."""
    import ray.data

    if not hasattr(ray.data.DataContext.get_current(), "_execution_idx"):  # the epoch counter this relies on
        raise RuntimeError("this Ray Data version has no DataContext._execution_idx; per-epoch view "
                           "choice and shuffle need it (Ray >= 2.50)")
    manifest = read_published_manifest(storage, version, split)
    num_views = int(manifest.get("num_views") or {"tiny": 4, "tencrop": 10}.get(manifest.get("views"), 0))
    if num_views < 1:
        raise ValueError(f"codes {version}/{split}: the manifest does not say how many views per image")
    units = _read_units(manifest)
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(read_code_units, batch_size=1, batch_format="numpy", num_cpus=num_cpus,
                        fn_kwargs={"storage": storage, "sample": {"seed": int(seed), "num_views": num_views,
                                                                  "first_epoch": int(first_epoch),
                                                                  "epochs_per_pass": int(epochs_per_pass)}})
    ds = ds.sort(["epoch", "order"])
    # a training input: rank 0's Progress line is the progress; Ray Data's bars would interleave with it
    ds.context.enable_progress_bars = False
    return ds


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
