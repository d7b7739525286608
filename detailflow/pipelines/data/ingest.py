"""Ingest an image collection into an immutable, versioned set of Parquet shards on S3.

Usage:
    detailflow data ingest /data/imagenet --name imagenet --split train          # train/<wnid>/*.JPEG
    detailflow data ingest /data/imagenet --name imagenet --split val --labels val_labels.txt
    detailflow data ingest s3://raw/imagenet-tars --name imagenet --split train --shard-mb 256

    from detailflow.pipelines.data.ingest import IngestConfig, ingest
    manifest = ingest(storage, "/tmp/shapes", IngestConfig(name="shapes", split="train"))

Output: s3://<bucket>/datasets/<name>/<split>/v-<version>/part-NNNNN.parquet with columns key
(string), label (int32), image (binary, the original encoded bytes), width, height (int32).

Versions: <version> is a short hash of everything that decides the shards' bytes (every shard's
key digest, which covers key, size and mtime/ETag of each file; row_group_rows; FORMAT; the class
list; the listing-time rejections). The same input therefore resumes into the same prefix, and a
different input writes a new prefix and never touches files that an existing manifest points to.
Publish order: shards + `_done/` markers, then `v-<version>/_manifest.json` (the version's
immutable copy, never rewritten), then LAST the pointer `datasets/<name>/<split>/_manifest.json`
(same content: `version`, full shard `key`s, `files` named relative to the split prefix). A reader
that opened the old pointer keeps reading the old, unchanged shards while a new version is written.
Old versions are not deleted here.

Resumable: the shard plan is a pure function of the sorted file list (seeded permutation, then
greedy fill to the target size), each shard is one atomic PUT followed by a `_done/part-NNNNN.json`
marker carrying its sha256 and the digest of its keys, and a re-run skips shards whose marker
matches. Every image is fully decoded once here; undecodable files are rejected with a reason.
Read errors (OSError, S3 timeouts/throttling) are retried with backoff and then FAIL the shard
task with the path and cause: they are never recorded as rejections and leave no done marker, so a
re-run retries them. Local-folder/tar shard tasks are pinned to the driver's node (the only node
that can see those paths). An S3 source's tars are listed by worker tasks (one per tar, reading
headers by byte range), and the tasks in flight scale with the cluster's CPUs (max_in_flight).
A folder source (local or s3://) is listed AND planned by tasks of `listing_folders` class folders
(folder_plan.py): each writes its shards' item lists to plan objects, so the driver holds
O(shards), never the list of files (1.28 M for ImageNet); shard tasks read their plan object.

Here: the config, the names on S3, the plan (shards and the version) and the publication. Writing
one shard (and its done marker) is ingest_shards.py; running the listing and shard tasks (Ray or in
process) is ingest_tasks.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np

# `X as X`: re-exported, callers import them from here (defined beside the shard writing / task running)
from detailflow.pipelines.data.ingest_shards import COLUMNS, marker_valid, read_marker, shard_name
from detailflow.pipelines.data.ingest_shards import SourceReadError as SourceReadError
from detailflow.pipelines.data.ingest_tasks import IngestInterrupted as IngestInterrupted
from detailflow.pipelines.data.ingest_tasks import ensure_ray as ensure_ray
from detailflow.pipelines.data.ingest_tasks import in_flight as in_flight
from detailflow.pipelines.data.ingest_tasks import listing_mapper, run_shards
from detailflow.pipelines.data.ingest_tasks import task_options as task_options
from detailflow.pipelines.data.sources import Item, list_source

log = logging.getLogger(__name__)

FORMAT = "detailflow.dataset/v1"


@dataclass
class IngestConfig:
    name: str  # dataset name: s3://<bucket>/datasets/<name>/
    split: str = "train"  # split folder under the source and under the dataset prefix
    shard_mb: float = 256.0  # target encoded bytes per shard (the last shard of the plan is smaller)
    shuffle_seed: int = 0  # seeded permutation of the sorted file list, so shards mix classes
    labels: str | None = None  # labels, local or s3://, for flat folders / split tars (sources.LABELS_FORMAT)
    classes_from: str | None = "train"  # reuse this split's published class list (None: from the files)
    row_group_rows: int = 64  # Parquet row-group size = the reader's unit of parallel read + decode
    use_ray: bool = True  # one Ray task per shard; False runs the shards in this process
    task_cpus: float = 1.0  # CPUs reserved per shard task (fractional is fine, pitfall 3)
    max_in_flight: int | None = None  # tasks at once; None: 2 x the cluster's CPUs / task_cpus (scales)
    verify_existing: bool = False  # re-download and hash already-done shards instead of trusting markers
    fail_after_shards: int | None = None  # testing hook: raise after this many shards this run
    read_attempts: int = 4  # tries per source file on read errors before the ingest fails
    listing_folders: int = 16  # class folders per listing task of a folder source (folder_plan.py); 0:
    # list on the driver (sources.list_source) as tars are

    @property
    def prefix(self) -> str:
        return dataset_prefix(self.name, self.split)


def dataset_prefix(name: str, split: str) -> str:
    """Where the split's pointer manifest lives."""
    return f"datasets/{name}/{split}"


