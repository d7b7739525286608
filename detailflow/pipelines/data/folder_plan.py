"""Folder sources listed and planned by tasks: the ingest driver never holds a list of the files.

    source = folder_source("s3://raw/imagenet", "train", storage)     # None: the source holds tars
    plan = plan_folder(storage, source, cfg, map_tasks)                # FolderPlan: O(shards) summaries
    for index, (digest, plan_key, files) in enumerate(zip(plan.digests, plan.plan_keys, plan.files)):
        items = load_plan(storage, plan_key)                           # in the shard task

An ImageNet-style folder (`<root>/<class>/<file>`, local or an s3:// prefix; files directly under
the root need a labels file) is split by its class folders: the driver lists only the root's
entries (S3: one delimiter listing, i.e. the 1,000 class prefixes; local: one scandir), and each
LISTING task takes `listing_folders` class folders (the root's own files are one more task): it
lists them (S3 pages or os.walk), applies the checks and labels of sources.list_source, plans its
files into shards (ingest.plan_shards: sorted, seeded permutation, greedy fill) and writes each
shard's item list to a plan object named by its content, `<split prefix>/_plans/<digest>-<hash>.json`
(written once: a re-ingest of the same files rewrites nothing). It returns
one (digest, plan key, files) triple per shard, its classes and its rejections, so the
driver holds O(shards + classes + rejections) whatever the number of files (an ImageNet listing:
~560 shards of 256 MB instead of 1.28 M items; tests/test_data_folder_plan.py), and each shard
task reads its own plan object. Shards mix the classes of one listing task (16 by default); the
reader's windows then mix row groups of many shards. A source of at most `listing_folders` folders
is one task, whose plan is exactly the plan of the whole sorted file list.

Tars are still listed by sources.list_source (one task per tar, items returned to the driver).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import operator
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from detailflow.pipelines.data import sources
from detailflow.pipelines.data.sources import Item

_ITEM_ROW = operator.attrgetter(*(f.name for f in dataclasses.fields(Item)))  # Item -> its fields' tuple

ROOT_FILES = ""  # the pseudo-folder of the files directly under the root (flat val folders)


@dataclass(frozen=True)
class FolderSource:
    kind: str  # "s3" | "file": where the files live
    root: str  # the split's root: "bucket/prefix" (s3) or a local directory
    folders: tuple[str, ...]  # class folder names directly under the root, sorted
    root_files: bool  # the root itself holds files (they need a labels file)


@dataclass
class FolderPlan:
    """The driver's whole view of a folder source: O(shards + classes + rejections)."""

    digests: list[str]  # keys digest of each shard (ingest.keys_digest), in shard order
    plan_keys: list[str]  # S3 key of each shard's item list
    files: list[int]  # candidate files of each shard
    classes: list[str]  # class names seen, sorted
    ignored: list[dict]  # listing-time rejections {key, reason}

    @property
    def num_files(self) -> int:
        return sum(self.files)


def _s3_level(storage, bucket: str, prefix: str) -> tuple[list[str], bool, bool]:
    """(sub-folder names, holds files, holds tars) directly under an S3 prefix (delimiter listing)."""
    folders, files, tars = [], False, False
    paginator = storage.client.get_paginator("list_objects_v2")
    cut = len(prefix) + 1 if prefix else 0
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else "", Delimiter="/"):
        folders += [p["Prefix"][cut:].rstrip("/") for p in page.get("CommonPrefixes", [])]
        for obj in page.get("Contents", []):
            files = True
            tars = tars or obj["Key"].endswith(".tar")
    return sorted(folders), files, tars


def folder_source(src: str, split: str, storage=None) -> FolderSource | None:
    """The split's folder layout (its root and class folders), or None when src holds tars."""
    if src.startswith("s3://"):
        if storage is None:
            raise ValueError("an s3:// source needs a Storage")
        bucket, prefix = sources.parse_s3(src)
        folders, files, tars = _s3_level(storage, bucket, prefix)
        if not folders and not files:
            raise FileNotFoundError(f"no objects under {src}")
        if tars:
            return None
        if split in folders:  # <prefix>/<split>/<class>/<file>
            prefix = f"{prefix}/{split}" if prefix else split
            folders, files, tars = _s3_level(storage, bucket, prefix)
            if tars:  # <prefix>/val/*.tar
                return None
        return FolderSource("s3", f"{bucket}/{prefix}", tuple(folders), files)
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"source {src} does not exist")
    if not path.is_dir() or any(path.glob("*.tar")) or any(path.glob("*/*.tar")):
        return None
    root = path / split if (path / split).is_dir() else path
    folders, files = [], False
    with os.scandir(root) as entries:
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                folders.append(e.name)
            else:
                files = True
    return FolderSource("file", str(root), tuple(sorted(folders)), files)


