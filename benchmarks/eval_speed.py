"""Evaluation speed: FID-Inception feature throughput and the wall time of a 1,000-sample tiny gFID.

Reproduce:
    .venv/bin/python benchmarks/eval_speed.py                                   # 2 CPU cores, ~20 min
    .venv/bin/python benchmarks/eval_speed.py --n 200 --tok-steps 300 --ar-steps 300   # smoke (~4 min)
    .venv/bin/python benchmarks/eval_speed.py --device cuda --num-actors 1      # one GPU (actors get 1 each)

What it does: starts its own local services (SeaweedFS + MLflow, temp state dir, free ports) and a
local Ray with --cores CPUs; synthesises the shapes set (32 px, --train-per-class train and
--val-per-class held-out images per class) and ingests both splits; trains the tiny tokenizer and the
tiny AR model in-process with benchmarks/tiny_quality.py's recipes (--tok-steps / --ar-steps; 0 =
untrained, the timings do not depend on the weights) and publishes them as exports. Then:
  (1) features/s: InceptionFeatures (the sha256-pinned FID Inception, 299 x 299 input whatever the
      image size) on --feature-images held-out images in this process, --threads torch threads,
      batch --batch; one warm-up batch first (reported separately);
  (2) the reference statistics: Inception features of the first --n held-out images through the Ray
      sampling actors (what the first evaluation of a split pays; later ones read the S3 cache);
  (3) the tiny gFID: evaluate_generator with n = --n class-balanced samples on --num-actors actors
      (1 CPU each, or 1 GPU each with --device cuda): sampling, decoding, features, FID/KID/P-R, the ADM
      .npz and the MLflow run. Reported: wall time, samples/s, FID, KID +- std, precision, recall.
GPU: with --device cuda (1) runs on cuda:0 and (3) puts one GPU per actor. The H200 figure and the
projected 50k-sample DetailFlow-16 gFID on 8 GPUs are owed until a run on a GPU machine.
The last line is one JSON object with the figures.

Measured (2026-12-01, this shared 2-core box, load average 3-20 from other jobs during the run;
`--n 1000 --tok-steps 600 --ar-steps 400 --feature-images 64 --val-per-class 100 --train-per-class 100`,
1035 s in all): (1) 6.14 images/s (2 threads, batch 32, load 3.2); (2) 1,000 reference images in 394 s
(2.54 images/s on 2 actors); (3) tiny gFID n = 1,000 in 420 s with the reference cached, 814 s cold;
FID 253.0, KID 0.246 +- 0.003, precision 0.000, recall 0.000 (a 600-step tokenizer: blurry samples; for
scale, 60 real shapes vs 60 others give FID 43.0, KID -0.005, P 0.95, R 1.00, and the same 60 reduced
to 8 px content give FID 261, KID 0.18, P 0.03, R 0.00). Sampling is a small share: the 299 x 299
Inception pass (~5.7 GFLOP per image) sets the CPU cost, about 2 images/s per core.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def log(msg: str) -> None:
    print(msg, flush=True)


def publish(storage, run_name: str, module, config: dict) -> str:
    from detailflow.models.export import save_pretrained
    from detailflow.pipelines.train.exports import export_prefix
    from detailflow.platform.export_store import store_export

    with tempfile.TemporaryDirectory() as d:  # stored once, content-addressed; the run's pointer to it
        save_pretrained(module, config, d)
        store_export(storage, d, export_prefix(run_name))
    return storage.uri(export_prefix(run_name))


def train_models(args, storage) -> tuple[str, str]:
    """Tiny tokenizer + AR with tiny_quality's recipes (0 steps = the initialisation); their export URIs."""
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_quality as tq

    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import get_model_config
    from detailflow.models.tokenizer import DetailFlowTokenizer

    cfg = get_model_config("tiny")
    hp = SimpleNamespace(seed=0, tok_lr=1e-3, tok_steps=args.tok_steps, tok_batch=16, log_every=500,
                         ar_lr=1e-3, ar_steps=args.ar_steps, ar_batch=64, ema_decay=0.999)
    train_x, train_y = tq.shapes_split(args.train_per_class, 0, 0, cfg.tokenizer.image_size)
    t0 = time.perf_counter()
    if args.tok_steps:
        tok, _ = tq.train_tokenizer(cfg.tokenizer, train_x, hp)
    else:
        torch.manual_seed(0)
        tok = DetailFlowTokenizer(cfg.tokenizer).eval()
    tok_uri = publish(storage, f"tokenizer-bench-eval-{args.tok_steps}", tok,
                      {"kind": "tokenizer", "model": "tiny", "tokenizer": dataclasses.asdict(cfg.tokenizer)})
    if args.ar_steps:
        trip = tq.extract_all(tok, train_x, 0, 256)
        _, ar, _ = tq.train_ar(cfg.ar, trip, train_y, 0.3, hp)
    else:
        torch.manual_seed(0)
        ar = DetailFlowGPT(cfg.ar).eval()
    ar_uri = publish(storage, f"ar-bench-eval-{args.tok_steps}-{args.ar_steps}", ar,
                     {"kind": "ar", "model": "tiny", "tokenizer": tok_uri, "ar": dataclasses.asdict(cfg.ar)})
    took = time.perf_counter() - t0
    log(f"models: tokenizer {args.tok_steps} steps, AR {args.ar_steps} steps in {took:.0f}s")
    return tok_uri, ar_uri


