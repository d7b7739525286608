"""Images/s through the HTTP endpoint vs the same batched sampler in-process; latency at concurrency 1 and 16.

Usage:
    .venv/bin/python benchmarks/serve_throughput.py                 # ~3 min on 2 busy cores
    .venv/bin/python benchmarks/serve_throughput.py --model smoke --seconds 10

Setup: its own SeaweedFS + MLflow (platform.testing.isolated_services) and Ray (4 logical CPUs); a
random-init model of the named config (default tiny: N = 32, 11 passes) registered through
pipelines.registry.register and served by the real app (one Generator replica, torch_threads 1, max_batch_size
16, backend batch). Every request is one image, CFG 1.5, its own seed, format json (base64 PNG).
  1. in-process: sampling.BatchJob over 16 such requests back to back (what one @serve.batch call
     runs), on one torch thread: images/s;
  2. HTTP at concurrency 16 (16 client threads on 127.0.0.1, closed loop): images/s, p50/p95 latency,
     and the mean number of requests per sampler call the replica saw;
  3. HTTP at concurrency 1: p50/p95 latency.
On this CPU box the Serve proxy, the ingress (PNG + base64), the clients and the replica share two
cores with the sampler, and the tiny model's sampler call is a few milliseconds, so the ratio measures
the per-request overhead more than the sampler; on a GPU with GPT-L the sampler dominates.
Last line: one JSON object (http_vs_inprocess, p50_ms_c1, p95_ms_c1, p50_ms_c16, p95_ms_c16, ...).
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


def random_models(name: str, seed: int = 0):
    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import get_model_config
    from detailflow.models.tokenizer import DetailFlowTokenizer

    mc = get_model_config(name)
    torch.manual_seed(seed)
    tok, ar = DetailFlowTokenizer(mc.tokenizer).eval(), DetailFlowGPT(mc.ar).eval()
    torch.nn.init.normal_(ar.head.weight, 0.0, 0.2)
    return mc, tok, ar


def register(settings, storage, name: str, model: str) -> str:
    from detailflow.models.export import save_pretrained
    from detailflow.pipelines.registry.register import register as register_pair
    from detailflow.platform.serving.testing import promote_now

    mc, tok, ar = random_models(model)
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


def in_process(model: str, batch: int, seconds: float) -> float:
    from detailflow.platform.serving.sampling import BatchJob, SampleSpec

    _, tok, ar = random_models(model)
    torch.set_num_threads(1)
    specs = lambda k: [SampleSpec([i % 10], 1.5, seed=k * batch + i) for i in range(batch)]
    BatchJob(ar, tok, specs(0)).run()  # warm-up
    t0, n, k = time.perf_counter(), 0, 1
    while time.perf_counter() - t0 < seconds:
        BatchJob(ar, tok, specs(k)).run()
        n, k = n + batch, k + 1
    return n / (time.perf_counter() - t0)


def http_load(url: str, key: str, concurrency: int, seconds: float, max_requests: int) -> tuple[float, list]:
    session_headers = {"Authorization": f"Bearer {key}"}
    stop_at = time.perf_counter() + seconds
    latencies: list[float] = []

    def worker(w: int):
        s = requests.Session()
        i = 0
        while time.perf_counter() < stop_at and len(latencies) < max_requests:
            t = time.perf_counter()
            r = s.post(f"{url}/v1/generate", json={"class_ids": [i % 10], "seed": w * 100_000 + i,
                                                   "cfg_scale": 1.5}, headers=session_headers, timeout=120)
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
    args = ap.parse_args()

    from detailflow.platform.runtime import apply_runtime_env

    apply_runtime_env()
    import ray

    from detailflow.platform.serving.config import parse_serve_config
    from detailflow.platform.serving.deploy import deploy_app
    from detailflow.platform.serving.testing import free_port, http_port, test_serve_config
    from detailflow.platform.storage import Storage
    from detailflow.platform.testing import isolated_services

    inproc = in_process(args.model, args.batch, args.seconds)
    print(f"in-process BatchJob, batch {args.batch}: {inproc:.1f} images/s")
    with isolated_services() as settings, tempfile.TemporaryDirectory() as tmp:
        ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False)
        try:
            name = f"bench{os.getpid()}"
            version = register(settings, Storage(settings), name, args.model)
            key = "dfk_benchmark_key_0123456789"
            keys = f"{tmp}/keys"
            with open(keys, "w") as f:
                f.write(key + "\n")
            cfg = test_serve_config(name, keys, app="bench", port=free_port(), min_replicas=1, max_replicas=1,
                                    max_ongoing_requests=4 * args.batch, max_batch_size=args.batch,
                                    batch_wait_timeout_s=0.005, request_timeout_s=120)
            cfg["applications"][0]["deployments"][1]["ray_actor_options"] = {"num_cpus": 1}
            deploy_app(parse_serve_config(cfg))
            url = f"http://127.0.0.1:{http_port()}"
            http_load(url, key, args.batch, 3.0, 10_000)  # warm-up
            from ray import serve

            handle = serve.get_deployment_handle("Generator", "bench")
            hist0 = handle.stats.remote().result(timeout_s=60)["batch_requests_hist"]
            rate16, lat16 = http_load(url, key, args.batch, args.seconds, 100_000)
            hist1 = handle.stats.remote().result(timeout_s=60)["batch_requests_hist"]
            calls = {int(k): v - hist0.get(k, 0) for k, v in hist1.items()}
            mean_batch = sum(k * v for k, v in calls.items()) / max(1, sum(calls.values()))
            _, lat1 = http_load(url, key, 1, args.seconds / 2, 200)
        finally:
            ray.shutdown()
    ms = lambda x: round(1000 * x, 1)
    out = {"http_vs_inprocess": round(rate16 / inproc, 3), "images_per_s_http_c16": round(rate16, 2),
           "images_per_s_inprocess": round(inproc, 2),
           "p50_ms_c1": ms(statistics.median(lat1)), "p95_ms_c1": ms(percentile(lat1, .95)),
           "p50_ms_c16": ms(statistics.median(lat16)), "p95_ms_c16": ms(percentile(lat16, .95)),
           "model": args.model, "model_version": version, "requests_c16": len(lat16),
           "requests_c1": len(lat1), "mean_batch_c16": round(mean_batch, 2),
           "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(f"HTTP c16: {rate16:.1f} images/s = {out['http_vs_inprocess']} x in-process; p50/p95 "
          f"{out['p50_ms_c16']}/{out['p95_ms_c16']} ms; c1 p50/p95 {out['p50_ms_c1']}/{out['p95_ms_c1']} ms")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
