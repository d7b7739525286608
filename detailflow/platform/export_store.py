"""Where an export's bytes live on S3: once, at an immutable content-addressed prefix.

    prefix, files = publish_export(storage, folder)     # exports/<digest>/ files, _manifest.json last
    write_pointer(storage, "runs/<run>/export", prefix, files)   # runs/<run>/export/_export.json, last
    prefix, files = export_content(storage, "runs/<run>/export") # -> exports/<digest>, {name: {sha256, size}}

An export folder (model.safetensors + config.json) is published under `exports/<sha256 over the files'
sha256s>/` with its `_manifest.json` written last (Storage.publish); a prefix whose manifest exists is
never written again, so the same weights published twice (training's export, then the MLflow link,
then a registration) are stored once. The run's address `runs/<run>/export` (what stage outputs, run
tags and export configs name; codes are versioned by its run name) holds only `_export.json`, the
pointer: {"prefix", "digest", "files"}; it is written after the content is complete, so a reader that
finds it finds every byte, and checks each file against the sha256 it lists.

Older runs (before the pointer) hold the files themselves under runs/<run>/export/; export_content
reads them there. A ref straight to exports/<digest> works too (its own manifest).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

EXPORTS_PREFIX = "exports"  # s3://<bucket>/exports/<digest>/
POINTER_NAME = "_export.json"  # runs/<run>/export/_export.json -> exports/<digest>


def content_digest(directory) -> tuple[str, dict[str, str]]:
    """(sha256 over the sorted (name, sha256) pairs, {name: sha256}) of a folder's files."""
    from detailflow.platform.storage import sha256_file

    files = {p.name: sha256_file(p) for p in sorted(Path(directory).iterdir()) if p.is_file()}
    text = json.dumps(sorted(files.items())).encode()
    return hashlib.sha256(text).hexdigest(), files


def publish_export(storage, directory) -> tuple[str, dict]:
    """Upload the folder's files to exports/<digest>/ (skipped when that prefix is already
    published: same digest, same bytes), manifest last. Returns (prefix key, manifest files)."""
    digest, _ = content_digest(directory)
    prefix = f"{EXPORTS_PREFIX}/{digest}"
    manifest = storage.read_manifest(prefix)
    if manifest is None:
        items = {p.name: p for p in sorted(Path(directory).iterdir()) if p.is_file()}
        manifest = storage.publish(prefix, items, manifest={"digest": digest})
    return prefix, manifest["files"]


def pointer_key(address: str) -> str:
    return f"{address.rstrip('/')}/{POINTER_NAME}"


def write_pointer(storage, address: str, prefix: str, files: dict) -> str:
    """Name the published `prefix` from `address` (runs/<run>/export): one small JSON, written after
    the content, so it is the export's commit point. Returns the pointer's key."""
    pointer = {"prefix": prefix, "uri": storage.uri(prefix), "digest": prefix.rsplit("/", 1)[-1],
               "files": files}
    key = pointer_key(address)
    storage.put_json(key, pointer)
    return key


def store_export(storage, directory, address: str) -> str:
    """Publish a local export folder once and point `address` at it; returns the content prefix."""
    prefix, files = publish_export(storage, directory)
    write_pointer(storage, address, prefix, files)
    return prefix


def export_content(storage, address: str) -> tuple[str, dict | None] | None:
    """(key prefix holding the files, {name: {sha256, size}} or None when unknown) of an export
    address: through its pointer, a content prefix's own manifest, or an older run's files in
    place; None when there is no export there."""
    from detailflow.models.export import WEIGHTS_NAME

    address = address.rstrip("/")
    if storage.exists(pointer_key(address)):
        pointer = storage.get_json(pointer_key(address))
        return pointer["prefix"], pointer["files"]
    manifest = storage.read_manifest(address)
    if manifest is not None and WEIGHTS_NAME in manifest.get("files", {}):
        return address, manifest["files"]
    if storage.exists(f"{address}/{WEIGHTS_NAME}"):  # written before pointers: the files in place
        return address, None
    return None


def read_export_file(storage, address: str, name: str) -> bytes:
    """One file of an export (config.json, ...), checked against the sha256 its pointer lists."""
    content = export_content(storage, address)
    if content is None:
        raise FileNotFoundError(f"no export at {storage.uri(address)}")
    prefix, files = content
    sha = (files or {}).get(name, {}).get("sha256")
    return storage.get_bytes(f"{prefix}/{name}", expected_sha256=sha)


def download_export_files(storage, address: str, directory, names) -> Path:
    """Download `names` of the export at `address` into `directory`, each sha256-checked when known."""
    content = export_content(storage, address)
    if content is None:
        raise FileNotFoundError(f"no export at {storage.uri(address)}")
    prefix, files = content
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        sha = (files or {}).get(name, {}).get("sha256")
        storage.download_file(f"{prefix}/{name}", out / name, expected_sha256=sha)
    return out