def feature_throughput(args, storage) -> dict:
    from detailflow.pipelines.evaluate.artifacts import iter_real_images
    from detailflow.pipelines.evaluate.generator_eval import tokenizer_rmap
    from detailflow.pipelines.evaluate.inception import InceptionConfig, InceptionFeatures

    torch.set_num_threads(args.threads)
    rmap = tokenizer_rmap(storage, args.tok_uri)
    imgs = torch.cat([x for x, _ in iter_real_images(storage, "bench-eval", "val", rmap,
                                                     limit=args.feature_images + args.batch)])
    net = InceptionFeatures(InceptionConfig(batch_size=args.batch, device=args.device), storage)
    t0 = time.perf_counter()
    net(imgs[:args.batch])
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = [0]

    def progress(k, n):
        done[0] = k
        if k == n or k % (4 * args.batch) == 0:
            log(f"  features {k}/{n} ({k / (time.perf_counter() - t0):.2f} images/s)")

    net(imgs[args.batch:], progress=progress)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    rate = done[0] / wall
    log(f"(1) Inception features: {done[0]} images in {wall:.1f}s = {rate:.2f} images/s on {args.device} "
        f"({args.threads} threads, batch {args.batch}; warm-up batch {warm:.1f}s); load avg "
        f"{os.getloadavg()[0]:.1f}")
    return {"features_per_s": round(rate, 2), "feature_images": done[0], "feature_warmup_s": round(warm, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="generated samples (and reference images)")
    ap.add_argument("--feature-images", type=int, default=256, help="images timed in (1)")
    ap.add_argument("--batch", type=int, default=32, help="Inception batch size")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for (1)")
    ap.add_argument("--cores", type=int, default=2, help="CPUs given to Ray")
    ap.add_argument("--num-actors", type=int, default=2, help="sampling actors for (2)/(3)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--val-per-class", type=int, default=100, help="held-out images per class (>= n/10)")
    ap.add_argument("--tok-steps", type=int, default=1500, help="tiny tokenizer steps (0 = untrained)")
    ap.add_argument("--ar-steps", type=int, default=1000, help="tiny AR steps (0 = untrained)")
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda but torch sees no CUDA device")
    t_all = time.perf_counter()

    import ray

    from detailflow.pipelines.data import synth
    from detailflow.pipelines.data.ingest import IngestConfig, ingest
    from detailflow.pipelines.evaluate.artifacts import real_features
    from detailflow.pipelines.evaluate.generator_eval import (
        GeneratorEvalConfig,
        evaluate_generator,
        tokenizer_rmap,
    )
    from detailflow.pipelines.evaluate.sampling import SamplerPool
    from detailflow.platform.storage import Storage
    from detailflow.platform.testing import isolated_services

    with isolated_services() as settings, tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        storage = Storage(settings)
        ray.init(address="local", num_cpus=args.cores, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=True)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        t0 = time.perf_counter()
        synth.write_folder(tmp, size=32, per_class=args.train_per_class, val_per_class=args.val_per_class)
        for split in ("train", "val"):
            ingest(storage, tmp, IngestConfig(name="bench-eval", split=split, shard_mb=1.0, use_ray=False))
        log(f"data: shapes 32 px, {args.train_per_class}/{args.val_per_class} per class, ingested in "
            f"{time.perf_counter() - t0:.1f}s")
        args.tok_uri, args.ar_uri = train_models(args, storage)
        out = {"device": args.device, "cores": args.cores, "n": args.n}
        out.update(feature_throughput(args, storage))

        use_gpu = args.device.startswith("cuda")
        cfg = GeneratorEvalConfig(ar=args.ar_uri, dataset="bench-eval", split="val", n=args.n, n_ref=args.n,
                                  cfg_scale=args.cfg_scale, num_actors=args.num_actors, use_gpu=use_gpu,
                                  cpus_per_actor=1.0, nll_split="", chunk_size=50)
        t0 = time.perf_counter()
        pool = SamplerPool(settings, args.ar_uri, args.tok_uri, cfg.inception(), num_actors=args.num_actors,
                           use_gpu=use_gpu)
        try:
            real, _ = real_features(storage, "bench-eval", "val", tokenizer_rmap(storage, args.tok_uri), pool,
                                    limit=args.n, micro_batch=cfg.micro_batch, log=log)
        finally:
            pool.close()
        ref_s = time.perf_counter() - t0
        log(f"(2) reference features: {len(real)} images in {ref_s:.1f}s ({len(real) / ref_s:.2f} images/s "
            f"on {args.num_actors} actors, actor start-up included)")
        t0 = time.perf_counter()
        res = evaluate_generator(cfg, settings)
        gfid_s = time.perf_counter() - t0
        log(f"(3) tiny gFID, n={args.n}: {gfid_s:.1f}s wall ({args.n / gfid_s:.2f} samples/s with features); "
            f"FID {res['fid']:.2f}, KID {res['kid']:.4f} +- {res['kid_std']:.4f}, precision "
            f"{res['precision']:.3f}, recall {res['recall']:.3f}; reference cached (+{ref_s:.0f}s when cold)")
        if not use_gpu:
            log("GPU: features/s on one H200 and the projected 50k-sample DetailFlow-16 gFID on 8 GPUs are "
                "owed (no device in this run; rerun with --device cuda)")
        out.update(reference_s=round(ref_s, 1), gfid_wall_s=round(gfid_s, 1),
                   gfid_cold_wall_s=round(gfid_s + ref_s, 1), fid=round(res["fid"], 3),
                   kid=round(res["kid"], 5), kid_std=round(res["kid_std"], 5),
                   precision=round(res["precision"], 4), recall=round(res["recall"], 4),
                   tok_steps=args.tok_steps, ar_steps=args.ar_steps, load_avg_1m=round(os.getloadavg()[0], 1),
                   total_s=round(time.perf_counter() - t_all, 1),
                   gpu_figures="measured" if use_gpu else "owed")
        ray.shutdown()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
