"""Class accuracy + FID/KID of a generator's class-conditional samples on an MNIST-family IDX dataset
(Fashion-MNIST: Debian's `dataset-fashion-mnist`, /usr/share/datasets/fashion-mnist).

    detailflow pipeline run configs/pipelines/fashion-mnist.yaml     # stage `score` (kind class-score)

A SmallCNN (models/classifier.py) trained on the dataset's TRAINING split is the judge: class accuracy =
share of samples whose predicted class is the class they were conditioned on. FID/KID compare the
samples' Inception pool3 features (pipelines/evaluate/inception.py, metrics.py) with those of the TEST
split, or (ClassScoreConfig.dataset set, as the pipeline does) those of the ingested test split through
artifacts.real_features' S3 cache: the one reference pass that evaluate-tokenizer's rFID and promote's
gFID then read (the FID Inception is ~6 img/s on 2 CPU cores, so every shared pass saves minutes).
The classifier is trained once and cached as safetensors beside a .sha256 file; a cached file
whose bytes do not match its digest is refused (and retrained), never loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_PACKAGE = "dataset-fashion-mnist"  # the Debian package that installs FMNIST_DIR
_PREFIX = {"train": "train", "test": "t10k"}
# part of the classifier cache key: bump when models/classifier.train_classifier changes what it trains
# (2: cosine LR + BatchNorm re-estimation)
TRAINER_VERSION = 2


def idx_paths(directory: str | Path, split: str) -> tuple[Path, Path]:
    """(images, labels) IDX files of `split` (train | test); a clear error naming the package if absent."""
    if split not in _PREFIX:
        raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split!r}")
    root = Path(directory)
    paths = (root / f"{_PREFIX[split]}-images-idx3-ubyte.gz", root / f"{_PREFIX[split]}-labels-idx1-ubyte.gz")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"IDX files not found: {', '.join(missing)}. Fashion-MNIST comes from Debian's "
            f"`{FMNIST_PACKAGE}` package (apt-get install {FMNIST_PACKAGE}; .ci/run installs it), "
            f"which puts the files in {FMNIST_DIR}")
    return paths


def load_idx_split(directory: str | Path, split: str, per_class: int | None = None,
                   size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 B x 3 x size x size images and int64 labels (the first per_class of every class, or all)."""
    from detailflow.pipelines.data.idx import read_idx, to_rgb

    images_path, labels_path = idx_paths(directory, split)
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if per_class is None:
        keep = np.arange(len(labels))
    else:
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))
    imgs = np.stack([to_rgb(images[k], size) for k in keep])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[keep])


