"""Stage kinds for MNIST-family IDX datasets (the Fashion-MNIST demo, configs/pipelines/fashion-mnist.yaml).

    - name: data
      kind: import-idx     # IDX train/test files -> out/train and out/val folders of 32x32 RGB PNGs
      params: {dir: /usr/share/datasets/fashion-mnist, out: out/demo-fmnist/data, train_limit: 6000}
    - name: score
      kind: class-score    # class accuracy (project classifier) + FID/KID vs the test split
      params: {ar: "${stages.ar.run_name}", out: out/demo-fmnist}

The test split is written as `val` so the ingest / evaluation stages of the tiny pipeline read it unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


def import_idx(params: dict, ctx) -> dict:
    """train-* and t10k-* IDX files of params['dir'] -> params['out']/{train,val}/<NN_class>/*.png."""
    from detailflow.pipelines.data.idx import import_idx as run_import
    from detailflow.pipelines.evaluate.class_score import FMNIST_DIR, idx_paths

    known = {"dir", "out", "train_limit", "test_limit", "size"}
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"import-idx: unknown params {sorted(unknown)}; known: {', '.join(sorted(known))}")
    src, out = params.get("dir", FMNIST_DIR), Path(params["out"])
    counts = {}
    for split, folder, limit in (("train", "train", params.get("train_limit")),
                                 ("test", "val", params.get("test_limit"))):
        images, labels = idx_paths(src, split)
        per = run_import(images, labels, out, split=folder, size=int(params.get("size", 32)),
                         limit=None if limit is None else int(limit))
        counts[folder] = sum(per.values())
        ctx.log(f"[import-idx] {split} -> {out / folder}: {counts[folder]} images in {len(per)} classes")
    return {"path": str(out), "train_images": counts["train"], "val_images": counts["val"]}


def class_score(params: dict, ctx) -> dict:
    """pipelines/evaluate/class_score.run_class_score with the stage's params (ClassScoreConfig fields)."""
    from detailflow.pipelines.evaluate.class_score import ClassScoreConfig, run_class_score

    fields = {f.name for f in dataclasses.fields(ClassScoreConfig)}
    unknown = set(params) - fields - {"after"}
    if unknown:
        raise ValueError(f"class-score: unknown params {sorted(unknown)}; known: {', '.join(sorted(fields))}")
    cfg = ClassScoreConfig(**{k: v for k, v in params.items() if k in fields})
    res = run_class_score(cfg, ctx.settings, log=ctx.log)
    return {k: res[k] for k in ("class_accuracy", "fid", "kid", "kid_std", "classifier_test_accuracy")} | {
        "out": cfg.out}
