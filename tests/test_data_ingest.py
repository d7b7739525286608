"""Ingest on the real local S3 (SeaweedFS) with Ray tasks: counts, rejects, resume, checksums, sources,
read errors (retried, then fatal; never a rejection), unreadable listings, 16-bit decode."""

from __future__ import annotations

import errno
import io
import os
import re
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from detailflow.pipelines.data import sources, synth
from detailflow.pipelines.data.images import decode_rgb, inspect_image
from detailflow.pipelines.data.ingest import (
    IngestConfig,
    IngestInterrupted,
    SourceReadError,
    ingest,
    plan_shards,
    task_options,
    verify_dataset,
)
from detailflow.pipelines.data.sources import Item, list_source
from detailflow.platform.storage import ChecksumMismatch

pytestmark = pytest.mark.integration
C = synth.CLASS_NAMES
PER_CLASS = 6
SHARD_MB = 0.012  # ~12 KB: several shards from ~60 tiny PNGs


def _img_bytes(mode: str, fmt: str, seed: int) -> bytes:
    img = Image.fromarray(synth.render(seed % 10, 24, np.random.default_rng(seed))).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """An ImageNet-style folder with planted bad and unusual files; returns (root, good, bad) keys."""
    root = tmp_path_factory.mktemp("planted")
    synth.write_folder(root, size=24, per_class=PER_CLASS, val_per_class=2, seed=0)
    jpeg = _img_bytes("RGB", "JPEG", 1)
    extra_good = {f"{C[1]}/cmyk.JPEG": _img_bytes("CMYK", "JPEG", 2),
                  f"{C[2]}/grey.png": _img_bytes("L", "PNG", 3),
                  f"{C[3]}/palette.JPEG": _img_bytes("P", "PNG", 4)}  # PNG bytes named .JPEG
    bad = {f"{C[0]}/truncated.JPEG": (jpeg[: len(jpeg) // 2], "truncated"),
           f"{C[0]}/zero.JPEG": (b"", "zero-byte"),
           f"{C[0]}/text.JPEG": (b"just some text\n", "cannot identify"),
           f"{C[4]}/notes.txt": (b"not an image", "extension")}
    for key, data in extra_good.items():
        (root / "train" / key).write_bytes(data)
    for key, (data, _) in bad.items():
        (root / "train" / key).write_bytes(data)
    good = sorted([p.relative_to(root / "train").as_posix() for p in (root / "train").rglob("*.png")]
                  + [k for k in extra_good if not k.endswith(".png")])
    return root, good, bad


def _rows(storage, manifest) -> list[dict]:
    rows = []
    for shard in manifest["shards"]:
        data = storage.get_bytes(shard["key"], expected_sha256=shard["sha256"])
        table = pq.read_table(io.BytesIO(data))
        assert table.num_rows == shard["rows"]
        rows += table.to_pylist()
    return rows


def _comparable(manifest: dict) -> dict:
    out = {k: v for k, v in manifest.items() if k not in ("name", "source")}
    out["shards"] = [{k: v for k, v in s.items() if k != "key"} for s in manifest["shards"]]
    return out


@pytest.fixture(scope="module")
def ingested(planted, storage, ray_session):
    root, _, _ = planted
    return ingest(storage, str(root), IngestConfig(name="planted", split="train", shard_mb=SHARD_MB))


def test_manifest_counts_rejects_and_rows(planted, ingested, storage):
    _, good, bad = planted
    m = ingested
    assert m["classes"] == C and m["num_classes"] == 10
    expect = {c: PER_CLASS for c in C}
    for c in (C[1], C[2], C[3]):
        expect[c] += 1
    assert m["counts_per_class"] == expect and m["num_images"] == len(good) == 63
    assert len(m["shards"]) >= 3 and sum(s["rows"] for s in m["shards"]) == 63
    assert m["num_rejected"] == len(bad)
    for r in m["rejected"]:
        assert bad[r["key"]][1].lower() in r["reason"].lower(), r
    rows = _rows(storage, m)
    assert sorted(r["key"] for r in rows) == good  # every good file exactly once
    for r in rows:
        w, h, _, _ = inspect_image(r["image"])
        assert (r["width"], r["height"]) == (w, h) == (24, 24)
        assert C[r["label"]] == r["key"].split("/")[0]
    vprefix = f"datasets/planted/train/v-{m['version']}"
    assert all(s["key"] == f"{vprefix}/{s['name']}" for s in m["shards"])  # shards live in the version
    assert storage.read_manifest("datasets/planted/train")["files"].keys() == {
        f"v-{m['version']}/{s['name']}" for s in m["shards"]}
    assert storage.read_manifest(vprefix) == m  # the version's immutable copy equals the pointer


def test_crash_then_resume_gives_identical_manifest(planted, ingested, storage, ray_session):
    root, good, _ = planted
    cfg = IngestConfig(name="crashy", split="train", shard_mb=SHARD_MB, fail_after_shards=2)
    with pytest.raises(IngestInterrupted):
        ingest(storage, str(root), cfg)
    assert storage.read_manifest("datasets/crashy/train") is None  # never a manifest for a partial set
    # same input as `ingested` -> same content-addressed version
    done_keys = storage.list_keys(f"datasets/crashy/train/v-{ingested['version']}/_done/")
    done_before = {k: storage.head(k)["LastModified"] for k in done_keys}
    assert len(done_before) >= 2
    cfg.fail_after_shards = None
    m = ingest(storage, str(root), cfg)
    assert _comparable(m) == _comparable(ingested)
    for k, t in done_before.items():  # finished shards were skipped, not rewritten
        assert storage.head(k)["LastModified"] == t
    keys = [r["key"] for r in _rows(storage, m)]
    assert len(keys) == len(set(keys)) == len(good)
    assert ingest(storage, str(root), cfg) == m  # a third run is a no-op


def test_corrupted_shard_is_detected_and_repaired(planted, storage, ray_session):
    root, _, _ = planted
    cfg = IngestConfig(name="rot", split="train", shard_mb=SHARD_MB, use_ray=False)
    m = ingest(storage, str(root), cfg)
    shard = m["shards"][1]
    data = bytearray(storage.get_bytes(shard["key"]))
    data[len(data) // 2] ^= 0xFF  # bit rot, object metadata (recorded sha256) left as it was
    storage.client.put_object(Bucket=storage.bucket, Key=shard["key"], Body=bytes(data),
                              Metadata={"sha256": shard["sha256"]})
    with pytest.raises(ChecksumMismatch):
        storage.get_bytes(shard["key"], expected_sha256=shard["sha256"])
    problems = verify_dataset(storage, "rot", "train")
    assert len(problems) == 1 and shard["key"] in problems[0] and "mismatch" in problems[0]
    cfg.verify_existing = True
    assert ingest(storage, str(root), cfg) == m
    assert verify_dataset(storage, "rot", "train") == []


def test_tar_and_s3_sources_match_folder(planted, ingested, storage, tmp_path):
    root, good, _ = planted
    tar_path = tmp_path / "train.tar"
    with tarfile.open(tar_path, "w") as tar:
        for cls in sorted((root / "train").iterdir()):
            tar.add(cls, arcname=cls.name)
    m_tar = ingest(storage, str(tar_path), IngestConfig(name="fromtar", split="train", use_ray=False))
    for p in sorted((root / "train").rglob("*")):
        if p.is_file():
            storage.put_bytes(f"raw/planted/train/{p.relative_to(root / 'train').as_posix()}", p.read_bytes())
    m_s3 = ingest(storage, f"s3://{storage.bucket}/raw/planted",
                  IngestConfig(name="froms3", split="train", use_ray=False))
    for m in (m_tar, m_s3):
        assert m["counts_per_class"] == ingested["counts_per_class"]
        assert m["rejected"] == ingested["rejected"]
        assert sorted(r["key"] for r in _rows(storage, m)) == good


def test_val_split_reuses_train_classes_and_labels_file(planted, ingested, storage, tmp_path):
    root, _, _ = planted
    m = ingest(storage, str(root), IngestConfig(name="planted", split="val", use_ray=False))
    assert m["classes"] == ingested["classes"] and m["num_images"] == 20
    flat = tmp_path / "flatval"
    flat.mkdir()
    lines = []
    for i, p in enumerate(sorted((root / "val").rglob("*.png"))[:5]):
        (flat / f"v{i}.png").write_bytes(p.read_bytes())
        lines.append(f"v{i}.png {p.parent.name}")
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    cfg = IngestConfig(name="planted", split="val2", labels=str(tmp_path / "labels.txt"), use_ray=False)
    m2 = ingest(storage, str(flat), cfg)
    assert m2["classes"] == C and m2["num_images"] == 5
    with pytest.raises(ValueError, match="--labels"):
        ingest(storage, str(flat), IngestConfig(name="planted", split="val3", use_ray=False))


# ---- read errors, unreadable listings, high-depth decode ------------------------------------------
def _small(root: Path, seed: int = 0) -> Path:
    synth.write_folder(root, size=16, per_class=2, val_per_class=1, seed=seed)  # 20 x ~340 B
    return root


def test_persistent_read_error_fails_naming_the_path_and_leaves_no_marker(storage, ray_session, tmp_path):
    root = _small(tmp_path / "src")
    cfg = IngestConfig(name="readerr", split="train", shard_mb=0.002, max_in_flight=1)
    items, _ = list_source(str(root), "train")
    shards = plan_shards(items, int(cfg.shard_mb * 1024 * 1024), cfg.shuffle_seed)
    assert len(shards) >= 3
    victim = Path(shards[-1][0].location)
    data, st = victim.read_bytes(), victim.stat()

    def vanish(_n):  # driver side, after shard 0 and before the last shard is even submitted
        victim.unlink(missing_ok=True)

    with pytest.raises(SourceReadError, match=re.escape(str(victim))) as info:
        ingest(storage, str(root), cfg, progress=vanish)
    assert type(info.value) is SourceReadError  # the plain error, not a RayTaskError with a traceback
    assert "FileNotFoundError" in str(info.value) and "4 attempt" in str(info.value)
    assert storage.read_manifest("datasets/readerr/train") is None
    done = {k.rsplit("/", 1)[1] for k in storage.list_keys("datasets/readerr/train/") if "/_done/" in k}
    last = f"part-{len(shards) - 1:05d}.parquet"
    assert "part-00000.parquet.json" in done and f"{last}.json" not in done  # not a "rejected" shard

    victim.write_bytes(data)  # the fix: the file is back (same bytes and mtime -> same version)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    m = ingest(storage, str(root), cfg)
    assert m["num_images"] == len(items) and m["num_rejected"] == 0
    assert str(victim.relative_to(root / "train")) in {r["key"] for r in _rows(storage, m)}


def test_transient_read_error_is_retried_and_the_image_ingested(storage, tmp_path, monkeypatch):
    root = _small(tmp_path / "src")
    items, _ = list_source(str(root), "train")
    target, real, calls = items[3].key, sources.read_item, []

    def flaky(item, st=None):  # fault injection on the real read path: EIO twice, then the real bytes
        if item.key == target:
            calls.append(item.key)
            if len(calls) <= 2:
                raise OSError(errno.EIO, "Input/output error (injected)", item.location)
        return real(item, st)

    monkeypatch.setattr(sources, "read_item", flaky)
    m = ingest(storage, str(root), IngestConfig(name="flaky", split="train", use_ray=False))
    assert len(calls) == 3 and m["num_rejected"] == 0 and m["num_images"] == len(items)
    assert target in {r["key"] for r in _rows(storage, m)}


def test_broken_symlink_and_fifo_are_rejected_at_listing_and_ray_ingests_the_rest(storage, ray_session,
                                                                                   tmp_path):
    root = _small(tmp_path / "src")
    (root / "train" / C[0] / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(root / "train" / C[1] / "pipe.png")  # reading it would block the task forever
    m = ingest(storage, str(root), IngestConfig(name="links", split="train"))  # Ray, pinned to this node
    assert {r["key"]: r["reason"] for r in m["rejected"]} == {
        f"{C[0]}/dangling.png": "broken symbolic link", f"{C[1]}/pipe.png": "not a regular file"}
    assert m["num_images"] == 20 and len(_rows(storage, m)) == 20


def test_local_source_tasks_are_pinned_to_the_driver_node(ray_session):
    cfg = IngestConfig(name="x")
    opts = task_options(cfg, [Item("a/b.png", "a", 1, "file", "/tmp/b.png")])
    strategy = opts["scheduling_strategy"]
    assert strategy.node_id == ray_session.get_runtime_context().get_node_id() and strategy.soft is False
    assert "scheduling_strategy" not in task_options(cfg, [Item("a/b.png", "a", 1, "s3", "bkt/a/b.png")])
    with pytest.raises(ValueError, match="stage the source on S3"):  # the driver node cannot host them
        task_options(IngestConfig(name="x", task_cpus=10_000), [Item("a/b.png", "a", 1, "tar", "/t.tar")])


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _pil_bytes(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_high_depth_images_are_scaled_to_8_bits_not_clipped():
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32)  # mean 32767.5 = mid-grey
    cases = {
        "I;16 png": _pil_bytes(ramp.astype(np.uint16), "PNG"),
        "I;16 tiff": _pil_bytes(ramp.astype(np.uint16), "TIFF"),
        "I tiff (int32, 16-bit range)": _pil_bytes(ramp.astype(np.int32), "TIFF"),
        "F tiff in [0, 1]": _pil_bytes((ramp / 65535).astype(np.float32), "TIFF"),
        "16-bit RGB png": _png16(np.repeat(ramp[..., None], 3, axis=2).astype(np.uint16), 2),
    }
    for name, data in cases.items():
        img = decode_rgb(data)
        mean = np.asarray(img, np.float64).mean()
        opened = Image.open(io.BytesIO(data)).mode
        assert img.mode == "RGB" and abs(mean - 127.5) < 1.275, (name, opened, mean)  # within 1%
