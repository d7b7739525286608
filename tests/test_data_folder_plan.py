"""Folder sources are listed and planned by tasks (data/folder_plan.py): the ingest driver holds
O(shards), never a list of the files (issue 19 item 3).

The ImageNet-sized test runs the real planning code (plan_folder -> list_group: the checks of
sources, plan_shards, keys_digest) over a simulated listing of 1,000 class folders x 1,281 files
(the S3 pages stand in for by a generator; the plan objects are counted instead of written), in
this process, and bounds the Python heap (tracemalloc) of the driver, which gets the tasks' results
serialised as from Ray (a driver that lists the files itself holds ~1.28 M Items), and of one
listing task. The full listing runs untraced: traced, it took ~60-100 s instead of ~20."""

from __future__ import annotations

import gc
import io
import pickle
import tracemalloc

import pyarrow.parquet as pq
import pytest

from detailflow.pipelines.data import synth
from detailflow.pipelines.data.folder_plan import (
    FolderSource,
    folder_source,
    list_entries,
    list_group,
    plan_folder,
)
from detailflow.pipelines.data.ingest import IngestConfig, ingest, plan_shards
from detailflow.pipelines.data.sources import list_source

CLASSES, PER_CLASS = 1000, 1281  # 1,281,000 files: ImageNet-1k train's size
TARGET = 256 * 1024 * 1024  # the pipelines' shard_mb


def _size(c: int, j: int) -> int:
    return 70_000 + (j * 7919 + c * 104_729) % 80_000  # 70-150 KB, mean ~110 KB like ImageNet's JPEGs


def _imagenet_lister(source, folder, storage):
    """One class folder's listing as S3 pages yield it: (relative key, size, location, ETag)."""
    c = int(folder[1:])
    return ((f"{folder}/{folder}_{j}.JPEG", _size(c, j), f"{source.root}/{folder}/{folder}_{j}.JPEG", f"e{j}")
            for j in range(PER_CLASS)), []


