"""Data-plane throughput: Ray Data (decode + ADM crop + flip + degrade) vs a single-process PIL loop.

Reproduce:
    .venv/bin/python benchmarks/data_throughput.py                      # 1500 images, 320 px JPEGs -> 256
    .venv/bin/python benchmarks/data_throughput.py --images 3000 --node-cores 96 --node-gpus 8

What it does: starts its own local services (SeaweedFS + MLflow, temp state dir, free ports),
synthesises the shapes set as JPEG (q95) at --src-size px, ingests it with Ray (timed), then runs
one epoch of the SAME work twice on the same shards: (a) the Ray Data reader
(build_degraded_dataset, micro-batch 32, p = 0.2, DetailFlow-16 resolution map at 256 px) consumed
through iter_microbatches, and (b) one Python process calling the same functions in a plain loop
(pyarrow read -> decode_crop_batch -> degrade_batch -> row_to_microbatch, torch on 1 thread).
A warm-up pass runs first for both, so Ray's worker start-up is reported separately (cold pass).
Per-GPU rate on a node: (Ray images/s / cores used here) x node cores / node GPUs.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def single_process_epoch(storage, name: str, cfg, rmap) -> int:
    """The same work as the Ray reader, in one process: returns images produced."""
    import numpy as np
    import pyarrow.parquet as pq

    from detailflow.pipelines.data.reader import (
        decode_crop_batch,
        degrade_batch,
        read_manifest_checked,
        read_units,
        row_to_microbatch,
    )

    manifest = read_manifest_checked(storage, name, "train")
    fs = storage.filesystem()
    kw = dict(image_size=cfg.image_size, seed=cfg.seed, epoch=0, train=True, flip=True,
              max_scale=cfg.max_scale, jpeg_draft=cfg.jpeg_draft)
    pending = {"key": [], "label": [], "image": [], "skipped": []}
    produced = 0

    def flush(n):
        nonlocal produced
        b = {k: (np.array(v[:n], dtype=object) if k == "key" else np.stack(v[:n]) if k == "image"
                 else np.array(v[:n])) for k, v in pending.items()}
        for k in pending:
            del pending[k][:n]
        out = degrade_batch(b, rmap=rmap, micro_batch=cfg.micro_batch, degrade_prob=cfg.degrade_prob,
                            seed=cfg.seed, epoch=0, train=True, fixed_t=None, all_t=False)
        for i in range(len(out["t"])):
            mb = row_to_microbatch({k: v[i:i + 1] for k, v in out.items()})
            produced += mb.images.shape[0]

    for unit in read_units(manifest):  # the reader's units: one Parquet row group each
        with fs.open_input_file(storage.fs_path(unit["path"])) as f:
            table = pq.ParquetFile(f).read_row_group(unit["row_group"], columns=["key", "label", "image"])
        out = decode_crop_batch({"key": np.array(table["key"].to_pylist(), dtype=object),
                                 "label": table["label"].to_numpy(),
                                 "image": np.array(table["image"].to_pylist(), dtype=object)}, **kw)
        for k in pending:
            pending[k] += list(out[k])
        while len(pending["key"]) >= cfg.micro_batch:
            flush(cfg.micro_batch)
    return produced


def ray_epoch(storage, name: str, cfg, rmap) -> int:
    from detailflow.pipelines.data.reader import build_degraded_dataset, iter_microbatches

    n = 0
    for img, _, _ in iter_microbatches(build_degraded_dataset(storage, name, "train", cfg, rmap)):
        n += img.shape[0]
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1500, help="images to synthesise and stream")
    ap.add_argument("--src-size", type=int, default=320, help="source JPEG side (ADM resizes to [256, 320])")
    ap.add_argument("--task-cpus", type=float, default=1.0, help="Ray Data CPUs per task (1 = 1 per core)")
    ap.add_argument("--node-cores", type=int, default=96, help="cores of the GPU node to extrapolate to")
    ap.add_argument("--node-gpus", type=int, default=8, help="GPUs of that node")
    args = ap.parse_args()

    from detailflow.platform.runtime import apply_runtime_env

    apply_runtime_env()
    import numpy as np
    import ray
    import torch

    from detailflow.models.configs import get_model_config
    from detailflow.models.resolution import ResolutionMap
    from detailflow.pipelines.data import synth
    from detailflow.pipelines.data.ingest import IngestConfig, ingest
    from detailflow.pipelines.data.reader import ReaderConfig
    from detailflow.platform.services import LocalServices
    from detailflow.platform.settings import load_settings
    from detailflow.platform.storage import Storage
    from detailflow.platform.testing import pick_port_block

    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="df-bench-data-"))
    base, mlflow_port = pick_port_block()
    settings = load_settings(environ={"DETAILFLOW_STATE_DIR": str(tmp / "state"),
                                      "DETAILFLOW_S3_PORT_BASE": str(base),
                                      "DETAILFLOW_MLFLOW_PORT": str(mlflow_port)})
    svc = LocalServices(settings)
    try:
        t0 = time.perf_counter()
        svc.up()
        print(f"services up in {time.perf_counter() - t0:.1f}s ({settings.s3_endpoint_url})", flush=True)
        storage = Storage(settings)

        src = tmp / "src" / "train"
        per_class = max(1, args.images // len(synth.CLASS_NAMES))
        t0 = time.perf_counter()
        for cid, cname in enumerate(synth.CLASS_NAMES):
            (src / cname).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = synth.render(cid, args.src_size, np.random.default_rng([cid, i]))
                (src / cname / f"{cname}_{i:06d}.JPEG").write_bytes(synth.encode(img, "jpeg"))
        n_images = per_class * len(synth.CLASS_NAMES)
        mb_src = sum(p.stat().st_size for p in src.rglob("*")) / 1e6
        print(f"synthesised {n_images} JPEGs at {args.src_size}px ({mb_src:.1f} MB) in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)

        ray.init(address="local", num_cpus=cores, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        icfg = IngestConfig(name="bench", split="train", shard_mb=max(1.0, mb_src / (4 * cores)))
        t0 = time.perf_counter()
        manifest = ingest(storage, str(tmp / "src"), icfg)
        ingest_s = time.perf_counter() - t0
        ingest_rate = manifest["num_images"] / ingest_s
        print(f"ingest: {manifest['num_images']} images, {len(manifest['shards'])} shards in {ingest_s:.1f}s "
              f"= {ingest_rate:.1f} images/s (includes Ray task start-up)", flush=True)

        rmap = ResolutionMap.from_config(get_model_config("detailflow-16").tokenizer)
        cfg = ReaderConfig(image_size=256, micro_batch=32, degrade_prob=0.2, seed=0, num_cpus=args.task_cpus)
        expect = (n_images // cfg.micro_batch) * cfg.micro_batch

        t0 = time.perf_counter()
        n = ray_epoch(storage, "bench", cfg, rmap)
        cold = time.perf_counter() - t0
        print(f"ray data, cold pass: {n} images in {cold:.1f}s = {n / cold:.1f} images/s", flush=True)
        t0 = time.perf_counter()
        n = ray_epoch(storage, "bench", cfg, rmap)
        ray_s = time.perf_counter() - t0
        assert expect - 64 * len(manifest["shards"]) <= n <= expect, (n, expect)  # partial batch dropped
        ray_rate = n / ray_s
        print(f"ray data, warm pass: {n} images in {ray_s:.1f}s = {ray_rate:.1f} images/s", flush=True)

        single_process_epoch(storage, "bench", cfg, rmap)  # warm page cache / imports, same as Ray's
        t0 = time.perf_counter()
        n1 = single_process_epoch(storage, "bench", cfg, rmap)
        single_s = time.perf_counter() - t0
        single_rate = n1 / single_s
        print(f"single process: {n1} images in {single_s:.1f}s = {single_rate:.1f} images/s", flush=True)

        ratio = ray_rate / single_rate
        print(f"load average (1 min) now {os.getloadavg()[0]:.1f} on {cores} cores: other work on the "
              "machine skews both figures")
        per_core = ray_rate / cores
        per_gpu = per_core * args.node_cores / args.node_gpus
        print(f"ratio ray / single process = {ratio:.2f}x on {cores} cores (goal >= 1.6x)")
        print(f"per-GPU rate on a {args.node_cores}-core, {args.node_gpus}-GPU node: "
              f"{ray_rate:.1f} img/s / {cores} cores = {per_core:.1f} img/s/core x {args.node_cores} cores / "
              f"{args.node_gpus} GPUs = {per_gpu:.0f} img/s per GPU")
        print("reproduce: .venv/bin/python benchmarks/data_throughput.py " + " ".join(sys.argv[1:]))
        print(json.dumps({"ray_vs_single_process": round(ratio, 3), "ray_images_per_s": round(ray_rate, 1),
                          "single_images_per_s": round(single_rate, 1),
                          "ingest_images_per_s": round(ingest_rate, 1),
                          "ray_cold_images_per_s": round(n / cold, 1), "cores": cores, "images": n_images,
                          "per_gpu_images_per_s": round(per_gpu, 1), "node_cores": args.node_cores,
                          "node_gpus": args.node_gpus, "load_avg_1m": round(os.getloadavg()[0], 2)}))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        svc.down()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