def list_entries(source: FolderSource, folder: str, storage=None) -> tuple[Iterator[tuple], list[dict]]:
    """(entries (rel path below the root, size, location, stamp), unreadable rejections) of one class
    folder, recursively (deeper files are rejected later), or of the root's own files (ROOT_FILES)."""
    unreadable: list[dict] = []
    if source.kind == "s3":
        bucket, _, prefix = source.root.partition("/")
        below = f"{prefix}/{folder}" if folder else prefix
        cut = len(prefix) + 1 if prefix else 0

        def s3_entries():
            paginator = storage.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=bucket, Prefix=below + "/" if below else "",
                                       **({} if folder else {"Delimiter": "/"}))
            for page in pages:
                for obj in page.get("Contents", []):
                    yield (obj["Key"][cut:], int(obj["Size"]), f"{bucket}/{obj['Key']}",
                           obj.get("ETag", "").strip('"'))
        return s3_entries(), unreadable
    root = Path(source.root)
    entries = []
    walk = os.walk(root / folder) if folder else [(str(root), [], [e.name for e in os.scandir(root)
                                                                    if not e.is_dir(follow_symlinks=False)])]
    for dirpath, _, names in walk:
        for fn in names:
            if fn.startswith("."):
                continue
            full = Path(dirpath) / fn
            rel = full.relative_to(root).as_posix()
            st, problem = sources._local_problem(full)
            if problem:
                unreadable.append({"key": rel, "reason": problem})
            else:
                entries.append((rel, st.st_size, str(full), str(st.st_mtime_ns)))
    return iter(entries), unreadable


def list_group(source: FolderSource, folders: list[str], *, storage, labels: str | None, target_bytes: int,
               seed: int, plans_prefix: str, lister: Callable = list_entries,
               put_plan: Callable | None = None) -> dict:
    """Listing task: list `folders`, plan their shards, write each shard's plan object; returns
    {shards: [(digest, plan key, files)], classes, ignored}: nothing per file."""
    from detailflow.pipelines.data.ingest import keys_digest, plan_shards

    label_map = sources.read_labels(labels, storage) if labels else None
    put_plan = put_plan or functools.partial(_put_once, storage)
    items, ignored = [], []
    for folder in folders:
        entries, unreadable = lister(source, folder, storage)
        got, bad = sources._from_relpaths(entries, source.kind)
        items += got
        ignored += bad + unreadable
    items, more = sources._apply_labels(items, label_map)
    ignored += more
    unlabeled = next((it for it in items if it.class_name is None), None)
    if unlabeled is not None:
        raise ValueError(f"files (e.g. {unlabeled.key}) have no class folder under {source.root}; "
                         f"pass --labels FILE|s3://... ({sources.LABELS_FORMAT})")
    shards = []
    for shard in plan_shards(items, target_bytes, seed):
        digest, rows = keys_digest(shard), [_ITEM_ROW(it) for it in shard]
        # named by its whole content (locations too), so an existing object is this plan: not rewritten
        key = f"{plans_prefix}/{digest[:32]}-{hashlib.sha256(repr(rows).encode()).hexdigest()[:16]}.json"
        put_plan(key, {"items": rows})
        shards.append((digest, key, len(shard)))
    return {"shards": shards, "classes": sorted({it.class_name for it in items}), "ignored": ignored}


def _put_once(storage, key: str, obj: dict) -> None:
    """Write a content-addressed plan object unless it exists (a re-ingest rewrites nothing)."""
    if not storage.exists(key):
        storage.put_json(key, obj)


def load_plan(storage, plan_key: str) -> list[Item]:
    """A shard's items from its plan object (in the shard task)."""
    return [Item(*row) for row in storage.get_json(plan_key)["items"]]


def plan_folder(storage, source: FolderSource, *, labels: str | None, target_bytes: int, seed: int,
                plans_prefix: str, listing_folders: int, map_tasks=sources._serial,
                **task_kwargs) -> FolderPlan:
    """Run the listing tasks (map_tasks(fn, calls)) and gather their O(shards) summaries in order."""
    if labels:  # fail fast on a missing labels file, before any task (the tasks read it)
        sources.check_labels_exist(labels, storage)
    n = max(1, int(listing_folders))
    groups = [list(source.folders[i:i + n]) for i in range(0, len(source.folders), n)]
    if source.root_files:
        groups.append([ROOT_FILES])
    kwargs = {"storage": storage, "labels": labels, "target_bytes": target_bytes, "seed": seed,
              "plans_prefix": plans_prefix, **task_kwargs}
    results = map_tasks(_list_group_call, [(source, g, kwargs) for g in groups])
    plan = FolderPlan([], [], [], [], [])
    classes: set[str] = set()
    for r in results:
        for digest, key, files in r["shards"]:
            plan.digests.append(digest)
            plan.plan_keys.append(key)
            plan.files.append(files)
        classes.update(r["classes"])
        plan.ignored += r["ignored"]
    plan.classes = sorted(classes)
    plan.ignored.sort(key=lambda r: r["key"])  # listing order (os.walk) must not enter the version
    return plan


def _list_group_call(source: FolderSource, folders: list[str], kwargs: dict) -> dict:
    return list_group(source, folders, **kwargs)
