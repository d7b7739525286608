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


# ---- ImageNet as users have it: tars by split, val labels, the devkit converter ------------------
def _tar_of(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _imagenet_layout(root: Path, classes=("n01440764", "n01443537", "n02119789"), per_class=2,
                     outer: bool = False) -> dict[str, str]:
    """Class tars (or ILSVRC2012_img_train.tar holding them) + ILSVRC2012_img_val.tar of flat JPEGs,
    side by side under one prefix, as ImageNet is downloaded. Returns {val file name: its class}."""
    root.mkdir(parents=True, exist_ok=True)
    class_tars = {}
    for c, cls in enumerate(classes):
        members = {f"{cls}_{i}.JPEG": _img_bytes("RGB", "JPEG", 10 * c + i) for i in range(per_class)}
        class_tars[cls] = _tar_of(root / f"{cls}.tar", members)
    if outer:
        inner = {f"{c}.tar": p.read_bytes() for c, p in class_tars.items()}
        _tar_of(root / "ILSVRC2012_img_train.tar", inner)
        for p in class_tars.values():
            p.unlink()
    val = {f"ILSVRC2012_val_{i:08d}.JPEG": classes[(i * 7) % len(classes)] for i in range(1, 6)}
    _tar_of(root / "ILSVRC2012_img_val.tar", {f: _img_bytes("RGB", "JPEG", 100 + i)
                                               for i, f in enumerate(val)})
    return val


def test_tar_split_names():
    assert sources.tar_split("ILSVRC2012_img_val.tar") == "val"
    assert sources.tar_split("ILSVRC2012_img_train.tar") == "train"
    assert sources.tar_split("validation/shard-0001.tar") == "val"
    assert sources.tar_split("imagenet-train-000017.tar") == "train"
    assert sources.tar_split("n01440764.tar") is None and sources.tar_split("interval.tar") is None


def test_imagenet_sized_tar_listing_splits_1000_class_tars_from_the_val_tar():
    """1,000 class tars + the val tar + the test tar under one prefix: train = the 1,000, val = 1."""
    wnids = [f"n{10000000 + 37 * i:08d}" for i in range(1000)]
    names = [f"{w}.tar" for w in wnids] + ["ILSVRC2012_img_val.tar", "ILSVRC2012_img_test_v10102019.tar"]
    train = sources.select_tars(names, "train", "s3://raw/ILSVRC2012")
    assert len(train) == 1000 and {sources.class_stem(t) for t in train} == set(wnids)
    assert sources.select_tars(names, "val", "s3://raw") == ["ILSVRC2012_img_val.tar"]
    assert sources.class_stem("ILSVRC2012_img_val.tar") is None  # its flat JPEGs: classes from labels
    with pytest.raises(FileNotFoundError, match="no tar of split 'val'"):
        sources.select_tars([f"{w}.tar" for w in wnids], "val", "s3://raw")


@pytest.mark.parametrize("outer", [False, True], ids=["class-tars", "ILSVRC2012_img_train.tar"])
def test_local_tars_by_split_and_val_labels(tmp_path, outer):
    val = _imagenet_layout(tmp_path / "ILSVRC2012", outer=outer)
    train, _ = list_source(str(tmp_path / "ILSVRC2012"), "train")
    assert sorted({it.class_name for it in train}) == ["n01440764", "n01443537", "n02119789"]
    assert len(train) == 6 and all(it.key.startswith(it.class_name + "/") for it in train)
    with pytest.raises(ValueError, match="--labels"):
        list_source(str(tmp_path / "ILSVRC2012"), "val")
    labels = tmp_path / "val_labels.txt"
    labels.write_text("# file class\n" + "".join(f"{f} {c}\n" for f, c in val.items()))
    items, _ = list_source(str(tmp_path / "ILSVRC2012"), "val", labels=str(labels))
    assert {it.key.split("/")[1]: it.class_name for it in items} == val
    assert [sources.read_item(it)[:2] for it in items] == [b"\xff\xd8"] * 5  # the JPEG bytes by range


def test_labels_format_errors_and_a_missing_file_fail_fast(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a.JPEG n1\nb.JPEG,n2\n")
    with pytest.raises(ValueError, match="line 2"):
        sources.read_labels(str(bad))
    with pytest.raises(FileNotFoundError, match="convert-val-labels"):
        list_source(str(tmp_path), "val", labels=str(tmp_path / "nope.txt"))


def test_devkit_converter_maps_ground_truth_ids_through_meta(tmp_path):
    """Line i of the ground truth is ILSVRC2012_val_{i:08d}.JPEG; its ID goes through meta's
    ILSVRC2012_ID -> WNID table (not sorted WNIDs); checked against the table built here."""
    from detailflow.pipelines.data import devkit

    rng = np.random.default_rng(0)
    wnids = [f"n{x:08d}" for x in rng.choice(10**8, size=1000, replace=False)]  # ID i -> wnids[i-1]
    gt = rng.integers(1, 1001, size=50)
    (tmp_path / "gt.txt").write_text("".join(f"{g}\n" for g in gt))
    (tmp_path / "meta.txt").write_text("".join(f"{i} {w}\n" for i, w in enumerate(wnids, 1)))
    expected = [f"ILSVRC2012_val_{n:08d}.JPEG {wnids[g - 1]}" for n, g in enumerate(gt, 1)]
    assert devkit.write_val_labels(tmp_path / "gt.txt", tmp_path / "meta.txt", tmp_path / "out.txt") == 50
    assert (tmp_path / "out.txt").read_text().splitlines() == expected
    scipy_io = pytest.importorskip("scipy.io")
    # meta.mat as the devkit ships it: 1,860 synsets, the 1,000 leaves (num_children 0) carry IDs 1..1000
    rows = [(i, w, 0) for i, w in enumerate(wnids, 1)] + [(1000 + k, f"n9{k:07d}", 3) for k in range(1, 861)]
    synsets = np.array(rows, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    scipy_io.savemat(tmp_path / "meta.mat", {"synsets": synsets})
    assert devkit.val_labels(tmp_path / "gt.txt", tmp_path / "meta.mat") == \
        [tuple(e.split()) for e in expected]
    (tmp_path / "gt.txt").write_text("3\n1001\n")
    with pytest.raises(ValueError, match="entry 2"):
        devkit.val_labels(tmp_path / "gt.txt", tmp_path / "meta.txt")


def test_s3_tars_by_split_listed_by_worker_tasks_with_s3_labels(storage, ray_session, tmp_path):
    """ILSVRC2012_img_train.tar (class tars inside) + the val tar on S3: the train ingest has the
    3 classes (never a 4th from the val tar), listing runs in Ray tasks; val takes s3:// labels."""
    val = _imagenet_layout(tmp_path / "src", outer=True)
    for p in (tmp_path / "src").iterdir():
        storage.put_bytes(f"raw/ilsvrc/{p.name}", p.read_bytes())
    storage.put_bytes("raw/ilsvrc/val_labels.txt", "".join(f"{f} {c}\n" for f, c in val.items()).encode())
    src = f"s3://{storage.bucket}/raw/ilsvrc"
    rounds = []

    def recording(fn, calls):  # what ingest hands to Ray tasks: one call per tar, inner tars apart
        rounds.append([c[2] for c in calls])
        return sources._serial(fn, calls)

    items, _ = list_source(src, "train", storage=storage, map_tasks=recording)
    assert rounds[0] == ["raw/ilsvrc/ILSVRC2012_img_train.tar"] and len(rounds[1]) == 3, rounds
    assert len(items) == 6
    m = ingest(storage, src, IngestConfig(name="ilsvrc", split="train"))
    assert m["classes"] == ["n01440764", "n01443537", "n02119789"] and m["num_images"] == 6
    mv = ingest(storage, src, IngestConfig(name="ilsvrc", split="val", labels=f"{src}/val_labels.txt"))
    assert mv["classes"] == m["classes"] and mv["num_images"] == 5
    got = {r["key"].split("/")[1]: m["classes"][r["label"]] for r in _rows(storage, mv)}
    assert got == val


def test_pipelines_val_ingest_names_staged_labels_beside_its_source():
    """`ingest-val` names a labels file a cluster can read: an s3:// object staged beside the raw
    ImageNet (written by `detailflow data convert-val-labels`), or a file in the repository - never a
    path inside the image that nothing creates."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    seen = 0
    for path in sorted((root / "configs" / "pipelines").glob("*.yaml")):
        for stage in yaml.safe_load(path.read_text())["stages"]:
            labels = stage.get("params", {}).get("labels")
            if stage["kind"] != "ingest" or labels is None:
                continue
            seen += 1
            if labels.startswith("s3://"):
                assert labels.startswith(stage["params"]["src"].rstrip("/") + "/"), (path.name, labels)
                assert sources.parse_s3(labels)[1].endswith(".txt")
            else:
                assert (root / labels).is_file(), f"{path.name}: {labels} does not exist"
    assert seen >= 3


def test_tasks_in_flight_scale_with_the_cluster(ray_session):
    """Not a fixed 8: twice the tasks the cluster's CPUs run at once (the session's Ray has 4 CPUs),
    unless max_in_flight says otherwise."""
    from detailflow.pipelines.data.ingest import in_flight

    cpus = ray_session.cluster_resources()["CPU"]
    assert cpus == 4
    assert in_flight(IngestConfig(name="x", task_cpus=0.25)) == 2 * 4 / 0.25 == 32
    assert in_flight(IngestConfig(name="x", task_cpus=1.0)) == 8
    assert in_flight(IngestConfig(name="x", max_in_flight=3)) == 3
