"""Enumerate ingest sources (ImageNet-style folder, tar files, or an s3:// prefix of either) as items.

Usage:
    items, ignored = list_source("/data/imagenet", split="train")        # folder: <src>/train/<wnid>/*
    items, ignored = list_source("/data/tars", split="train")            # *.tar: <wnid>/<file> members
    items, ignored = list_source("s3://raw/imagenet", split="val", storage=st, labels="val.txt")
    data = read_item(items[0], storage)                                  # original encoded bytes

An Item knows its key (relative path, unique), class name, byte size and where the bytes live: a
local file, an S3 object, or a byte range inside an uncompressed tar (local or on S3; tars inside a
tar, as in ILSVRC2012_img_train.tar, are followed one level and named by their stem), plus a
`stamp` (mtime / ETag) so an edited file changes the ingest's shard digests and hence its version.

Local files that cannot be ingested are listed as rejected with a reason ("broken symbolic link",
"permission denied", "not a regular file"), never a crash: one dangling link must not abort a
1.28M-file listing. A FIFO is refused here because reading one would block the shard task forever.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Item:
    key: str  # unique relative name, e.g. "n01440764/n01440764_10026.JPEG"
    class_name: str | None  # folder / tar name; None when a labels file must supply it
    size: int  # bytes (drives the shard plan)
    kind: str  # "file" | "s3" | "tar" | "s3tar"
    location: str  # local path, or "bucket/key"
    offset: int = 0  # byte offset inside a tar container
    ext_ok: bool = True  # False for files whose extension is not an image type (rejected at ingest)
    stamp: str = ""  # mtime_ns (file), ETag (s3) or member mtime (tar): part of the shard digest


def parse_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def read_labels_file(path: str | Path) -> dict[str, str]:
    """'<file name> <class>' or '<file name>,<class ...>' per line (header lines without a match are
    harmless); keys are matched by file name and by stem."""
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        parts = line.replace(",", " ").split()
        if len(parts) >= 2:
            out[parts[0]] = parts[1]
    return out


def _apply_labels(items: list[Item], labels: dict[str, str] | None) -> tuple[list[Item], list[dict]]:
    if labels is None:
        return items, []
    kept, ignored = [], []
    for it in items:
        name = PurePosixPath(it.key).name
        cls = labels.get(name) or labels.get(PurePosixPath(name).stem)
        if cls is None:
            ignored.append({"key": it.key, "reason": "no label in labels file"})
        else:
            kept.append(Item(f"{cls}/{name}", cls, it.size, it.kind, it.location, it.offset, it.ext_ok,
                             it.stamp))
    return kept, ignored


def _from_relpaths(entries, kind: str) -> tuple[list[Item], list[dict]]:
    """entries: (relative posix path below the split root, size, location, stamp). Class = first dir."""
    items, ignored = [], []
    for rel, size, loc, stamp in entries:
        parts = PurePosixPath(rel).parts
        ext_ok = PurePosixPath(rel).suffix.lower() in IMAGE_EXTS
        if len(parts) == 1:
            # flat split folder (e.g. ImageNet val without class folders): a labels file must name classes
            items.append(Item(rel, None, size, kind, loc, 0, ext_ok, stamp))
        elif len(parts) == 2:
            items.append(Item(rel, parts[0], size, kind, loc, 0, ext_ok, stamp))
        else:
            ignored.append({"key": rel, "reason": "nested deeper than <class>/<file>"})
    return items, ignored


def _tar_members(fileobj, container: str, kind: str, base: int = 0, stem: str | None = None,
                 depth: int = 0) -> list[Item]:
    """Members of an uncompressed tar read as a stream, with absolute data offsets."""
    items = []
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            p = PurePosixPath(m.name)
            if p.suffix.lower() == ".tar" and depth == 0:
                inner = tar.extractfile(m)
                items += _tar_members(inner, container, kind, base + m.offset_data, p.stem, depth + 1)
                continue
            cls = p.parent.name or stem
            key = f"{cls}/{p.name}" if cls else p.name
            items.append(Item(key, cls, m.size, kind, container, base + m.offset_data,
                              p.suffix.lower() in IMAGE_EXTS, str(m.mtime)))
    return items


def _local_tar(path: Path) -> list[Item]:
    with open(path, "rb") as f:
        head = f.read(3)
    if head[:2] == b"\x1f\x8b" or head == b"BZh":
        raise ValueError(f"{path}: compressed tars cannot be read by byte range; decompress it first")
    with open(path, "rb") as f:
        return _tar_members(f, str(path), "tar", stem=path.stem)


def _s3_objects(storage, bucket: str, prefix: str):
    paginator = storage.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/" if prefix else ""):
        for obj in page.get("Contents", []):
            yield obj["Key"], int(obj["Size"]), obj.get("ETag", "").strip('"')


def _local_problem(full: Path) -> tuple[os.stat_result | None, str | None]:
    """(stat, None) for a readable regular file, else (None, reason to list it as rejected)."""
    try:
        st = full.stat()  # follows links: a dangling one raises FileNotFoundError here
    except FileNotFoundError:
        return None, "broken symbolic link" if full.is_symlink() else "file vanished while listing"
    except PermissionError:
        return None, "permission denied"
    except OSError as e:  # e.g. a symlink loop
        return None, f"cannot stat: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    if not os.access(full, os.R_OK):  # always True for root; catches chmod 000 for everyone else
        return None, "permission denied"
    return st, None


def list_source(src: str, split: str, storage=None,
                labels: str | None = None) -> tuple[list[Item], list[dict]]:
    """All candidate items of the split (sorted by key, duplicates refused) and ignored entries."""
    label_map = read_labels_file(labels) if labels else None
    if src.startswith("s3://"):
        if storage is None:
            raise ValueError("an s3:// source needs a Storage")
        bucket, prefix = parse_s3(src)
        objs = list(_s3_objects(storage, bucket, prefix))
        if not objs:
            raise FileNotFoundError(f"no objects under {src}")
        tars = [(k, s) for k, s, _ in objs if k.endswith(".tar")]
        if tars:
            items = []
            for k, _ in sorted(tars):  # one streaming pass per tar to learn the member offsets
                body = storage.client.get_object(Bucket=bucket, Key=k)["Body"]
                items += _tar_members(body, f"{bucket}/{k}", "s3tar", stem=PurePosixPath(k).stem)
            ignored: list[dict] = []
        else:
            root = f"{prefix}/{split}" if prefix else split
            under = [o for o in objs if o[0].startswith(root + "/")]
            root = root if under else prefix
            under = under or objs
            entries = [(k[len(root) + 1:] if root else k, s, f"{bucket}/{k}", etag) for k, s, etag in under]
            items, ignored = _from_relpaths(entries, "s3")
    else:
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"source {src} does not exist")
        if path.is_file() and path.suffix == ".tar":
            items, ignored = _local_tar(path), []
        elif path.is_dir() and sorted(path.glob("*.tar")) and not (path / split).is_dir():
            items = [it for t in sorted(path.glob("*.tar")) for it in _local_tar(t)]
            ignored = []
        else:
            root = path / split if (path / split).is_dir() else path
            entries, unreadable = [], []
            for dirpath, _, files in os.walk(root):
                for fn in files:
                    full = Path(dirpath) / fn
                    rel = full.relative_to(root).as_posix()
                    if PurePosixPath(rel).name.startswith("."):
                        continue
                    st, problem = _local_problem(full)
                    if problem:
                        unreadable.append({"key": rel, "reason": problem})
                    else:
                        entries.append((rel, st.st_size, str(full), str(st.st_mtime_ns)))
            if not entries:
                raise FileNotFoundError(f"no readable files under {root}")
            items, ignored = _from_relpaths(entries, "file")
            ignored += unreadable
    items, more = _apply_labels(items, label_map)
    ignored += more
    unlabeled = [it for it in items if it.class_name is None]
    if unlabeled:
        raise ValueError(f"{len(unlabeled)} files (e.g. {unlabeled[0].key}) sit directly in the split "
                         "folder; pass --labels FILE to name their classes")
    items.sort(key=lambda it: it.key)
    for a, b in zip(items, items[1:], strict=False):
        if a.key == b.key:
            raise ValueError(f"duplicate key {a.key!r} in source {src}")
    return items, ignored


def describe(item: Item) -> str:
    """Where the item's bytes live, for error messages."""
    if item.kind == "file":
        return item.location
    where = item.location if item.kind == "tar" else f"s3://{item.location}"
    return f"{where} @ byte {item.offset}" if item.kind.endswith("tar") else where


def read_item(item: Item, storage=None) -> bytes:
    """The original bytes of one item."""
    if item.kind == "file":
        return Path(item.location).read_bytes()
    if item.kind == "tar":
        with open(item.location, "rb") as f:
            f.seek(item.offset)
            return f.read(item.size)
    bucket, _, key = item.location.partition("/")
    if item.kind == "s3":
        return storage.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    if item.kind == "s3tar":
        if item.size == 0:
            return b""
        rng = f"bytes={item.offset}-{item.offset + item.size - 1}"
        return storage.client.get_object(Bucket=bucket, Key=key, Range=rng)["Body"].read()
    raise ValueError(f"unknown item kind {item.kind!r}")
