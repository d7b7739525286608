"""Images/s through the HTTP endpoint vs the same batched sampler in-process; latency at concurrency 1 and 16.

Usage:
    .venv/bin/python benchmarks/serve_throughput.py                 # ~3 min on 2 busy cores
    .venv/bin/python benchmarks/serve_throughput.py --model smoke --seconds 10
    .venv/bin/python benchmarks/serve_throughput.py --ar-size gpt-b  # GPT-B-sized AR: the sampler dominates

Setup: its own SeaweedFS + MLflow (platform.testing.isolated_services) and Ray (4 logical CPUs); a
random-init model of the named config (default tiny: N = 32, 11 passes) registered through
pipelines.registry.register and served by the real app: one Generator replica (HTTP front + scheduler +
engine in one deployment, one hop; the engine in the replica's child process, engine_process.py, or
with --user-config engine_process=false a thread of the replica), torch_threads 1, max_batch_size 16
(engine: 32 KV rows), backend --backend (engine; batch = the static @serve.batch sampler). Every
request is one image, CFG 1.5, its own seed, the default format (PNG bytes back), Cache-Control:
no-cache (no result cache).
  1. in-process: sampling.BatchJob over 16 such requests back to back (what one static batch runs), on
     one torch thread: images/s; and one request alone (BatchJob of 1 + its PNG): p50 latency; the
     images/s are measured again after the HTTP phases, and the ratios use the mean of the two;
  2. HTTP at concurrency 16 (16 client threads on 127.0.0.1, each on a keep-alive http.client
     connection, closed loop, PNG bytes back): images/s, p50/p95 latency, the mean images per forward
     pass (engine: its row_passes / passes; batch: requests per call), and the CPU ms per image of
     the replica, its engine process, Serve's proxy, HAProxy, the clients and the box's busy cores
     (CpuMeter);
  3. HTTP at concurrency 2 x batch for half as long (saturation: the engine's slots never wait for a
     client): images/s and the mean images per forward pass, against the in-process batch;
  4. HTTP at concurrency 1: p50/p95 latency.
--front: haproxy (default: Ray's HAProxy straight to the replica, what serve up and the RayService
run), proxy (Serve's Python proxy), throughput (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: direct ingress, the
clients on the replica's own HTTP port as a load balancer would be, no proxy process in the path).
On this CPU box the front, the clients and the replica share two cores with the sampler, and the
tiny model's pass is a few milliseconds, so the ratio measures the per-request overhead more than
the sampler; on a GPU with GPT-L the sampler dominates.
Last line: one JSON object (http_vs_inprocess, p50_ms_c1, p50_ms_inprocess_c1, mean_images_per_pass, ...).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import http.client
import json
import os
import statistics
import tempfile
import time
import urllib.parse

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
    from detailflow.platform.export_store import store_export
    from detailflow.platform.serving.testing import promote_now

    mc, tok, ar = random_models(model, ar_size=ar_size)
    uris = {}
    for kind, module, cfg in (("tokenizer", tok, mc.tokenizer), ("ar", ar, mc.ar)):
        key = f"bench/{name}/{kind}/export"
        config = {"kind": kind, "model": model, "run_name": f"{kind}-{name}", kind: dataclasses.asdict(cfg)}
        if kind == "ar":
            config["tokenizer"] = uris["tokenizer"]
        with tempfile.TemporaryDirectory() as d:  # stored once (exports/<digest>/), key points to it
            save_pretrained(module, config, d)
            store_export(storage, d, key)
        uris[kind] = storage.uri(key)
    version = register_pair(settings, name, ar=uris["ar"], tokenizer=uris["tokenizer"])["generator_version"]
    promote_now(settings, name, version)
    return version


def in_process(model: str, batch: int, seconds: float, ar_size: str) -> tuple[float, float]:
    """(images/s of full static batches, p50 s of one request alone incl. its PNG, the HTTP default)."""
    from detailflow.platform.serving.images import to_png
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
        to_png(final.images[0])
        alone.append(time.perf_counter() - t)
    return rate, statistics.median(alone)


def http_load(url: str, key: str, concurrency: int, seconds: float, max_requests: int) -> tuple[float, list]:
    """Closed loop: `concurrency` threads, each on its own keep-alive connection (http.client: a client
    a few times cheaper in CPU than requests', which matters where the clients share the box's two
    cores with the server), POST one image and read the whole answer (PNG bytes), then go again."""
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-cache",
               "Content-Type": "application/json"}
    stop_at = time.perf_counter() + seconds
    latencies: list[float] = []

    def worker(w: int):
        conn, i = http.client.HTTPConnection(host, port, timeout=120), 0
        while time.perf_counter() < stop_at and len(latencies) < max_requests:
            body = json.dumps({"class_ids": [i % 10], "seed": w * 100_000 + i, "cfg_scale": 1.5})
            t = time.perf_counter()
            conn.request("POST", "/v1/generate", body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            if r.status == 503:  # admission bound reached: back off as a client should
                time.sleep(0.01)
                continue
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {data[:300]!r}")
            latencies.append(time.perf_counter() - t)
            i += 1
        conn.close()

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return len(latencies) / (time.perf_counter() - t0), latencies


class CpuMeter:
    """CPU seconds used over a window by named processes, this process (the clients) and the whole box
    (/proc): where each image's CPU goes when server and clients share the cores."""

    def __init__(self, pids: dict[str, list[int]]):
        import psutil

        self.procs = {n: [psutil.Process(p) for p in ps] for n, ps in pids.items()}
        self.me = psutil.Process()
        self.start = self._read()

    def _read(self) -> dict:
        import psutil

        def cpu(ps):
            return sum(t.user + t.system for t in (p.cpu_times() for p in ps))

        out = {n: cpu(ps) for n, ps in self.procs.items()}
        out["clients"] = cpu([self.me])
        box = psutil.cpu_times()
        out["box"] = box.user + box.system + getattr(box, "nice", 0.0) + getattr(box, "softirq", 0.0) \
            + getattr(box, "irq", 0.0)
        out["wall"] = time.perf_counter()
        return out

    def per_image_ms(self, images: int) -> dict:
        end = self._read()
        wall = end["wall"] - self.start["wall"]
        out = {f"cpu_ms_per_image_{n}": round(1000 * (end[n] - self.start[n]) / max(1, images), 2)
               for n in end if n not in ("wall",)}
        out["box_busy_cores"] = round((end["box"] - self.start["box"]) / wall, 2)
        return out


