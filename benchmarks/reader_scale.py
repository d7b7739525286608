"""Reader planning at ImageNet scale: build time and driver memory of the training stream, 1 vs 250 epochs,
and of the AR code stream (time to the first batch of an epoch, driver memory).

Reproduce:
    .venv/bin/python benchmarks/reader_scale.py                     # ImageNet-1k-sized manifest, 250 epochs
    .venv/bin/python benchmarks/reader_scale.py --epochs 300 --world 64

What it does: starts its own local services (SeaweedFS + MLflow on free ports, temp state dir) and a
local Ray, publishes an ImageNet-sized manifest (1,281,167 rows in 1,300 shards of 64-row groups:
metadata only, no image bytes: the build never opens a shard) and builds the DetailFlow-16 tokenizer
reader (configs/tokenizer-detailflow-16.yaml: 256 px, micro-batch 16, 16 workers; rank 0's stream)
for 1 and for 250 epochs: read the manifest from S3, plan, create the first Ray Dataset of the stream.
Reported: wall time and the driver's memory growth (RSS and Python heap peak) of each build, and the
time to the first micro-batch on a small real dataset (640 synthetic JPEGs ingested here).
Goals: build <= 10 s and <= 200 MB, both independent of the number of epochs.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil

IMAGENET_TRAIN = 1_281_167


def imagenet_manifest(shards: int, group_rows: int) -> dict:
    rows = [IMAGENET_TRAIN // shards + (i < IMAGENET_TRAIN % shards) for i in range(shards)]
    return {"format": "detailflow.dataset/v1", "name": "imagenet-sized", "split": "train",
            "num_images": IMAGENET_TRAIN, "num_classes": 1000, "classes": [f"n{i:08d}" for i in range(1000)],
            "shards": [{"name": f"part-{i:05d}.parquet",
                        "key": f"datasets/imagenet-sized/train/v-0/part-{i:05d}.parquet", "rows": n,
                        "bytes": n * 110_000, "sha256": f"{i:064x}",
                        "row_groups": -(-n // group_rows), "row_group_rows": group_rows}
                       for i, n in enumerate(rows)]}


def build(storage, cfg, rmap, world: int) -> dict:
    """Manifest from S3 -> plan -> the stream's first Ray Dataset; wall time and memory growth."""
    from detailflow.pipelines.data.reader import DegradedStream

    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    tracemalloc.start()
    t0 = time.perf_counter()
    stream = DegradedStream(storage, "imagenet-sized", "train", cfg, rmap, rank=0, world=world)
    ds = next(stream.datasets())
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = psutil.Process().memory_info().rss - rss0
    del ds  # built, never executed: no shard of the fake manifest exists
    return {"wall_s": wall, "rss_mb": rss / 1e6, "heap_peak_mb": peak / 1e6,
            "windows_per_epoch": stream.plan.num_windows, "row_groups": len(stream.plan.groups)}


