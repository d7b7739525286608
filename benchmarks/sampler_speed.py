"""Sampler speed: grouped decoding with a KV cache vs the released code's way and vs token-by-token.

Usage (CPU, small GPT: N = 128, g = 8, causal 8, 4 layers, width 256, vocab 8192):
    .venv/bin/python benchmarks/sampler_speed.py
GPU check (GPT-L of DetailFlow-16, bf16 weights; batch-1 latency and images/s at batch 64):
    python benchmarks/sampler_speed.py --device cuda --preset gpt-l --dtype bf16
GPU engine figures (issue 13: batch-1 latency goal <= 10 ms/image; images/s at batch 64 and 256), with
the generation engine's CUDA-graph path (detailflow/models/engine.py, mode="graph", CUDA generators):
    python benchmarks/sampler_speed.py --device cuda --preset gpt-l --dtype bf16 --engine-batches 64,256
    (add --compile to torch.compile the captured pass). THE GPU FIGURES ARE OWED: the session that wrote
    the engine had no GPU; the path is tested on CPU in its fixed-shape form ("static" mode) and by
    tests/test_engine_gpu.py (skipped without CUDA). CPU smoke of this section:
    .venv/bin/python benchmarks/sampler_speed.py --engine-batches 4 --engine-mode static --repeats 1

Measures, in one run and with interleaved repeats (medians):
  (a) kv_vs_nocache: grouped + KV cache vs the released sampler's way: every pass recomputes the whole
      prefix, applies the output head and CFG to every position and keeps the last positions' logits;
      kv_vs_nocache_lean: vs our own no-cache path (sample(use_kv_cache=False)), which also recomputes
      the prefix but applies the head to the needed positions only. At --batch, with CFG (doubled batch);
  (b) grouped_vs_token_by_token: grouped + KV cache (causal_num + M - 1 passes) vs token-by-token with a
      KV cache (N passes of one position), batch 1.
tokens_equal: the KV and no-KV samplers give identical codes for the same seed.
(c) engine (with --engine-batches; default on CUDA 64,256): batch-1 latency of one request through the
    engine, images/s with B requests submitted at once (2B cache rows with CFG), and
    engine_sequences_equal: the fraction of B sequences whose engine codes equal sample()'s with the same
    seeds (bf16 logits differ with the pass shapes, so near-ties flip some; fp32 should give 1.0).
Clock: on CPU the process CPU time with one torch thread (default --threads 1), because this machine is
shared and wall time swings with other jobs' load; wall-clock figures are printed too. On CUDA: wall time
after synchronisation. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from detailflow.models.ar import DetailFlowGPT
from detailflow.models.configs import ARConfig, get_model_config
from detailflow.models.engine import GenerationEngine, Request
from detailflow.models.sampler import decode_plan, draw, draw_uniforms, guide, sample


@torch.no_grad()
def sample_released_way(model: DetailFlowGPT, class_ids_B, cfg_scale: float, generator) -> torch.Tensor:
    """Cost model of the released sampler (spec §3.5): same plan and random draws as `sample`, but each
    pass runs the whole prefix and computes guided logits for all of its positions."""
    c = model.cfg
    batch = class_ids_B.shape[0]
    classes = torch.cat([class_ids_B, torch.full_like(class_ids_B, model.null_class)])
    codes = torch.zeros(2 * batch, c.num_tokens, dtype=torch.long, device=class_ids_B.device)
    for start, stop in decode_plan(c.num_tokens, c.group_size, c.causal_num):
        logits = guide(model.run(model.embed_range(codes, classes, 0, stop)), cfg_scale)[:, start:stop]
        uniforms = draw_uniforms(batch, stop - start, c.vocab_size, generator, codes.device)
        codes[:, start:stop] = draw(logits, uniforms).repeat(2, 1)
    return codes[:batch]


def build_model(preset: str, device: str, dtype: torch.dtype) -> DetailFlowGPT:
    if preset == "gpt-l":
        cfg = get_model_config("detailflow-16").ar
    elif preset == "small":
        cfg = ARConfig(vocab_size=8192, num_classes=1000, num_tokens=128, group_size=8, causal_num=8,
                       dim=256, depth=4, heads=4)
    else:
        raise SystemExit(f"unknown preset {preset!r} (small | gpt-l)")
    torch.manual_seed(0)
    model = DetailFlowGPT(cfg)
    torch.nn.init.normal_(model.head.weight, 0.0, 0.2)  # a trained head is not zero: non-flat logits
    return model.to(device=device, dtype=dtype).eval()


def timed(fn, device: str) -> tuple[float, float, torch.Tensor]:
    """(clock seconds, wall seconds, output); clock = CPU time on CPU, wall time on CUDA."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - w0
    return (wall if cuda else time.process_time() - c0), wall, out