def images_per_pass(s0: dict, s1: dict, backend: str) -> float:
    """Mean images per forward pass between two stats() snapshots (engine: image-passes / passes;
    batch: requests per sampler call)."""
    if backend == "engine":
        return ((s1["engine"]["row_passes"] - s0["engine"]["row_passes"])
                / max(1, s1["engine"]["passes"] - s0["engine"]["passes"]))
    hist0, hist1 = s0["batch_requests_hist"], s1["batch_requests_hist"]
    calls = {int(k): v - hist0.get(k, 0) for k, v in hist1.items()}
    return sum(k * v for k, v in calls.items()) / max(1, sum(calls.values()))


def server_pids() -> dict[str, list[int]]:
    """Serve's HTTP proxy process (in the path unless the front is direct ingress) and HAProxy's
    processes (the front with --front haproxy)."""
    import psutil

    out: dict[str, list[int]] = {}
    for p in psutil.process_iter(["cmdline", "name"]):
        if any("ProxyActor" in part for part in (p.info["cmdline"] or [])):
            out.setdefault("proxy", []).append(p.pid)
        elif p.info["name"] == "haproxy":
            out.setdefault("haproxy", []).append(p.pid)
    return out


def name_value(ap: argparse.ArgumentParser, flag: str, setting: str) -> tuple[str, str]:
    """NAME=VALUE of a repeatable flag, or the parser's usage error."""
    name, sep, value = setting.partition("=")
    if not sep or not name:
        ap.error(f"{flag} wants NAME=VALUE, got {setting!r}")
    return name, value