def cached_classifier(directory: str | Path, cache_dir: str | Path, cfg=None, log=print):
    """The SmallCNN trained on `directory`'s training split: loaded from cache_dir when a checkpoint of
    the same (data, config) is there and its sha256 matches, else trained (seconds to minutes on CPU)
    and saved. Returns (model in eval mode, path of the safetensors file)."""
    from safetensors.torch import load_file, save_file

    from detailflow.models.classifier import ClassifierTrainConfig, SmallCNN, train_classifier
    from detailflow.platform.storage import sha256_file

    cfg = cfg or ClassifierTrainConfig()
    images_path, labels_path = idx_paths(directory, "train")
    key = hashlib.sha256(json.dumps({"images": sha256_file(images_path), "labels": sha256_file(labels_path),
                                     "cfg": dataclasses.asdict(cfg), "trainer": TRAINER_VERSION},
                                    sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir) / f"classifier-{key[:16]}.safetensors"
    digest_path = path.with_suffix(".sha256")
    if path.is_file() and digest_path.is_file():
        if sha256_file(path) == digest_path.read_text().strip():
            state = load_file(str(path))
            head = [v for v in state.values() if v.ndim == 2][-1]  # the linear head: classes x 2 width
            clf = SmallCNN(int(head.shape[0]), int(head.shape[1]) // 2)
            clf.load_state_dict(state)
            log(f"[class-score] classifier from cache {path}")
            return clf.eval(), path
        log(f"[class-score] {path}: sha256 does not match {digest_path.name}; retraining")
    x_u8, y = load_idx_split(directory, "train")
    num_classes = int(y.max()) + 1
    t0 = time.perf_counter()
    clf = train_classifier(x_u8, y, cfg, num_classes=num_classes, log=log, log_every=250)
    log(f"[class-score] classifier trained on {len(y)} images in {time.perf_counter() - t0:.0f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(path))
    digest_path.write_text(sha256_file(path) + "\n")
    return clf, path


@dataclass
class ClassScoreConfig:
    ar: str  # AR run name or s3:// export URI (its export names the tokenizer)
    data_dir: str = FMNIST_DIR  # folder of the IDX files (train-*/t10k-* .gz)
    out: str = "out/demo-fmnist"  # score.json + scored_samples.png go here
    cache_dir: str = ""  # classifier cache ("" = ~/.cache/detailflow/classifier)
    per_class: int = 100  # samples per class
    cfg_scale: float = 1.5  # classifier-free guidance of the samples
    seed: int = 0  # sampling seed
    n_real: int = 2000  # test-split images for FID/KID (class-balanced, the first of each class);
    # with `dataset`: at most this many of that split (0 or >= the split = all, the key others share)
    dataset: str = ""  # ingested dataset whose `split` is the FID/KID reference ("" = the IDX test split)
    split: str = "val"  # split of `dataset` (the demo ingests the IDX test split as val)
    classifier_steps: int = 800  # training steps of the judge (batch 64, on all training images)
    grid_per_class: int = 8  # samples per class row in samples.png


def score_samples(clf, images_u8_BCHW: torch.Tensor, cond_B: torch.Tensor) -> dict:
    """Class accuracy (overall and per class) of samples judged by `clf`."""
    from detailflow.models.classifier import class_accuracy, predict
    from detailflow.models.tokenizer import to_model_range

    pred = predict(clf, to_model_range(images_u8_BCHW))
    per_class = {int(c): class_accuracy(pred[cond_B == c], cond_B[cond_B == c]) for c in cond_B.unique()}
    return {"class_accuracy": class_accuracy(pred, cond_B), "class_accuracy_per_class": per_class}


def run_class_score(cfg: ClassScoreConfig, settings, log=print) -> dict:
    """Judge + test split from cfg.data_dir, generator from its export on S3; see score_generator."""
    from detailflow.models.classifier import ClassifierTrainConfig
    from detailflow.pipelines.evaluate.generator_eval import GeneratorEvalConfig, resolve_tokenizer
    from detailflow.pipelines.evaluate.inception import InceptionConfig, InceptionFeatures
    from detailflow.pipelines.train.exports import load_ar, load_tokenizer
    from detailflow.platform.storage import Storage

    t0 = time.perf_counter()
    cache = cfg.cache_dir or str(Path.home() / ".cache" / "detailflow" / "classifier")
    clf, clf_path = cached_classifier(cfg.data_dir, cache, ClassifierTrainConfig(steps=cfg.classifier_steps),
                                      log=log)
    storage = Storage(settings)
    ar_model, ar_config, ar_uri = load_ar(storage, cfg.ar)
    tok_uri = resolve_tokenizer(storage, GeneratorEvalConfig(ar=cfg.ar), ar_config)
    tok, _ = load_tokenizer(storage, tok_uri)
    inception = InceptionFeatures(InceptionConfig(batch_size=50))
    real_f = reference_features(cfg, storage, tok.rmap, inception, log) if cfg.dataset else None
    result = score_generator(cfg, ar_model, tok, clf, inception, log, real_features=real_f)
    result.update(ar=ar_uri, tokenizer=tok_uri, classifier=str(clf_path),
                  seconds=round(time.perf_counter() - t0, 1))
    (Path(cfg.out) / "score.json").write_text(json.dumps(result, indent=1) + "\n")
    log(f"[class-score] class accuracy {result['class_accuracy']:.4f} | FID {result['fid']:.2f} | "
        f"KID {result['kid']:.4f} +- {result['kid_std']:.4f} (vs {result['n_real']} test images) -> "
        f"{cfg.out}/score.json")
    return result


def reference_features(cfg: ClassScoreConfig, storage, rmap, inception, log=print) -> np.ndarray:
    """Inception features of cfg.dataset/cfg.split through artifacts.real_features' S3 cache, which keys
    a limit covering the whole split as "all": the key evaluate-tokenizer (max_images 0) and promote
    (n_ref 0) use, so whichever stage runs first pays and the others read."""
    from detailflow.pipelines.evaluate.artifacts import real_features

    feats, _ = real_features(storage, cfg.dataset, cfg.split, rmap, inception, limit=cfg.n_real,
                             micro_batch=32, log=log)
    return feats


@torch.no_grad()
def score_generator(cfg: ClassScoreConfig, ar_model, tok, clf, inception, log=print,
                    real_features: np.ndarray | None = None) -> dict:
    """Sample per_class images of every class, judge them with `clf`, FID/KID of their `inception`
    features vs `real_features` (None: the IDX test split's, n_real class-balanced, computed here);
    writes out/scored_samples.png (grid_per_class samples per class row)."""
    from detailflow.models.classifier import predict
    from detailflow.models.sampler import sample
    from detailflow.models.tokenizer import to_model_range
    from detailflow.pipelines.evaluate.metrics import fid_from_features, kid
    from detailflow.pipelines.evaluate.visuals import grid_png

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    test_x, test_y = load_idx_split(cfg.data_dir, "test")
    real_acc = float((predict(clf, to_model_range(test_x)) == test_y).float().mean())
    log(f"[class-score] classifier accuracy on the {len(test_y)} test images: {real_acc:.4f}")
    num_classes = ar_model.cfg.num_classes
    cond = torch.arange(num_classes).repeat_interleave(cfg.per_class)
    gen = torch.Generator().manual_seed(cfg.seed)
    imgs = []
    for lo in range(0, len(cond), 250):
        codes = sample(ar_model, cond[lo:lo + 250], cfg_scale=cfg.cfg_scale, generator=gen)
        imgs.append(((tok.decode(codes).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
        log(f"[class-score] sampled {min(lo + 250, len(cond))}/{len(cond)}")
    samples_u8 = torch.cat(imgs)
    scores = score_samples(clf, samples_u8, cond)
    if real_features is None:
        real_x, _ = load_idx_split(cfg.data_dir, "test", per_class=max(1, cfg.n_real // num_classes))
        real_features = inception(real_x)
    real_f, fake_f = real_features, inception(samples_u8)
    kid_mean, kid_std = kid(real_f, fake_f, num_subsets=100, subset_size=1000, seed=cfg.seed)
    rows = [[to_model_range(samples_u8[c * cfg.per_class + j]) for j in range(min(cfg.grid_per_class,
                                                                                   cfg.per_class))]
            for c in range(num_classes)]
    (out / "scored_samples.png").write_bytes(grid_png(rows, cell=32))
    return {**scores, "fid": fid_from_features(real_f, fake_f), "kid": kid_mean, "kid_std": kid_std,
            "classifier_test_accuracy": real_acc, "n_samples": len(cond), "n_real": len(real_f),
            "cfg_scale": cfg.cfg_scale, "seed": cfg.seed}
