"""Versioned dataset publishing on the real local S3 (SeaweedFS) with Ray shard tasks: a re-ingest with
new content never disturbs a reader of the old version, the pointer moves only after the new version's
manifest exists, and re-ingesting identical input writes nothing."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from detailflow.pipelines.data import synth
from detailflow.pipelines.data.ingest import IngestConfig, IngestInterrupted, ingest, version_prefix
from detailflow.pipelines.data.sources import list_source

pytestmark = pytest.mark.integration
SHARD_MB = 0.002  # ~2 KB: several shards from 20-30 tiny PNGs


def _write(root: Path, seed: int, per_class: int) -> list[str]:
    """(Re)write the source folder; returns its train keys."""
    shutil.rmtree(root, ignore_errors=True)
    synth.write_folder(root, size=16, per_class=per_class, val_per_class=1, seed=seed)
    return sorted(it.key for it in list_source(str(root), "train")[0])


def _keys_in(storage, fs, key: str) -> list[str]:
    return pq.read_table(storage.fs_path(key), filesystem=fs, columns=["key"])["key"].to_pylist()


def _objects(storage, prefix: str) -> dict[str, tuple]:
    """key -> (ETag, LastModified) for everything under prefix: a rewrite changes LastModified."""
    out = {}
    for page in storage.client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket,
                                                                         Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = (obj["ETag"], obj["LastModified"])
    return out


def test_reingest_with_new_content_leaves_an_open_reader_of_the_old_version_intact(storage, ray_session,
                                                                                     tmp_path):
    src, pointer = tmp_path / "src", "datasets/versioned/train"
    old_keys = _write(src, seed=0, per_class=2)
    cfg = IngestConfig(name="versioned", split="train", shard_mb=SHARD_MB, row_group_rows=2)
    old = ingest(storage, str(src), cfg)
    assert len(old["shards"]) >= 3 and storage.read_manifest(pointer) == old
    old_prefix = version_prefix("versioned", "train", old["version"])
    old_objects = _objects(storage, old_prefix)

    # a reader opens the pointer and starts on the first shard (an open handle, one row group read)
    opened = storage.read_manifest(pointer)
    fs = storage.filesystem()
    handle = fs.open_input_file(storage.fs_path(opened["shards"][0]["key"]))
    first = pq.ParquetFile(handle)
    seen = first.read_row_group(0, columns=["key"])["key"].to_pylist()

    new_keys = _write(src, seed=1, per_class=3)  # same name, different content (and more of it)
    cfg.fail_after_shards = 1
    with pytest.raises(IngestInterrupted):
        ingest(storage, str(src), cfg)
    assert storage.read_manifest(pointer) == old  # half-written new version: the pointer did not move
    new_versions = {k.split("/")[3] for k in _objects(storage, "datasets/versioned/train")} - {
        f"v-{old['version']}", "_manifest.json", "_plans"}  # _plans: content-addressed shard plans
    assert len(new_versions) == 1  # the crashed run wrote only under its own version prefix
    new_prefix = f"datasets/versioned/train/{new_versions.pop()}"
    assert storage.read_manifest(new_prefix) is None

    cfg.fail_after_shards = None
    new = ingest(storage, str(src), cfg)
    assert new_prefix == version_prefix("versioned", "train", new["version"]) != old_prefix
    assert storage.read_manifest(pointer) == new == storage.read_manifest(new_prefix)
    assert sorted(k for s in new["shards"] for k in _keys_in(storage, fs, s["key"])) == new_keys

    # the reader finishes the version it opened: complete, same objects, same checksums
    for g in range(1, first.num_row_groups):
        seen += first.read_row_group(g, columns=["key"])["key"].to_pylist()
    handle.close()
    for shard in opened["shards"][1:]:
        seen += _keys_in(storage, fs, shard["key"])
    assert sorted(seen) == old_keys
    for shard in opened["shards"]:
        storage.get_bytes(shard["key"], expected_sha256=shard["sha256"])  # raises on any change
    assert _objects(storage, old_prefix) == old_objects  # nothing under the old version was touched
    assert storage.read_manifest(old_prefix) == old


def test_reingesting_identical_input_is_a_noop(storage, ray_session, tmp_path):
    src, pointer = tmp_path / "src", "datasets/same/train"
    _write(src, seed=2, per_class=2)
    cfg = IngestConfig(name="same", split="train", shard_mb=SHARD_MB)
    first = ingest(storage, str(src), cfg)
    before = _objects(storage, "datasets/same/train")
    assert f"{version_prefix('same', 'train', first['version'])}/_manifest.json" in before
    time.sleep(1.1)  # S3 LastModified has 1 s resolution: a rewrite must be able to show
    assert ingest(storage, str(src), cfg) == first
    assert _objects(storage, "datasets/same/train") == before  # same version, not one object rewritten
    assert storage.read_manifest(pointer)["version"] == first["version"]
