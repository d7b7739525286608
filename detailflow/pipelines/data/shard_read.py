"""Reading published shards: the checked manifest, its units of work, one row group off S3.

    manifest = read_manifest_checked(storage, "shapes", "train")      # or a pinned version
    units = read_units(manifest)                                      # [{path, row_group, bytes}]
    table = read_unit_table(storage, units[0]["path"], units[0]["row_group"], units[0]["bytes"])

A shard whose size on S3 is not the manifest's raises ShardMismatch (replaced or truncated after
publishing) instead of being read.
"""

from __future__ import annotations

from detailflow.pipelines.data.ingest import dataset_prefix, version_prefix


def read_manifest_checked(storage, name: str, split: str, version: str | None = None) -> dict:
    """The published manifest of a split, or a clear error naming the command that creates it.

    version None: the split's pointer (the latest ingest). A version: that version's own immutable
    manifest (v-<version>/_manifest.json), whatever the pointer says since - what a pipeline that
    recorded the version, and a resume of its run, read."""
    prefix = dataset_prefix(name, split) if not version else version_prefix(name, split, version)
    manifest = storage.read_manifest(prefix)
    if manifest is None:
        what = f" version {version}" if version else ""
        raise FileNotFoundError(f"dataset {name}/{split}{what}: {storage.uri(prefix)} is not published (no "
                                f"_manifest.json); run `detailflow data ingest SRC --name {name} --split "
                                f"{split}` first")
    if version and manifest.get("version") != version:
        raise ValueError(f"{storage.uri(prefix)} holds version {manifest.get('version')}, not {version}")
    if not manifest["shards"]:
        raise ValueError(f"dataset {storage.uri(prefix)} has no shards (every file was rejected?)")
    return manifest


def _filesystem(storage):
    from detailflow.platform.storage import cached_filesystem

    return cached_filesystem(storage)


def read_units(manifest: dict) -> list[dict]:
    """(shard key, row group, shard bytes) triples: the image reader's unit of parallel work."""
    units = []
    for s in manifest["shards"]:
        groups = s.get("row_groups")
        for g in range(groups) if groups and s.get("row_group_rows") else [-1]:  # -1: whole shard
            units.append({"path": s["key"], "row_group": g, "bytes": int(s.get("bytes", 0) or 0)})
    return units


class ShardMismatch(RuntimeError):
    """A shard on S3 is not the object its manifest describes (overwritten or truncated)."""


def read_unit_table(storage, path: str, row_group: int, expected_bytes: int = 0):
    """One row group (-1: the whole shard) of a shard, after checking its size against the manifest."""
    import pyarrow.parquet as pq

    with _filesystem(storage).open_input_file(storage.fs_path(path)) as f:
        if expected_bytes and f.size() != expected_bytes:
            raise ShardMismatch(f"{storage.uri(path)} is {f.size()} bytes but its manifest says "
                                f"{expected_bytes}: the shard was replaced or truncated after publishing; "
                                "re-read the dataset's current manifest (or re-ingest)")
        pf = pq.ParquetFile(f)
        cols = ["key", "label", "image"]
        return pf.read(columns=cols) if row_group < 0 else pf.read_row_group(row_group, columns=cols)
