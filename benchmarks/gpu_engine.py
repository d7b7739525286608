"""The generation engine on a GPU, pure torch: images/s at saturation and batch-1 latency, GPT-L N=128.

Usage:
    PYTHONPATH=. python3 benchmarks/gpu_engine.py                 # H200: < 3 min
    PYTHONPATH=. python3 benchmarks/gpu_engine.py --mode static   # no CUDA graphs (same fixed shapes)
    PYTHONPATH=. python3 benchmarks/gpu_engine.py --tiny          # any machine (CPU ok): a logic check

Model: DetailFlow-16's AR (models.configs "detailflow-16": GPT-L, dim 1024, depth 24, 16 heads, vocab
8192, 1000 classes, N = 128 tokens in 23 passes, g = 8), random weights (head std 0.2), bf16 weights and
KV cache, GenerationEngine(mode="graph": one CUDA graph per bucket of rows, captured up front by
warmup, per-request generators on the device, no hook: no per-pass host copy). Every request is one
image, CFG 1.45 (two KV rows), its own seed. Measured:
  1. batch-1 latency: one request alone, --latency-runs times (p50 / p95 seconds, passes/s);
  2. saturation: a queue of --requests images submitted at once, --slots KV rows; images/s from the
     first pass to the last result (the engine admits into freed rows every pass).
No ray / mlflow / deepspeed. --tiny: the "tiny" config on the CPU in eager mode, a few requests (checks
that the script runs; its numbers mean nothing). Without CUDA and without --tiny it exits at once
(status 2) saying so. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def build(name: str, device: str, dtype):
    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import get_model_config

    cfg = get_model_config(name).ar
    torch.manual_seed(0)
    with torch.device(device):
        ar = DetailFlowGPT(cfg)
    torch.nn.init.normal_(ar.head.weight, 0.0, 0.2)
    return ar.to(dtype=dtype).eval(), cfg


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU, eager: a quick logic check")
    ap.add_argument("--model", default="detailflow-16", help="models.configs name (GPT-L, N=128)")
    ap.add_argument("--mode", default="graph", choices=["eager", "static", "graph"])
    ap.add_argument("--slots", type=int, default=256, help="KV-cache rows (a CFG image takes 2)")
    ap.add_argument("--requests", type=int, default=1024, help="images in the saturation queue")
    ap.add_argument("--latency-runs", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=1.45)
    args = ap.parse_args()
    if args.tiny:
        device, dtype, args.model, args.mode = "cpu", torch.float32, "tiny", "eager"
        args.slots, args.requests, args.latency_runs = 8, 8, 2
    elif not torch.cuda.is_available():
        print("gpu_engine.py: no CUDA device here; run it on a GPU machine (or pass --tiny for a CPU "
              "logic check)", file=sys.stderr)
        sys.exit(2)
    else:
        device, dtype = "cuda", torch.bfloat16
    from detailflow.models.engine import GenerationEngine, Request

    t_build = time.perf_counter()
    ar, cfg = build(args.model, device, dtype)
    engine = GenerationEngine(ar, slots=args.slots, device=device, mode=args.mode, dtype=dtype,
                              generator_device=device)
    engine.warmup(filters=(False,))  # top-k / top-p off in this run: capture only that variant
    build_s = time.perf_counter() - t_build
    req = lambda i: Request(class_id=i % cfg.num_classes, cfg_scale=args.cfg, seed=i)

    engine.generate([req(0)])  # first use of every path
    lat = []
    for i in range(args.latency_runs):
        sync(device)
        t0 = time.perf_counter()
        engine.generate([req(1000 + i)])
        sync(device)
        lat.append(time.perf_counter() - t0)
    passes_per_image = engine.submit(req(0)).passes_needed
    engine.run_until_idle()

    p0 = engine.passes
    sync(device)
    t0 = time.perf_counter()
    handles = [engine.submit(req(10_000 + i)) for i in range(args.requests)]
    engine.run_until_idle()
    sync(device)
    sat_s = time.perf_counter() - t0
    assert all(h.status == "done" for h in handles), "some requests did not finish"
    passes = engine.passes - p0
    out = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "dtype": str(dtype).replace("torch.", ""), "mode": args.mode, "slots": args.slots,
           "num_tokens": cfg.num_tokens, "passes_per_image": passes_per_image, "cfg_scale": args.cfg,
           "images_per_s_saturated": round(args.requests / sat_s, 2), "saturation_images": args.requests,
           "saturation_s": round(sat_s, 3), "mean_images_per_pass": round(args.requests * passes_per_image
                                                                        / max(1, passes), 2),
           "batch1_p50_s": round(statistics.median(lat), 4),
           "batch1_p95_s": round(sorted(lat)[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))], 4),
           "batch1_passes_per_s": round(passes_per_image / statistics.median(lat), 1),
           "build_and_capture_s": round(build_s, 2), "tiny": args.tiny}
    print(f"{args.model} {out['dtype']} {args.mode}: {out['images_per_s_saturated']} images/s saturated "
          f"({out['mean_images_per_pass']} images/pass), batch-1 p50 {out['batch1_p50_s']} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
