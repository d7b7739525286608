"""The Fashion-MNIST judge (issue 18 item 7): class accuracy of samples, the classifier cache (safetensors
+ sha256), the import-idx stage kind and its message when the dataset is absent. Unit-sized: tiny IDX
files written here, except one quick check on the real Fashion-MNIST files when Debian's package is there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from detailflow.models.classifier import ClassifierTrainConfig, class_accuracy, predict, train_classifier
from detailflow.models.tokenizer import to_model_range
from detailflow.pipelines.data.idx import write_idx
from detailflow.pipelines.evaluate.class_score import (
    FMNIST_DIR,
    cached_classifier,
    idx_paths,
    load_idx_split,
    score_samples,
)


def _write_dataset(root: Path, n_train: int = 60, n_test: int = 20, classes: int = 3) -> Path:
    """IDX files whose class c is a bright horizontal bar at row 4 + 8c (28x28, like Fashion-MNIST)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % classes
        imgs = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            imgs[i, 4 + 8 * c: 8 + 8 * c, 2:26] = 230
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", imgs)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root


def test_class_accuracy_is_the_share_of_matching_predictions():
    gen = torch.Generator().manual_seed(0)
    cond = torch.randint(0, 10, (257,), generator=gen)
    other = torch.randint(0, 10, (257,), generator=gen)
    pred = torch.where(torch.rand(257, generator=gen) < 0.6, cond, other)
    matches = sum(1 for p, c in zip(pred.tolist(), cond.tolist(), strict=True) if p == c)
    assert class_accuracy(pred, cond) == pytest.approx(matches / 257)
    assert class_accuracy(cond, cond) == 1.0
    with pytest.raises(ValueError, match="equal-length"):
        class_accuracy(pred[:3], cond)


def test_score_samples_counts_per_class(tmp_path):
    """score_samples against an independent per-class count of the same classifier's predictions."""
    root = _write_dataset(tmp_path)
    x, y = load_idx_split(root, "train")
    clf = train_classifier(x, y, ClassifierTrainConfig(steps=5, batch=8, width=4))
    cond = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    imgs = x[:7]
    pred = predict(clf, to_model_range(imgs)).tolist()
    out = score_samples(clf, imgs, cond)
    hits = sum(p == c for p, c in zip(pred, cond.tolist(), strict=True))
    assert out["class_accuracy"] == pytest.approx(hits / 7)
    for c in range(3):
        rows = [i for i in range(7) if cond[i] == c]
        want = sum(pred[i] == c for i in rows) / len(rows)
        assert out["class_accuracy_per_class"][c] == pytest.approx(want)


def test_classifier_learns_and_the_cache_is_checked_by_sha256(tmp_path):
    root = _write_dataset(tmp_path / "data")
    cfg = ClassifierTrainConfig(steps=60, batch=16, width=8)
    logs: list[str] = []
    clf, path = cached_classifier(root, tmp_path / "cache", cfg, log=logs.append)
    assert path.suffix == ".safetensors" and path.with_suffix(".sha256").is_file()
    test_x, test_y = load_idx_split(root, "test")
    assert class_accuracy(predict(clf, to_model_range(test_x)), test_y) >= 0.9  # bars are easy
    again, _ = cached_classifier(root, tmp_path / "cache", cfg, log=logs.append)
    assert any("from cache" in m for m in logs)
    for k, v in clf.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)  # corrupt the cached weights
    logs.clear()
    cached_classifier(root, tmp_path / "cache", cfg, log=logs.append)
    assert any("does not match" in m for m in logs) and not any("from cache" in m for m in logs)


def test_missing_dataset_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        idx_paths(tmp_path, "train")


def test_import_idx_stage_writes_train_and_test_as_val(tmp_path):
    from detailflow.pipelines.runner.stages import KINDS, StageContext

    root = _write_dataset(tmp_path / "idx", n_train=12, n_test=6)
    ctx = StageContext(settings=None, pipeline="p", stage="data", identity="x", resources={},
                       log=lambda m: None)
    out = KINDS["import-idx"].fn({"dir": str(root), "out": str(tmp_path / "out"), "train_limit": 9}, ctx)
    assert (out["train_images"], out["val_images"]) == (9, 6)
    assert sorted(p.name for p in (tmp_path / "out" / "val").iterdir()) == ["00_t-shirt", "01_trouser",
                                                                            "02_pullover"]
    assert len(list((tmp_path / "out" / "train").rglob("*.png"))) == 9
    with pytest.raises(ValueError, match="unknown params"):
        KINDS["import-idx"].fn({"out": str(tmp_path), "limit": 3}, ctx)