def version_prefix(name: str, split: str, version: str) -> str:
    """Where one version's shards, done markers and immutable manifest live."""
    return f"{dataset_prefix(name, split)}/v-{version}"


def plan_shards(items: list[Item], target_bytes: int, seed: int) -> list[list[Item]]:
    """Deterministic: sorted by key, permuted with `seed`, then filled greedily to target_bytes."""
    ordered = sorted(items, key=lambda it: it.key)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    shards: list[list[Item]] = [[]]
    size = 0
    for i in perm:
        it = ordered[int(i)]
        if shards[-1] and size + it.size > target_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.size
    return [s for s in shards if s]


def keys_digest(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(it.key.encode() + b"\0" + str(it.size).encode() + b"\0" + it.stamp.encode() + b"\n")
    return h.hexdigest()


def dataset_version(digests: list[str], row_group_rows: int, classes: list[str], ignored: list[dict]) -> str:
    """Content address of a split's shard set: equal inputs give equal versions (and resume)."""
    blob = json.dumps({"format": FORMAT, "row_group_rows": row_group_rows, "classes": classes,
                       "digests": digests, "ignored": ignored}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _class_list(storage, cfg: IngestConfig, seen) -> list[str]:
    """The classes_from split's published class list, else the class names `seen` in the source."""
    if cfg.classes_from and cfg.classes_from != cfg.split:
        ref = storage.read_manifest(dataset_prefix(cfg.name, cfg.classes_from))
        if ref is not None:
            return list(ref["classes"])
    return sorted(set(seen))


def _plan(storage, src: str, cfg: IngestConfig) -> tuple[list, list[str], list[str], list[dict], bool, int]:
    """(shards: item lists or plan-object keys, their digests, classes, listing rejections, local
    source?, files). A folder source is listed and planned by tasks (folder_plan.py: the driver
    holds O(shards)); tars (and listing_folders=0) through sources.list_source."""
    from detailflow.pipelines.data.folder_plan import folder_source, plan_folder

    target = int(cfg.shard_mb * 1024 * 1024)
    source = folder_source(src, cfg.split, storage) if cfg.listing_folders else None
    if source is not None:
        local = source.kind == "file"
        plan = plan_folder(storage, source, labels=cfg.labels, target_bytes=target, seed=cfg.shuffle_seed,
                           plans_prefix=f"{cfg.prefix}/_plans", listing_folders=cfg.listing_folders,
                           map_tasks=listing_mapper(storage, cfg, local=local))
        return (plan.plan_keys, plan.digests, _class_list(storage, cfg, plan.classes), plan.ignored, local,
                plan.num_files)
    items, ignored = list_source(src, cfg.split, storage=storage, labels=cfg.labels,
                                 map_tasks=listing_mapper(storage, cfg))
    shards = plan_shards(items, target, cfg.shuffle_seed)
    local = any(it.kind in ("file", "tar") for it in items)
    classes = _class_list(storage, cfg, (it.class_name for it in items))
    return shards, [keys_digest(s) for s in shards], classes, ignored, local, len(items)


def ingest(storage, src: str, cfg: IngestConfig, progress=None) -> dict:
    """Ingest `src` (folder, tar(s) or s3:// prefix) for cfg.split; returns the published manifest.

    `progress(n)` is called with the number of files handled as shards complete.
    """
    if cfg.shard_mb <= 0:
        raise ValueError(f"shard_mb must be > 0, got {cfg.shard_mb}")
    storage.ensure_bucket()
    shards, digests, classes, ignored, local, n_files = _plan(storage, src, cfg)
    if not n_files:
        raise FileNotFoundError(f"no files found in {src} for split {cfg.split!r}")
    class_to_index = {c: i for i, c in enumerate(classes)}
    version = dataset_version(digests, cfg.row_group_rows, classes, ignored)
    vprefix = version_prefix(cfg.name, cfg.split, version)

    markers: dict[int, dict] = {}
    todo = []
    for i, (shard, digest) in enumerate(zip(shards, digests, strict=True)):
        marker = read_marker(storage, vprefix, shard_name(i))
        if marker_valid(storage, vprefix, marker, digest, cfg.verify_existing):
            markers[i] = marker
        else:
            todo.append((i, shard, digest))
    if progress is not None and markers:
        progress(sum(m["rows"] + len(m["rejected"]) for m in markers.values()))
    log.info("ingest %s/%s v-%s: %d files, %d shards (%d already done)", cfg.name, cfg.split, version,
             n_files, len(shards), len(markers))
    markers.update(run_shards(storage, cfg, vprefix, todo, class_to_index, progress, local))

    # the version's own manifest first: immutable, so an existing one (first ingest's `source`) wins.
    # Every shard it lists was just PUT or HEAD-checked by _marker_valid, so none is missing.
    version_key = storage.manifest_key(vprefix)
    if storage.exists(version_key):
        manifest = storage.get_json(version_key)
    else:
        manifest = build_manifest(cfg, src, classes, [markers[i] for i in range(len(shards))], ignored,
                                  version)
        storage.put_json(version_key, manifest)
    if storage.read_manifest(cfg.prefix) != manifest:  # the pointer LAST (it re-checks `files` exist)
        storage.publish_manifest(cfg.prefix, manifest)
    return manifest


def build_manifest(cfg: IngestConfig, src: str, classes: list[str], markers: list[dict],
                   ignored: list[dict], version: str) -> dict:
    counts = {c: 0 for c in classes}
    rejected = list(ignored)
    shards, files = [], {}
    vprefix = version_prefix(cfg.name, cfg.split, version)
    for m in markers:
        rejected += m["rejected"]
        for c, n in m["counts"].items():
            counts[c] += n
        if m["rows"]:
            shards.append({"name": m["name"], "key": f"{vprefix}/{m['name']}", "sha256": m["sha256"],
                           "rows": m["rows"], "bytes": m["bytes"], "row_groups": m["row_groups"],
                           "row_group_rows": m["row_group_rows"]})
            files[f"v-{version}/{m['name']}"] = {"sha256": m["sha256"], "size": m["bytes"]}
    rejected.sort(key=lambda r: r["key"])
    return {
        "format": FORMAT,
        "name": cfg.name,
        "split": cfg.split,
        "version": version,
        "source": src,
        "columns": COLUMNS,
        "num_classes": len(classes),
        "classes": classes,
        "counts_per_class": counts,
        "num_images": sum(counts.values()),
        "num_rejected": len(rejected),
        "rejected": rejected,
        "shard_target_mb": cfg.shard_mb,
        "shuffle_seed": cfg.shuffle_seed,
        "shards": shards,
        "files": files,  # relative to the split prefix; publish_manifest checks each exists first
    }


def verify_dataset(storage, name: str, split: str) -> list[str]:
    """Download every shard of a published split and check its sha256; returns the problems."""
    from detailflow.platform.storage import ChecksumMismatch

    prefix = dataset_prefix(name, split)
    manifest = storage.read_manifest(prefix)
    if manifest is None:
        return [f"{storage.uri(prefix)} has no manifest (not published)"]
    problems = []
    for shard in manifest["shards"]:
        try:
            storage.get_bytes(shard["key"], expected_sha256=shard["sha256"])
        except ChecksumMismatch as e:
            problems.append(f"checksum mismatch: {e}")
        except Exception as e:
            problems.append(f"{storage.uri(shard['key'])}: {type(e).__name__}: {e}")
    return problems