def test_imagenet_sized_folder_listing_keeps_the_driver_o_shards():
    source = FolderSource("s3", "raw/imagenet/train", tuple(f"n{c:08d}" for c in range(CLASSES)), False)
    written: list[tuple[int, int]] = []  # (files, distinct classes) per plan object
    returned: list[bytes] = []  # each listing task's result as Ray would ship it to the driver

    def put_plan(key, obj):
        written.append((len(obj["items"]), len({row[1] for row in obj["items"]})))

    def tasks_here(fn, calls):  # the listing tasks, untraced (tracemalloc would triple their time)
        results = [fn(*call) for call in calls]
        returned.extend(pickle.dumps(r) for r in results)
        return results

    kwargs = {"labels": None, "target_bytes": TARGET, "seed": 0, "plans_prefix": "datasets/x/_plans",
              "listing_folders": 16, "lister": _imagenet_lister}
    plan = plan_folder(None, source, **kwargs, put_plan=put_plan, map_tasks=tasks_here)
    total = CLASSES * PER_CLASS
    # every file planned exactly once, into shards of the target size (closed form per listing task:
    # greedy fill gives between ceil(bytes / target) and ceil(bytes / (target - largest file)) shards)
    assert plan.num_files == total == sum(f for f, _ in written)
    lo = hi = 0
    for g in range(0, CLASSES, 16):
        nbytes = sum(_size(c, j) for c in range(g, min(g + 16, CLASSES)) for j in range(PER_CLASS))
        lo, hi = lo + -(-nbytes // TARGET), hi + -(-nbytes // (TARGET - 150_000))
    assert lo <= len(plan.digests) <= hi and len(set(plan.digests)) == len(plan.digests)
    assert len(plan.plan_keys) == len(plan.files) == len(written) == len(plan.digests)
    assert plan.classes == list(source.folders) and plan.ignored == []
    assert max(k for _, k in written) <= 16 and min(k for _, k in written[:-1]) >= 8  # shards mix classes

    # the driver, traced: it receives the tasks' results (unpickled here, as from Ray's object store)
    # and keeps O(shards) (~540 summaries), not 1.28 M files
    from_ray = lambda fn, calls: [pickle.loads(b) for b in returned]  # noqa: E731
    gc.collect()
    tracemalloc.start()
    try:
        again = plan_folder(None, source, **kwargs, map_tasks=from_ray)
        gc.collect()
        held, driver_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert again == plan
    assert held < 1_000_000, f"driver keeps {held / 1e6:.1f} MB after planning {len(plan.digests)} shards"
    assert driver_peak < 4_000_000, f"the tasks' results peaked at {driver_peak / 1e6:.1f} MB on the driver"
    # one listing task, traced: its peak is its own 20,496 files (every task runs this same code)
    group = {k: v for k, v in kwargs.items() if k != "listing_folders"}
    group.update(storage=None, put_plan=lambda k, o: None)
    list_group(source, list(source.folders[16:32]), **group)  # imports before measuring
    gc.collect()
    tracemalloc.start()
    try:
        list_group(source, list(source.folders[:16]), **group)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40_000_000, f"planning peaked at {peak / 1e6:.1f} MB of Python heap"


def test_one_listing_task_plans_exactly_like_the_whole_sorted_list(tmp_path):
    synth.write_folder(tmp_path / "src", size=16, per_class=7, val_per_class=0, seed=3)
    (tmp_path / "src" / "train" / synth.CLASS_NAMES[0] / "deep").mkdir()
    (tmp_path / "src" / "train" / synth.CLASS_NAMES[0] / "deep" / "x.png").write_bytes(b"x")
    source = folder_source(str(tmp_path / "src"), "train")
    assert source is not None and len(source.folders) == len(synth.CLASS_NAMES) and not source.root_files
    plans: dict[str, list] = {}
    keep = lambda k, o: plans.setdefault(k, o["items"])  # noqa: E731
    plan = plan_folder(None, source, labels=None, target_bytes=2000, seed=5, plans_prefix="p",
                       listing_folders=len(source.folders), put_plan=keep)
    items, ignored = list_source(str(tmp_path / "src"), "train")  # the driver-side listing (tars' path)
    expect = plan_shards(items, 2000, 5)
    assert [[row[0] for row in plans[k]] for k in plan.plan_keys] == [[it.key for it in s] for s in expect]
    assert plan.ignored == ignored == [{"key": f"{synth.CLASS_NAMES[0]}/deep/x.png",
                                        "reason": "nested deeper than <class>/<file>"}]
    # several listing tasks: the same files, each shard within one task's folders
    plan3 = plan_folder(None, source, labels=None, target_bytes=2000, seed=5, plans_prefix="q",
                        listing_folders=3, lister=list_entries, put_plan=keep)
    keys = [row[0] for k in plan3.plan_keys for row in plans[k]]
    assert sorted(keys) == sorted(it.key for it in items) and plan3.num_files == len(items)
    for k in plan3.plan_keys:
        classes = sorted({row[1] for row in plans[k]})
        first = synth.CLASS_NAMES.index(classes[0]) // 3
        assert all(synth.CLASS_NAMES.index(c) // 3 == first for c in classes)


@pytest.mark.integration
def test_s3_folder_ingest_lists_on_tasks_and_matches_the_local_folder(storage, ray_session, tmp_path):
    root = tmp_path / "src"
    synth.write_folder(root, size=16, per_class=4, val_per_class=0, seed=1)
    for p in sorted((root / "train").rglob("*")):
        if p.is_file():
            storage.put_bytes(f"raw/fp/train/{p.relative_to(root / 'train').as_posix()}", p.read_bytes())
    local = ingest(storage, str(root), IngestConfig(name="fp-local", split="train", shard_mb=0.004,
                                                    use_ray=False))
    cfg = IngestConfig(name="fp-s3", split="train", shard_mb=0.004, listing_folders=3)  # Ray listing tasks
    m = ingest(storage, f"s3://{storage.bucket}/raw/fp", cfg)
    assert m["counts_per_class"] == local["counts_per_class"]
    assert m["num_images"] == 4 * len(synth.CLASS_NAMES)
    rows = [r for s in m["shards"]
            for r in pq.read_table(io.BytesIO(storage.get_bytes(s["key"], s["sha256"]))).to_pylist()]
    assert sorted(r["key"] for r in rows) == sorted(
        p.relative_to(root / "train").as_posix() for p in (root / "train").rglob("*.png"))
    assert len(m["shards"]) > 4 and storage.list_keys("datasets/fp-s3/train/_plans/")
    assert ingest(storage, f"s3://{storage.bucket}/raw/fp", cfg) == m  # resumes: same plan, same version
