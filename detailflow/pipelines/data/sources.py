"""Enumerate ingest sources (ImageNet-style folder, tar files, or an s3:// prefix of either) as items.

Usage:
    items, ignored = list_source("/data/imagenet", split="train")        # folder: <src>/train/<wnid>/*
    items, ignored = list_source("/data/tars", split="train")            # *.tar: <wnid>/<file> members
    items, ignored = list_source("s3://raw/imagenet", split="val", storage=st, labels="s3://raw/val.txt")
    data = read_item(items[0], storage)                                  # original encoded bytes

Tars by split: under a source prefix, a tar whose path (below the prefix) names a split - a folder
`val/...tar` or a name token such as `ILSVRC2012_img_val.tar`, `imagenet-train-0001.tar` (tokens
train, val|validation, test) - belongs to that split only; a tar naming none (`n01440764.tar`, a
class tar) is train data. So the ILSVRC2012 layout (`ILSVRC2012_img_train.tar` of 1000 class tars +
`ILSVRC2012_img_val.tar` of 50,000 flat JPEGs) or 1000 class tars beside the val tar ingest as 1000
train classes and a val split whose classes come from the labels file - never a 1001st class.

Labels (LABELS_FORMAT): a text file, local or s3://, one `<file name> <class name>` per line
(whitespace-separated; blank lines and `#` comments ignored), e.g.
`ILSVRC2012_val_00000001.JPEG n01751748`. `detailflow data convert-val-labels` writes it from the
ILSVRC2012 devkit's `ILSVRC2012_validation_ground_truth.txt` and `meta.mat` (devkit.py).

An Item knows its key (relative path, unique), class name, byte size and where the bytes live: a
local file, an S3 object, or a byte range inside an uncompressed tar (local or on S3; tars inside a
tar, as in ILSVRC2012_img_train.tar, are followed one level and named by their stem), plus a
`stamp` (mtime / ETag) so an edited file changes the ingest's shard digests and hence its version.

Local files that cannot be ingested are listed as rejected with a reason ("broken symbolic link",
"permission denied", "not a regular file"), never a crash: one dangling link must not abort a
1.28M-file listing. A FIFO is refused here because reading one would block the shard task forever.
"""

from __future__ import annotations

import io
import os
import re
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


LABELS_FORMAT = "one '<file name> <class name>' per line, e.g. 'ILSVRC2012_val_00000001.JPEG n01751748'"
LABELS_HINT = "write one with `detailflow data convert-val-labels` from the ILSVRC2012 devkit"
SPLIT_TOKENS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_SPLIT_RE = re.compile(r"(?:^|[_\-./])(train|validation|val|test)(?=[_\-./]|$)", re.IGNORECASE)


def parse_labels(text: str, where: str) -> dict[str, str]:
    """LABELS_FORMAT -> {file name: class name}; a malformed line is an error naming it."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{where} line {n}: {line[:80]!r} is not {LABELS_FORMAT}")
        if out.setdefault(parts[0], parts[1]) != parts[1]:
            raise ValueError(f"{where} line {n}: {parts[0]} labelled twice ({out[parts[0]]}, {parts[1]})")
    if not out:
        raise ValueError(f"{where} holds no labels ({LABELS_FORMAT})")
    return out


def read_labels(spec: str | Path, storage=None) -> dict[str, str]:
    """Labels from a local file or an s3:// URI (LABELS_FORMAT); keys match by file name and stem."""
    return parse_labels(_labels_text(str(spec), storage, read=True), str(spec))


def check_labels_exist(spec: str | Path, storage=None) -> None:
    """Fail fast (before any listing task reads it) when a labels file or s3:// object is missing."""
    _labels_text(str(spec), storage, read=False)


def _labels_text(spec: str, storage, read: bool) -> str:
    """The labels file's text (read) or "" after checking it exists; a clear error naming the converter."""
    if spec.startswith("s3://"):
        if storage is None:
            raise ValueError(f"labels {spec} on S3 need a Storage")
        bucket, key = parse_s3(spec)
        try:
            if not read:
                storage.client.head_object(Bucket=bucket, Key=key)
                return ""
            return storage.client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        except Exception as e:
            raise FileNotFoundError(f"labels file {spec} cannot be read ({type(e).__name__}: {e}); "
                                    f"{LABELS_HINT}") from e
    if not Path(spec).is_file():
        raise FileNotFoundError(f"labels file {spec} does not exist; {LABELS_HINT}")
    return Path(spec).read_text() if read else ""


