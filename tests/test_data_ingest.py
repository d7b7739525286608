"""Ingest on the real local S3 (SeaweedFS) with Ray tasks: counts, rejects, resume, checksums, sources."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from detailflow.pipelines.data import synth
from detailflow.pipelines.data.images import inspect_image
from detailflow.pipelines.data.ingest import IngestConfig, IngestInterrupted, ingest, verify_dataset
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
    assert storage.read_manifest("datasets/planted/train")["files"].keys() == {s["name"] for s in m["shards"]}


def test_crash_then_resume_gives_identical_manifest(planted, ingested, storage, ray_session):
    root, good, _ = planted
    cfg = IngestConfig(name="crashy", split="train", shard_mb=SHARD_MB, fail_after_shards=2)
    with pytest.raises(IngestInterrupted):
        ingest(storage, str(root), cfg)
    assert storage.read_manifest("datasets/crashy/train") is None  # never a manifest for a partial set
    done_keys = storage.list_keys("datasets/crashy/train/_done/")
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