def compare(a, b, repeats: int, device: str) -> dict:
    """Medians (clock and wall) of a and b, run interleaved after one warm-up each; plus their outputs."""
    a(), b()
    runs = {"a": [], "b": []}
    for _ in range(repeats):
        for key, fn in (("a", a), ("b", b)):
            runs[key].append(timed(fn, device))
    med = lambda key, i: statistics.median(r[i] for r in runs[key])
    return {"a": med("a", 0), "b": med("b", 0), "a_wall": med("a", 1), "b_wall": med("b", 1),
            "outs_a": [r[2] for r in runs["a"]], "outs_b": [r[2] for r in runs["b"]]}


def cuda(device: str) -> bool:
    return device.startswith("cuda")


def engine_figures(model: DetailFlowGPT, batches: list[int], args, device: str) -> dict:
    """(c): the generation engine's batch-1 latency, images/s at each batch, equality with sample()."""
    mode = args.engine_mode or ("graph" if cuda(device) else "eager")
    rows = 2 if args.cfg_scale > 1 else 1
    reqs = lambda n, seed0: [Request(i % model.cfg.num_classes, cfg_scale=args.cfg_scale, seed=seed0 + i)
                             for i in range(n)]
    out = {"mode": mode, "compile": args.compile, "images_per_s": {}, "sequences_equal": {}}
    for batch in [1] + batches:
        engine = GenerationEngine(model, slots=rows * batch, device=device, mode=mode,
                                  generator_device=device, compile_pass=args.compile)
        engine.warmup(filters=(False,))  # capture every bucket's graph (no top-k/top-p here)
        engine.generate(reqs(batch, 0))  # warm-up run
        times = []
        for r in range(args.repeats):
            if cuda(device):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            codes = engine.generate(reqs(batch, 1000 * r))
            times.append(time.perf_counter() - t0)  # generate() ends with the codes on the host: synced
        wall = statistics.median(times)
        if batch == 1:
            out["latency_batch1_s"] = round(wall, 5)
            continue
        out["images_per_s"][batch] = round(batch / wall, 2)
        seed0 = 1000 * (args.repeats - 1)  # the seeds of the last timed run, whose codes are kept
        gens = [torch.Generator(device=device).manual_seed(seed0 + i) for i in range(batch)]
        classes = torch.arange(batch, device=device) % model.cfg.num_classes
        alone = [sample(model, classes[i:i + 1], cfg_scale=args.cfg_scale, generator=gens[i])[0].cpu()
                 for i in range(min(batch, 16))]  # each request sampled by itself, same seed
        same = sum(torch.equal(a, c) for a, c in zip(alone, codes[:len(alone)], strict=True))
        out["sequences_equal"][batch] = round(same / len(alone), 3)
        del engine
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="small", choices=["small", "gpt-l"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=None, help="batch for (a) and images/s (cpu 16, cuda 64)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--engine-batches", default=None, help="comma list for (c); default 64,256 on cuda")
    p.add_argument("--engine-mode", default=None, choices=["eager", "static", "graph"],
                   help="engine mode for (c); default graph on cuda, eager on cpu")
    p.add_argument("--compile", action="store_true", help="(c): torch.compile the captured pass")
    args = p.parse_args(argv)
    device = args.device
    if args.threads and not device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    batch = args.batch or (64 if device.startswith("cuda") else 16)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_model(args.preset, device, dtype)
    cfg = model.cfg
    params = sum(q.numel() for q in model.parameters()) / 1e6
    print(f"model: preset={args.preset} depth={cfg.depth} dim={cfg.dim} N={cfg.num_tokens} "
          f"g={cfg.group_size} "
          f"causal={cfg.causal_num} vocab={cfg.vocab_size} params={params:.1f}M device={device} "
          f"dtype={args.dtype} threads={torch.get_num_threads()}")

    def run(classes, seed, **kw):
        gen = torch.Generator(device=device).manual_seed(seed)
        return lambda: sample(model, classes, cfg_scale=args.cfg_scale, generator=gen.manual_seed(seed), **kw)

    def released(classes, seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        return lambda: sample_released_way(model, classes, args.cfg_scale, gen.manual_seed(seed))

    classes = torch.arange(batch, device=device) % cfg.num_classes
    if args.cfg_scale <= 1:
        raise SystemExit("--cfg-scale must be > 1 (the released sampler asserts CFG > 1)")
    a = compare(run(classes, 1), released(classes, 1), args.repeats, device)
    t_kv, t_nokv = a["a"], a["b"]
    lean = compare(run(classes, 1), run(classes, 1, use_kv_cache=False), args.repeats, device)
    t_kv2, t_lean = lean["a"], lean["b"]
    outs = a["outs_a"] + a["outs_b"] + lean["outs_a"] + lean["outs_b"]
    tokens_equal = all(torch.equal(x, outs[0]) for x in outs)
    one = classes[:1]
    b = compare(run(one, 2), run(one, 2, group_parallel=False), args.repeats, device)
    t_grp1, t_tbt1 = b["a"], b["b"]
    clock = "wall" if device.startswith("cuda") else "cpu_time"
    res = {
        "kv_vs_nocache": round(t_nokv / t_kv, 2),
        "kv_vs_nocache_lean": round(t_lean / t_kv2, 2),
        "grouped_vs_token_by_token": round(t_tbt1 / t_grp1, 2),
        "images_per_s": round(batch / t_kv, 2),
        "clock": clock,
        "tokens_equal": tokens_equal,
        "batch": batch,
        "latency_batch1_s": round(b["a_wall"], 4),
        "seconds": {"kv": round(t_kv, 4), "nocache": round(t_nokv, 4), "kv_again": round(t_kv2, 4),
                    "nocache_lean": round(t_lean, 4), "grouped_b1": round(t_grp1, 4),
                    "token_by_token_b1": round(t_tbt1, 4)},
        "wall_seconds": {"kv": round(a["a_wall"], 4), "nocache": round(a["b_wall"], 4),
                         "grouped_b1": round(b["a_wall"], 4), "token_by_token_b1": round(b["b_wall"], 4)},
        "threads": torch.get_num_threads(),
        "passes": {"grouped": cfg.forward_passes, "token_by_token": cfg.num_tokens},
        "cfg_scale": args.cfg_scale, "device": device, "preset": args.preset, "dtype": args.dtype,
    }
    print(f"clock: {clock} (medians of {args.repeats} interleaved repeats)")
    print(f"(a) batch {batch}, cfg {args.cfg_scale}: KV {t_kv:.3f}s vs released-way no-cache {t_nokv:.3f}s "
          f"-> {res['kv_vs_nocache']}x (goal >= 5x); wall {a['a_wall']:.3f}s vs {a['b_wall']:.3f}s")
    print(f"    KV {t_kv2:.3f}s vs lean no-cache (head on needed rows) {t_lean:.3f}s -> "
          f"{res['kv_vs_nocache_lean']}x; images/s {res['images_per_s']}; tokens_equal={tokens_equal}")
    print(f"(b) batch 1: grouped {t_grp1:.3f}s ({cfg.forward_passes} passes) vs token-by-token {t_tbt1:.3f}s "
          f"({cfg.num_tokens} passes) -> {res['grouped_vs_token_by_token']}x (goal >= 4x); "
          f"wall {b['a_wall']:.3f}s vs {b['b_wall']:.3f}s")
    batches = args.engine_batches if args.engine_batches is not None else ("64,256" if cuda(device) else "")
    if batches:
        res["engine"] = engine_figures(model, [int(x) for x in batches.split(",")], args, device)
        e = res["engine"]
        print(f"(c) engine ({e['mode']}): batch-1 latency {e['latency_batch1_s'] * 1e3:.2f} ms (goal <= 10 "
              f"ms on an H200); images/s {e['images_per_s']}; sequences equal to sample(): "
              f"{e['sequences_equal']}")
    print("reproduce: python benchmarks/sampler_speed.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