@pytest.mark.skipif(not Path(FMNIST_DIR, "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_classifier_reads_real_fashion_mnist():
    """A quick subset check on the real files: 200 steps on 300 images per class already tell the ten
    classes apart well above chance (0.1) on 50 held-out test images per class."""
    x, y = load_idx_split(FMNIST_DIR, "train", per_class=300)
    clf = train_classifier(x, y, ClassifierTrainConfig(steps=200, batch=32, width=16))
    tx, ty = load_idx_split(FMNIST_DIR, "test", per_class=50)
    assert class_accuracy(predict(clf, to_model_range(tx)), ty) >= 0.6


class _CountingFeatures:
    """A cheap stand-in for the FID Inception (same call contract: uint8 images -> N x D float64, a cfg
    with the sha256 the S3 cache key carries) that counts the images it sees: the cost being pinned."""

    def __init__(self):
        from detailflow.pipelines.evaluate.inception import InceptionConfig

        self.cfg, self.seen = InceptionConfig(), 0

    def __call__(self, images_u8):
        x = torch.as_tensor(images_u8).double()
        self.seen += len(x)
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), x[:, :, ::4, ::4].flatten(1)], 1).numpy()


@pytest.mark.integration
def test_score_reference_is_the_shared_cached_val_pass(storage, ray_session, tmp_path):
    """class-score with `dataset` takes its FID reference from the ingested val split through
    artifacts.real_features' S3 cache under the key evaluate-tokenizer (max_images 0, micro-batch 32)
    and promote (n_ref 0, micro-batch 64) read: the pipeline pays ONE Inception pass over the reference
    (on 2 cores ~0.16 s per image), not one per stage. The features are those of the IDX test images
    themselves (checked against a direct pass over load_idx_split's pixels, as row sets)."""
    from detailflow.models.configs import get_model_config
    from detailflow.models.resolution import ResolutionMap
    from detailflow.pipelines.data.ingest import IngestConfig, ingest
    from detailflow.pipelines.evaluate.artifacts import real_features
    from detailflow.pipelines.evaluate.class_score import ClassScoreConfig, reference_features
    from detailflow.pipelines.runner.stages import KINDS, StageContext

    root = _write_dataset(tmp_path / "idx", n_train=6, n_test=12)
    ctx = StageContext(settings=None, pipeline="p", stage="data", identity="x", resources={},
                       log=lambda m: None)
    KINDS["import-idx"].fn({"dir": str(root), "out": str(tmp_path / "out")}, ctx)
    name = f"cs-ref-{tmp_path.name[-12:].lower().replace('_', '-')}"
    ingest(storage, str(tmp_path / "out"), IngestConfig(name=name, split="val", shard_mb=0.05, use_ray=False))
    rmap = ResolutionMap.from_config(get_model_config("smoke").tokenizer)
    assert rmap.image_size == 32
    net = _CountingFeatures()
    cfg = ClassScoreConfig(ar="unused", data_dir=str(root), dataset=name, split="val", n_real=0)
    ref = reference_features(cfg, storage, rmap, net, log=lambda m: None)
    assert net.seen == 12 and ref.shape[0] == 12  # the whole split, once
    # eval-tokenizer, promote, and any stage whose limit covers the split (real_features keys it "all")
    for kwargs in ({"limit": 0, "micro_batch": 32}, {"limit": 0, "micro_batch": 64},
                   {"limit": 12, "micro_batch": 64}, {"limit": 5000, "micro_batch": 16}):
        again, _ = real_features(storage, name, "val", rmap, net, log=lambda m: None, **kwargs)
        np.testing.assert_array_equal(again, ref)
    big = reference_features(dataclasses.replace(cfg, n_real=5000), storage, rmap, net, log=lambda m: None)
    np.testing.assert_array_equal(big, ref)  # a limit covering the split is "all": the same key
    assert net.seen == 12  # no stage paid a second pass
    direct = _CountingFeatures()(load_idx_split(root, "test")[0])
    np.testing.assert_allclose(np.sort(ref, 0), np.sort(direct, 0), rtol=0, atol=1e-9)