def tar_split(rel_path: str) -> str | None:
    """The split a tar's path below the source names ('val/a.tar', 'ILSVRC2012_img_val.tar'), else
    None (a class tar such as n01440764.tar: train data)."""
    found = {SPLIT_TOKENS[m.group(1).lower()] for m in _SPLIT_RE.finditer(rel_path)}
    if len(found) > 1:
        raise ValueError(f"tar {rel_path} names several splits {sorted(found)}")
    return found.pop() if found else None


def select_tars(rel_paths: list[str], split: str, src: str) -> list[str]:
    """The tars of `split`: those naming it, plus (for train) those naming no split."""
    want = SPLIT_TOKENS.get(split.lower(), split)
    named = {t: tar_split(t) for t in rel_paths}
    chosen = [t for t in rel_paths if named[t] == want or (named[t] is None and want == "train")]
    if not chosen:
        raise FileNotFoundError(
            f"no tar of split {split!r} under {src} (tars: {sorted(rel_paths)[:5]}...): name the split "
            f"in the tar's name (e.g. ILSVRC2012_img_{want}.tar) or put its tars under {split}/")
    return sorted(chosen)


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
    for rel, size, loc, stamp in entries:  # string operations: ~10x faster than PurePosixPath per file
        parts = [p for p in rel.split("/") if p and p != "."]
        ext_ok = os.path.splitext(parts[-1])[1].lower() in IMAGE_EXTS
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
    """Members of an uncompressed local tar read as a stream, with absolute data offsets; inner
    tars followed one level."""
    items = []
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            p = PurePosixPath(m.name)
            if p.suffix.lower() == ".tar" and depth == 0:
                items += _tar_members(tar.extractfile(m), container, kind, base + m.offset_data, p.stem,
                                      depth + 1)
                continue
            items += _members_of([m], container, kind, base, stem)
    return items


def class_stem(rel_path: str) -> str | None:
    """A class tar's name is its class (n01440764.tar); a split tar's flat members have none."""
    return None if tar_split(rel_path) else PurePosixPath(rel_path).stem


def _check_uncompressed(head: bytes, where: str) -> None:
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh":
        raise ValueError(f"{where}: compressed tars cannot be read by byte range; decompress it first")


def _local_tar(path: Path, rel: str | None = None) -> list[Item]:
    with open(path, "rb") as f:
        _check_uncompressed(f.read(3), str(path))
    with open(path, "rb") as f:
        return _tar_members(f, str(path), "tar", stem=class_stem(rel or path.name))


class S3Range(io.RawIOBase):
    """Seekable read-only view of one S3 object through Range GETs: tarfile walks a tar's headers and
    seeks over big members (inner tars) instead of downloading them. The read-ahead adapts: it
    doubles (to 8 MB) while reads stay sequential (small members: one GET per ~8 MB, not per file)
    and falls back to 64 KB after a seek past it (an inner tar skipped: ~64 KB read per header)."""

    MIN_CHUNK, MAX_CHUNK = 64 << 10, 8 << 20

    def __init__(self, client, bucket: str, key: str, size: int, base: int = 0):
        """The `size` bytes from `base` (an inner tar of an outer one: base = its data offset)."""
        self.client, self.bucket, self.key, self.size, self.chunk = client, bucket, key, size, self.MIN_CHUNK
        self.base, self.pos, self.buf_at, self.buf = base, 0, 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        if not (self.buf_at <= self.pos and self.pos + n <= self.buf_at + len(self.buf)):
            near = self.buf and self.buf_at <= self.pos <= self.buf_at + len(self.buf) + self.chunk
            self.chunk = min(2 * self.chunk, self.MAX_CHUNK) if near else self.MIN_CHUNK
            end = min(self.size, self.pos + max(n, self.chunk)) - 1
            rng = f"bytes={self.base + self.pos}-{self.base + end}"
            self.buf = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=rng)["Body"].read()
            self.buf_at = self.pos
        out = self.buf[self.pos - self.buf_at: self.pos - self.buf_at + n]
        self.pos += len(out)
        return out