def front_url(front: str, app: str) -> str:
    """Where clients send requests: Serve's proxy (proxy), HAProxy (haproxy, on the proxy's port), or,
    for throughput (direct ingress, no proxy in the path), the replica's own HTTP port, the target a
    load balancer is given (the controller's target groups)."""
    import ray
    from ray.serve.context import _get_global_client

    from detailflow.platform.serving.testing import http_port

    if front != "throughput":
        return f"http://127.0.0.1:{http_port()}"
    controller = _get_global_client()._controller
    for _ in range(300):
        groups = ray.get(controller.get_target_groups.remote(app))
        ports = [t.port for g in groups if g.protocol == "HTTP" and g.app_name == app for t in g.targets]
        if ports:
            return f"http://127.0.0.1:{ports[0]}"
        time.sleep(0.2)
    raise RuntimeError(f"no direct-ingress HTTP target for app {app!r}: {groups}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="model config of the random-init model (smoke | tiny)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each measurement")
    ap.add_argument("--batch", type=int, default=16, help="concurrency = max_batch_size")
    ap.add_argument("--backend", default="engine", choices=["engine", "batch"])
    ap.add_argument("--front", default="haproxy", choices=["haproxy", "proxy", "throughput"],
                    help="haproxy: what serve up and the RayService run (serving/ingress.py)")
    ap.add_argument("--ar-size", default="model", choices=sorted(AR_SIZES),
                    help="model: the config's AR; gpt-b: GPT-B width/depth (sampler-dominated)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting for Ray and Serve, applied after the front's (A/B of a knob)")
    ap.add_argument("--user-config", action="append", default=[], metavar="NAME=VALUE",
                    help="a Generator user_config field (GeneratorOptions; VALUE as JSON, else text), e.g. "
                         "gil_switch_interval_ms=1")
    args = ap.parse_args()
    if args.front == "throughput":
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # read by Serve's processes at import
        # it turns the router's own loop off, which this (synchronous) driver's stats handle needs
        os.environ.setdefault("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "1")
    elif args.front == "haproxy":
        from detailflow.platform.serving.ingress import front_env

        os.environ.update(front_env("haproxy", shared_host=True))
    for setting in args.env:
        name, value = name_value(ap, "--env", setting)
        os.environ[name] = value
    user_config = dict(name_value(ap, "--user-config", setting) for setting in args.user_config)

    from detailflow.platform.runtime import apply_runtime_env

    apply_runtime_env()
    import ray
    from ray import serve

    from detailflow.platform.serving.config import parse_serve_config
    from detailflow.platform.serving.deploy import deploy_app
    from detailflow.platform.serving.testing import free_port, test_serve_config
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
            for field, value in user_config.items():  # JSON values (numbers, true), else the text
                with contextlib.suppress(json.JSONDecodeError):
                    value = json.loads(value)
                cfg["applications"][0]["deployments"][0]["user_config"][field] = value
            deploy_app(parse_serve_config(cfg))
            url = front_url(args.front, "bench")
            http_load(url, key, args.batch, 3.0, 10_000)  # warm-up
            handle = serve.get_deployment_handle("Generator", "bench")
            s0 = handle.stats.remote().result(timeout_s=60)
            engine_pid = (s0.get("engine") or {}).get("engine_pid")  # the engine's own process, if any
            meter = CpuMeter({"replica": [s0["pid"]], **({"engine": [engine_pid]} if engine_pid else {}),
                              **server_pids()})
            rate16, lat16 = http_load(url, key, args.batch, args.seconds, 100_000)
            cpu = meter.per_image_ms(len(lat16))
            s1 = handle.stats.remote().result(timeout_s=60)
            mean_batch = images_per_pass(s0, s1, args.backend)
            # saturation: twice the engine's images offered at once, so a slot never waits for a client
            s2 = handle.stats.remote().result(timeout_s=60)
            rate_sat, _ = http_load(url, key, 2 * args.batch, args.seconds / 2, 100_000)
            mean_batch_sat = images_per_pass(s2, handle.stats.remote().result(timeout_s=60), args.backend)
            _, lat1 = http_load(url, key, 1, args.seconds / 2, 200)
        finally:  # Serve first: a live handle's metrics thread would start a new Ray after shutdown
            serve.shutdown()
            ray.shutdown()
    # the in-process rate again, after the HTTP phases: this box's speed drifts by 10-15% over minutes,
    # so the ratio's denominator is the mean of the runs before and after (both reported)
    inproc_after, _ = in_process(args.model, args.batch, args.seconds / 2, args.ar_size)
    inproc_before, inproc = inproc, (inproc + inproc_after) / 2
    ms = lambda x: round(1000 * x, 1)
    out = {"http_vs_inprocess": round(rate16 / inproc, 3), "images_per_s_http_c16": round(rate16, 2),
           "images_per_s_inprocess": round(inproc, 2),
           "images_per_s_inprocess_before": round(inproc_before, 2),
           "images_per_s_inprocess_after": round(inproc_after, 2),
           "http_saturated_vs_inprocess": round(rate_sat / inproc, 3),
           "p50_ms_c1": ms(statistics.median(lat1)), "p95_ms_c1": ms(percentile(lat1, .95)),
           "p50_ms_inprocess_c1": ms(inproc_c1), "backend": args.backend, "front": args.front,
           "p50_ms_c16": ms(statistics.median(lat16)), "p95_ms_c16": ms(percentile(lat16, .95)),
           "model": args.model, "ar_size": args.ar_size, "env": args.env, "user_config": args.user_config,
           "model_version": version, "requests_c16": len(lat16),
           "requests_c1": len(lat1), "mean_images_per_pass_c16": round(mean_batch, 2),
           "mean_images_per_pass_saturated": round(mean_batch_sat, 2),
           "images_per_pass_saturated_vs_batch": round(mean_batch_sat / args.batch, 3),
           "images_per_s_http_saturated": round(rate_sat, 2),
           "load_avg_1m": round(os.getloadavg()[0], 2), **cpu}
    print(f"HTTP c16: {rate16:.1f} images/s = {out['http_vs_inprocess']} x in-process; p50/p95 "
          f"{out['p50_ms_c16']}/{out['p95_ms_c16']} ms; c1 p50/p95 {out['p50_ms_c1']}/{out['p95_ms_c1']} ms")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