def ar_codes(storage, world: int, micro_batch: int) -> dict:
    """The AR code stream (data/code_stream.py) at ImageNet ten-crop size: plan an epoch from the
    published manifest (driver time and memory), then the first batch of epoch 5 on a small real code
    set of the same row width (the first batch reads one window, whatever the set's size)."""
    from detailflow.models.configs import get_model_config
    from detailflow.pipelines.data import codes
    from detailflow.pipelines.data.code_stream import CodeStream, CodeStreamConfig, simulated_manifest
    from detailflow.pipelines.data.plan import Position

    n_tok = get_model_config("detailflow-16").ar.num_tokens
    storage.put_json(storage.manifest_key(codes.codes_prefix("imagenet-sized", "train")),
                     simulated_manifest(IMAGENET_TRAIN, 1300, views=10, tokens=n_tok))
    cfg = CodeStreamConfig(micro_batch=micro_batch)
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    tracemalloc.start()
    t0 = time.perf_counter()
    stream = CodeStream(storage, "imagenet-sized", "train", cfg, rank=0, world=world, start=Position(5, 0, 0))
    first_tasks = [a[1:] for _, a in zip(range(4), stream.task_args(), strict=False)]
    plan_s = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss = psutil.Process().memory_info().rss - rss0
    blocks = len(stream.plan.groups)
    # a real code set: 4,096 images x 10 views of detailflow-16 width, in 4 shards
    rng = np.random.default_rng(0)
    img = np.repeat(np.arange(4096), 10)
    tok = rng.integers(0, 8192, (len(img), n_tok), dtype=np.int64)
    codes.write_codes(storage, "real-small", "train", {"key": [f"i{i:06d}" for i in img], "label": img % 1000,
                      "view": np.tile(np.arange(10), 4096), "clean": tok, "input": tok, "target": tok},
                      shard_rows=10240)
    firsts = []
    for _ in range(2):  # first: after the image reader's tasks; second: a new stream on running workers
        t0 = time.perf_counter()
        batches = iter(CodeStream(storage, "real-small", "train", cfg, rank=0, world=world,
                                  start=Position(5, 0, 0)))
        b = next(batches)
        firsts.append(time.perf_counter() - t0)
        batches.close()  # cancels the read-ahead tasks: they would compete with the next stream's first
        assert b["input"].shape == (micro_batch, n_tok) and b["position"] == Position(5, 0, 0)
    return {"plan_s": plan_s, "driver_mb": max(rss, peak) / 1e6, "blocks": blocks, "first_tasks": first_tasks,
            "first_batch_cold_s": firsts[0], "first_batch_warm_s": firsts[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=250, help="epochs of the long stream")
    ap.add_argument("--shards", type=int, default=1300, help="shards of the ImageNet-sized manifest")
    ap.add_argument("--group-rows", type=int, default=64, help="rows per Parquet row group")
    ap.add_argument("--world", type=int, default=16, help="training workers (detailflow-16: 16)")
    ap.add_argument("--micro-batch", type=int, default=16, help="images per worker step (detailflow-16: 16)")
    args = ap.parse_args()

    from detailflow.platform.runtime import apply_runtime_env

    apply_runtime_env()
    from detailflow.platform.storage import Storage
    from detailflow.platform.testing import isolated_services

    # services on a free port block, stopped before the temp dir (their data) is removed
    with tempfile.TemporaryDirectory(prefix="df-bench-scale-") as tmp_dir, \
            isolated_services(Path(tmp_dir) / "state") as settings:
        _measure(args, Path(tmp_dir), Storage(settings))


def _measure(args, tmp: Path, storage) -> None:
    import ray

    from detailflow.models.configs import get_model_config
    from detailflow.models.resolution import ResolutionMap
    from detailflow.pipelines.data import synth
    from detailflow.pipelines.data.ingest import IngestConfig, dataset_prefix, ingest
    from detailflow.pipelines.data.reader import DegradedStream, ReaderConfig

    try:
        storage.ensure_bucket()
        ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        manifest = imagenet_manifest(args.shards, args.group_rows)
        storage.put_json(storage.manifest_key(dataset_prefix("imagenet-sized", "train")), manifest)
        tok = get_model_config("detailflow-16").tokenizer
        rmap = ResolutionMap.from_config(tok)
        figures = {}
        warm = ReaderConfig(image_size=tok.image_size, micro_batch=args.micro_batch, num_epochs=1)
        build(storage, warm, rmap, args.world)  # imports and the S3 client: both measured builds start warm
        for epochs in (1, args.epochs):
            cfg = ReaderConfig(image_size=tok.image_size, micro_batch=args.micro_batch,
                               degrade_prob=tok.degrade_prob, seed=0, num_epochs=epochs)
            m = build(storage, cfg, rmap, args.world)
            figures[epochs] = m
            print(f"{epochs:>4} epochs: build {m['wall_s']:.2f}s, driver RSS +{m['rss_mb']:.1f} MB, "
                  f"Python heap peak {m['heap_peak_mb']:.1f} MB ({m['row_groups']} row groups, "
                  f"{m['windows_per_epoch']} windows per epoch, {args.world} ranks)", flush=True)
        old_rows = args.epochs * IMAGENET_TRAIN // (args.micro_batch * 4)
        print(f"(the eager plan this replaced built ~{old_rows:,} JSON plan rows of ~1.6 KB on the driver "
              f"for {args.epochs} epochs: ~{old_rows * 1.6e3 / 1e9:.0f} GB)")

        # time to the first micro-batch on a small real dataset (cold Ray Data pipeline)
        src = tmp / "src"
        synth.write_folder(src, size=320, per_class=64, val_per_class=0, seed=0, fmt="jpeg")
        ingest(storage, str(src), IngestConfig(name="small", split="train", shard_mb=4, use_ray=False))
        cfg = ReaderConfig(image_size=tok.image_size, micro_batch=16, degrade_prob=tok.degrade_prob,
                           num_epochs=None)
        firsts = []
        for _ in range(2):  # cold: Ray starts the data workers; warm: a new stream on running workers
            t0 = time.perf_counter()
            mb = next(iter(DegradedStream(storage, "small", "train", cfg, rmap)))
            firsts.append(time.perf_counter() - t0)
            assert mb.images.shape == (16, 3, tok.image_size, tok.image_size)
        first_s = firsts[1]
        print(f"first micro-batch of a 640-image real dataset: {firsts[0]:.2f}s cold (Ray starts its data "
              f"workers), {firsts[1]:.2f}s warm; load average {psutil.getloadavg()[0]:.1f}")
        one, many = figures[1], figures[args.epochs]
        print(f"goals: build <= 10 s ({many['wall_s']:.2f}s), <= 200 MB ({max(many['rss_mb'], 0):.1f} MB), "
              f"independent of epochs ({args.epochs} vs 1 epoch: {many['wall_s'] / one['wall_s']:.2f}x time)")
        ar = ar_codes(storage, args.world, 64)
        print(f"AR codes, ImageNet ten-crop ({IMAGENET_TRAIN:,} images x 10 views, 1,300 shards, "
              f"{ar['blocks']:,} blocks): epoch 5 planned in {ar['plan_s']:.3f}s, "
              f"driver +{ar['driver_mb']:.1f} MB "
              f"(no sort, one row group of 10 per block read); first batch of epoch 5 on a real code set: "
              f"{ar['first_batch_cold_s']:.2f}s cold, {ar['first_batch_warm_s']:.2f}s warm")
        print("reproduce: .venv/bin/python benchmarks/reader_scale.py " + " ".join(sys.argv[1:]))
        print(json.dumps({"build_s_250_epochs" if args.epochs == 250 else f"build_s_{args.epochs}_epochs":
                          round(many["wall_s"], 3),
                          "driver_mb_250_epochs" if args.epochs == 250 else f"driver_mb_{args.epochs}_epochs":
                          round(max(many["rss_mb"], many["heap_peak_mb"]), 1),
                          "build_s_1_epoch": round(one["wall_s"], 3),
                          "driver_mb_1_epoch": round(max(one["rss_mb"], one["heap_peak_mb"]), 1),
                          "first_microbatch_s": round(first_s, 2),
                          "first_microbatch_cold_s": round(firsts[0], 2), "row_groups": many["row_groups"],
                          "windows_per_epoch": many["windows_per_epoch"], "world": args.world,
                          "rows": IMAGENET_TRAIN, "shards": args.shards, "epochs": args.epochs,
                          "ar_codes_plan_s": round(ar["plan_s"], 3),
                          "ar_codes_driver_mb": round(ar["driver_mb"], 1),
                          "ar_codes_blocks": ar["blocks"],
                          "ar_codes_first_batch_s": round(ar["first_batch_warm_s"], 2),
                          "ar_codes_first_batch_cold_s": round(ar["first_batch_cold_s"], 2)}))
    finally:
        if ray.is_initialized():
            ray.shutdown()


if __name__ == "__main__":
    main()
