"""Distributed-training benchmark: ZeRO-2 vs ZeRO-0 on 2 CPU workers at the same global batch.

Usage:
    .venv/bin/python benchmarks/train_scaling.py                      # CPU: 2 Ray Train workers (~1-2 min)
    .venv/bin/python benchmarks/train_scaling.py --steps 30 --model tiny --micro-batch 16
    .venv/bin/python benchmarks/train_scaling.py --gpu                # 1 GPU: GPT-L N=128, 256 px tokenizer

CPU figures (tokenizer from the model registry, synthetic images, identical data and t sequence):
  zero2_vs_zero0_step_time          median step time ZeRO-2 / ZeRO-0; both engines live in the same
                                    2 workers and step in turn (goal <= 1.15)
  zero2_vs_zero0_optimizer_memory   bytes of optimiser-state tensors held per rank, ZeRO-2 / ZeRO-0
                                    (goal ~ 0.5 with 2 ranks: ZeRO-2 partitions Adam's moments)
  tokenizer_images_per_s            global images/s of the ZeRO-2 run
  zero3_ema_vs_no_ema_step_time     AR model (same registry name) under ZeRO-3: median of (step + the
                                    sharded EMA update on each rank's fp32 partition) / median step
                                    (goal <= 1.2); the EMA runs on every step
  zero3_gathered_ema_vs_no_ema_step_time   the same with the old EMA (gather every parameter, average
                                    the whole model on every rank), for comparison
GPU figures (--gpu, in-process, one GPU, bf16, ZeRO-2): ar_tokens_per_s and ar_mfu of GPT-L at N=128
(6 * params * tokens/s over the GPU's bf16 peak, --peak-tflops), tokenizer_256_images_per_s for the
DetailFlow-16 tokenizer at 256 px. The last printed line is one JSON object with the figures.
Needs no S3/MLflow: nothing is checkpointed or tracked (Ray Train's storage is a local tmp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch


def _batches(model, cfg, steps: int, micro_batch: int, seed: int, rank: int = 0):
    """Synthetic (img, target, t) micro-batches; the t sequence is the same on every rank (same graph),
    the images differ per rank."""
    import numpy as np

    from detailflow.models.degrade import degrade_to_prefix

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    for _ in range(steps):
        t = int(rng.choice(model.rmap.admissible))
        img = torch.rand(micro_batch, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
        yield img, degrade_to_prefix(img, t, model.rmap), t


def _timed_step(engine, img, target, t: int, step: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    loss, _ = engine(img, target, t, step)
    engine.backward(loss)
    engine.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def _ar_ema_times(config: dict, rank: int) -> dict[str, list[float]]:
    """ZeRO-3 AR steps, each followed by the sharded EMA update and by the old gathered one, all timed
    separately: step time without EMA = step, with = step + its EMA update."""
    import deepspeed

    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import get_model_config
    from detailflow.models.ema import EMA, ShardedEMA
    from detailflow.pipelines.train.loop_common import StepAdapter, zero3_external
    from detailflow.platform import deepspeed_glue as dsg

    cfg = get_model_config(config["model"]).ar
    torch.manual_seed(0)
    gpt = DetailFlowGPT(cfg)
    gathered_ema = EMA(gpt, 0.999)  # whole copy, taken before ZeRO-3 partitions the parameters
    opt = dsg.make_optimizer(gpt.param_groups(0.05), lr=1e-4, weight_decay=0.05, kind="adamw")
    ds_cfg = dsg.build_ds_config(micro_batch=config["micro_batch"], zero_stage=3)
    engine = dsg.init_engine(StepAdapter(gpt, "loss"), opt, ds_cfg, backend="gloo")
    zero3_external(engine)
    sharded_ema = ShardedEMA(dsg.master_fragments(engine), 0.999)
    params = list(engine.module.parameters())
    gen = torch.Generator().manual_seed(rank)
    times: dict[str, list[float]] = {"step": [], "sharded": [], "gathered": []}
    for step in range(config["warmup"] + config["steps"]):
        codes = torch.randint(cfg.vocab_size, (config["micro_batch"], cfg.num_tokens), generator=gen)
        labels = torch.randint(cfg.num_classes, (config["micro_batch"],), generator=gen)
        t0 = time.perf_counter()
        loss = engine(codes, codes, labels)
        engine.backward(loss)
        engine.step()
        t1 = time.perf_counter()
        sharded_ema.update(dsg.master_fragments(engine))
        t2 = time.perf_counter()
        with deepspeed.zero.GatheredParameters(params):
            gathered_ema.update(engine.module.model)
        t3 = time.perf_counter()
        if step >= config["warmup"]:
            for key, dt in (("step", t1 - t0), ("sharded", t2 - t1), ("gathered", t3 - t2)):
                times[key].append(dt)
    return times


def cpu_worker(config: dict) -> None:
    """Both engines (ZeRO-0 and ZeRO-2, same init) live in each worker and step in turn on the same
    micro-batch, so load from other processes hits both variants alike."""
    import ray.train

    from detailflow.models.configs import get_model_config
    from detailflow.models.tokenizer import DetailFlowTokenizer
    from detailflow.pipelines.train.loop_common import StepAdapter
    from detailflow.platform import deepspeed_glue as dsg

    torch.set_num_threads(1)  # 2 workers on 2 cores: no intra-op oversubscription
    rank = ray.train.get_context().get_world_rank()
    cfg = get_model_config(config["model"]).tokenizer
    engines, models = {}, {}
    for z in (0, 2):
        torch.manual_seed(0)
        models[z] = DetailFlowTokenizer(cfg)
        opt = dsg.make_optimizer([p for p in models[z].parameters() if p.requires_grad], lr=1e-4, kind="adam")
        ds_cfg = dsg.build_ds_config(micro_batch=config["micro_batch"], zero_stage=z)
        engines[z] = dsg.init_engine(StepAdapter(models[z], "training_step"), opt, ds_cfg, backend="gloo")
    times: dict[int, list[float]] = {0: [], 2: []}
    cpu = torch.device("cpu")
    total = config["warmup"] + config["steps"]
    batches = _batches(models[0], cfg, total, config["micro_batch"], seed=1, rank=rank)
    for step, (img, target, t) in enumerate(batches):
        order = (0, 2) if step % 2 == 0 else (2, 0)  # alternate who goes first (cache effects)
        for z in order:
            dt = _timed_step(engines[z], img, target, t, step, cpu)
            if step >= config["warmup"]:
                times[z].append(dt)
    out = {"rank": rank, "times": times,
           "opt_bytes": {z: dsg.optimizer_state_bytes(e) for z, e in engines.items()},
           "params": sum(p.numel() for p in models[0].parameters() if p.requires_grad),
           "ar_ema": _ar_ema_times(config, rank)}
    with open(os.path.join(config["out_dir"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def cpu_main(args) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from detailflow.platform.runtime import apply_runtime_env

    apply_runtime_env()
    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="df-bench-") as d:
            config = {"model": args.model, "micro_batch": args.micro_batch, "steps": args.steps,
                      "warmup": args.warmup, "out_dir": d}
            tic = time.perf_counter()
            scaling = ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})
            run = RunConfig(name=f"bench-{int(time.time())}", storage_path=f"{d}/ray")
            TorchTrainer(cpu_worker, train_loop_config=config, scaling_config=scaling, run_config=run).fit()
            fit_s = time.perf_counter() - tic
            ranks = []
            for r in range(2):
                with open(os.path.join(d, f"rank{r}.json")) as f:
                    ranks.append(json.load(f))
    finally:
        ray.shutdown()
    global_batch = 2 * args.micro_batch
    step_ms, opt_bytes = {}, {}
    for z in ("0", "2"):
        # a step lasts as long as its slowest rank
        per_step = [max(a, b) for a, b in zip(ranks[0]["times"][z], ranks[1]["times"][z], strict=True)]
        step_ms[z] = statistics.median(per_step) * 1000
        opt_bytes[z] = [r["opt_bytes"][z] for r in ranks]
        print(f"ZeRO-{z}: median step {step_ms[z]:.1f} ms over {args.steps} interleaved steps "
              f"(global batch {global_batch}), optimiser state per rank {opt_bytes[z]} bytes")
    print(f"{ranks[0]['params']} trainable params ({args.model} tokenizer); fit {fit_s:.0f} s")
    mem = statistics.mean(opt_bytes["2"]) / statistics.mean(opt_bytes["0"])
    ema = [r["ar_ema"] for r in ranks]
    step_only = statistics.median(max(a, b) for a, b in zip(ema[0]["step"], ema[1]["step"], strict=True))
    with_ema = {k: statistics.median(max(a0 + a1, b0 + b1) for a0, a1, b0, b1 in
                                     zip(ema[0]["step"], ema[0][k], ema[1]["step"], ema[1][k], strict=True))
                for k in ("sharded", "gathered")}
    print(f"AR ({args.model}) ZeRO-3: median step {step_only * 1000:.1f} ms; with the sharded EMA "
          f"{with_ema['sharded'] * 1000:.1f} ms; with the gathered EMA {with_ema['gathered'] * 1000:.1f} ms")
    return {"zero3_ema_vs_no_ema_step_time": round(with_ema["sharded"] / step_only, 3),
            "zero3_gathered_ema_vs_no_ema_step_time": round(with_ema["gathered"] / step_only, 3),
            "ar_zero3_step_ms": round(step_only * 1000, 1),
            "zero2_vs_zero0_step_time": round(step_ms["2"] / step_ms["0"], 3),
            "zero2_vs_zero0_optimizer_memory": round(mem, 3),
            "tokenizer_images_per_s": round(global_batch / (step_ms["2"] / 1000), 1),
            "model": args.model, "global_batch": global_batch, "workers": 2,
            "zero0_step_ms": round(step_ms["0"], 1), "zero2_step_ms": round(step_ms["2"], 1)}


def gpu_main(args) -> dict:
    """One GPU, in-process, bf16, ZeRO-2: GPT-L at N=128 and the DetailFlow-16 tokenizer at 256 px."""
    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import get_model_config
    from detailflow.models.tokenizer import DetailFlowTokenizer
    from detailflow.pipelines.train.loop_common import StepAdapter
    from detailflow.platform import deepspeed_glue as dsg

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    device = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    paper = get_model_config("detailflow-16")
    # AR: GPT-L, N = 128
    ar_cfg = paper.ar
    torch.manual_seed(0)
    gpt = DetailFlowGPT(ar_cfg)
    n_params = sum(p.numel() for p in gpt.parameters())
    opt = dsg.make_optimizer(gpt.param_groups(0.05), lr=1e-4, weight_decay=0.05, kind="adamw")
    engine = dsg.init_engine(StepAdapter(gpt.to(device), "loss"), opt,
                             dsg.build_ds_config(micro_batch=args.ar_batch, zero_stage=2, precision="bf16"),
                             backend="nccl")
    times = []
    for _ in range(args.warmup + args.steps):
        codes = torch.randint(ar_cfg.vocab_size, (args.ar_batch, ar_cfg.num_tokens), device=device)
        labels = torch.randint(ar_cfg.num_classes, (args.ar_batch,), device=device)
        torch.cuda.synchronize()
        tic = time.perf_counter()
        loss = engine(codes, codes, labels)
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    step = statistics.median(times[args.warmup:])
    tokens_per_s = args.ar_batch * ar_cfg.num_tokens / step
    mfu = 6 * n_params * tokens_per_s / (args.peak_tflops * 1e12)
    print(f"GPT-L N={ar_cfg.num_tokens}: {n_params / 1e6:.0f}M params, batch {args.ar_batch}, "
          f"step {step * 1000:.1f} ms, {tokens_per_s:,.0f} tokens/s, MFU {mfu:.3f}")
    del engine, gpt, opt
    torch.cuda.empty_cache()
    # tokenizer at 256 px (paper sizes; pretrained parts replaced by their stand-ins)
    import dataclasses

    tok_cfg = dataclasses.replace(paper.tokenizer, align_teacher="thumbnail", perceptual_weight=0.0,
                                  gan_weight=0.0)
    torch.manual_seed(0)
    tok = DetailFlowTokenizer(tok_cfg)
    opt = dsg.make_optimizer([p for p in tok.parameters() if p.requires_grad], lr=1e-4, kind="adam")
    engine = dsg.init_engine(StepAdapter(tok.to(device), "training_step"), opt,
                             dsg.build_ds_config(micro_batch=args.tok_batch, zero_stage=2, precision="bf16"),
                             backend="nccl")
    bf16 = torch.bfloat16
    batches = _batches(tok, tok_cfg, args.warmup + args.steps, args.tok_batch, seed=1)
    times = [_timed_step(engine, img.to(device, bf16), target.to(device, bf16), t, i, device)
             for i, (img, target, t) in enumerate(batches)]
    tok_step = statistics.median(times[args.warmup:])
    print(f"Tokenizer 256 px N={tok_cfg.num_tokens}: batch {args.tok_batch}, step {tok_step * 1000:.1f} ms, "
          f"{args.tok_batch / tok_step:.1f} images/s")
    return {"ar_tokens_per_s": round(tokens_per_s), "ar_mfu": round(mfu, 4), "ar_params": n_params,
            "ar_batch": args.ar_batch, "tokenizer_256_images_per_s": round(args.tok_batch / tok_step, 1),
            "tokenizer_batch": args.tok_batch, "gpu": torch.cuda.get_device_name(0)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="model registry name of the CPU tokenizer")
    p.add_argument("--micro-batch", type=int, default=16, help="per worker (global = 2x)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--gpu", action="store_true", help="run the one-GPU figures instead")
    p.add_argument("--ar-batch", type=int, default=64, help="GPU: GPT-L sequences per step")
    p.add_argument("--tok-batch", type=int, default=32, help="GPU: 256 px images per step")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak (H100/H200: 989)")
    args = p.parse_args(argv)
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    figures = gpu_main(args) if args.gpu else cpu_main(args)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