def list_s3_tar(storage, bucket: str, key: str, size: int, stem: str | None, base: int = 0,
                depth: int = 0) -> tuple[list[Item], list[tuple]]:
    """One S3 tar's members read by range (a worker task): its files, and - at depth 0 - its inner
    tars as (bucket, key, size, stem, base, 1) to list in tasks of their own, so the 1,000 class
    tars inside ILSVRC2012_img_train.tar are listed in parallel, not by one task reading 138 GB."""
    f = S3Range(storage.client, bucket, key, size, base=base)
    _check_uncompressed(f.read(3), f"s3://{bucket}/{key}")
    f.seek(0)
    items, inner = [], []
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if m.isfile() and PurePosixPath(m.name).suffix.lower() == ".tar" and depth == 0:
                inner.append((bucket, key, m.size, PurePosixPath(m.name).stem, base + m.offset_data, 1))
            else:
                items += _members_of([m], f"{bucket}/{key}", "s3tar", base, stem)
    return items, inner


def _members_of(members, container: str, kind: str, base: int, stem: str | None) -> list[Item]:
    out = []
    for m in members:
        if not m.isfile():
            continue
        p = PurePosixPath(m.name)
        cls = p.parent.name or stem
        key = f"{cls}/{p.name}" if cls else p.name
        out.append(Item(key, cls, m.size, kind, container, base + m.offset_data,
                        p.suffix.lower() in IMAGE_EXTS, str(m.mtime)))
    return out


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


def _serial(fn, calls: list[tuple]) -> list:
    return [fn(*args) for args in calls]


def list_source(src: str, split: str, storage=None, labels: str | None = None,
                map_tasks=_serial) -> tuple[list[Item], list[dict]]:
    """All candidate items of the split (sorted by key, duplicates refused) and ignored entries.

    `map_tasks(fn, [args, ...]) -> [result, ...]` runs the per-tar listings of an S3 source (ingest
    passes one that runs them as Ray tasks on the workers); the default runs them here."""
    label_map = read_labels(labels, storage) if labels else None  # first: a missing file fails fast
    ignored: list[dict] = []
    if src.startswith("s3://"):
        if storage is None:
            raise ValueError("an s3:// source needs a Storage")
        bucket, prefix = parse_s3(src)
        objs = list(_s3_objects(storage, bucket, prefix))
        if not objs:
            raise FileNotFoundError(f"no objects under {src}")
        rel = {(k[len(prefix) + 1:] if prefix else k): (k, s) for k, s, _ in objs if k.endswith(".tar")}
        if rel:
            calls = [(storage, bucket, rel[t][0], rel[t][1], class_stem(t))
                     for t in select_tars(list(rel), split, src)]
            items = []
            while calls:  # the selected tars, then the tars inside them, each listing a task
                parts = map_tasks(list_s3_tar, calls)
                items += [it for its, _ in parts for it in its]
                calls = [(storage, *inner) for _, inners in parts for inner in inners]
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
        found = sorted(path.glob("*.tar")) + sorted(path.glob("*/*.tar")) if path.is_dir() else []
        tars = [p.relative_to(path).as_posix() for p in found]
        if path.is_file() and path.suffix == ".tar":
            items = _local_tar(path)
        elif tars and (not (path / split).is_dir() or any(t.startswith(split + "/") for t in tars)):
            items = [it for t in select_tars(tars, split, src) for it in _local_tar(path / t, t)]
        else:
            items, ignored = _list_folder(path / split if (path / split).is_dir() else path)
    items, more = _apply_labels(items, label_map)
    ignored += more
    unlabeled = [it for it in items if it.class_name is None]
    if unlabeled:
        raise ValueError(f"{len(unlabeled)} files (e.g. {unlabeled[0].key}) have no class folder or class "
                         f"tar; pass --labels FILE|s3://... ({LABELS_FORMAT})")
    items.sort(key=lambda it: it.key)
    for a, b in zip(items, items[1:], strict=False):
        if a.key == b.key:
            raise ValueError(f"duplicate key {a.key!r} in source {src}")
    return items, ignored


def _list_folder(root: Path) -> tuple[list[Item], list[dict]]:
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
    return items, ignored + unreadable


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
