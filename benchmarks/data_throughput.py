"""Data-plane throughput: the Ray reader (decode + ADM crop + flip + degrade) vs plain processes.

Reproduce:
    .venv/bin/python benchmarks/data_throughput.py                      # 3000 images, 320 px JPEGs -> 256
    .venv/bin/python benchmarks/data_throughput.py --images 3000 --reader-cpus 6
    .venv/bin/python benchmarks/data_throughput.py --prefetch-batches 4      # the old read-ahead bound

What it does: starts its own local services (SeaweedFS + MLflow, temp state dir, free ports),
synthesises the shapes set as JPEG (q95) at --src-size px, ingests it with Ray (timed), then runs
one epoch of the SAME work on the same shards: (a) the training reader, one rank's DegradedStream
consumed as a Ray Train rank does, inside a placement-group bundle that reserves the readers' CPUs,
its window tasks in that bundle (bundle_epoch; ordered Ray tasks, one per window; micro-batch 32,
p = 0.2, DetailFlow-16 resolution map at 256 px), and (a') the same window tasks as one Ray Dataset
(build_degraded_dataset, evaluation's path) through iter_microbatches, and (b) one Python process
calling the same functions in a plain loop (the reader's window_task over every window of the epoch,
then row_to_microbatch; torch on 1 thread).
(c) as a control, one plain process per core each running (b) over the whole set at once: the
speed-up the cores give right now without Ray (the ceiling of (a) / (b) on a shared machine).
A warm-up pass runs first for all, so Ray's worker start-up is reported separately (cold pass).
Each timed pass also sums the CPU-seconds of the whole process tree (this driver, Ray workers,
raylet/gcs, SeaweedFS, MLflow) with psutil: CPU per image is independent of other load on the
machine, and cores x (single CPU/img) / (Ray CPU/img) is the ratio Ray would reach with every core
its own and perfect overlap (an upper bound; the measured ratio also pays scheduling gaps and the
start/tail of the epoch). On a shared machine the measured ratio is capped by the cores left over:
report it with the load average printed next to it.
Timed passes of the stream in a bundle count from building the stream to its end inside the rank task
(the placement group's and the task's start excluded: a training rank starts once). Like with like:
the Ray stream decodes with one window task per core (--stream-tasks 0) in a bundle of every core,
the control with one plain process per core.
Per-GPU rate: images per CPU-second of the stream in the bundle (1000 / its CPU ms per image, which
other load does not change) x the reader CPUs of a rank's bundle (--reader-cpus).
Read-ahead: a window task may hold its whole window unconsumed (ReaderConfig.prefetch_batches None);
with --prefetch-batches 4 (the bound before) the read-ahead tasks stop after 4 micro-batches of a
32-batch window and about one task decodes at a time.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil


def _group(proc: psutil.Process, me: int) -> str:
    """Which part of the stack a process of our tree belongs to."""
    if proc.pid == me:
        return "driver"
    name, cmd = proc.name(), " ".join(proc.cmdline()[:4])
    if "weed" in name:
        return "seaweedfs"
    if "mlflow" in cmd or "uvicorn" in cmd:
        return "mlflow"
    if "multiprocessing" in cmd:
        return "plain_processes"
    if name.startswith("ray::") or "default_worker" in cmd:
        return "ray_workers"
    return "ray_system"  # raylet, gcs_server, log monitor, ...


def tree_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (group, user + system CPU-seconds) for this process and all its descendants."""
    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            out[proc.pid] = (_group(proc, me.pid), t.user + t.system)
        except psutil.Error:  # exited while we looked
            continue
    return out


def timed(fn, *args) -> dict:
    """Run fn(*args) -> images, or (images, seconds the epoch took inside the call: without the
    placement group's and the rank task's start); wall seconds, images/s, CPU-seconds per group,
    load average."""
    c0, t0 = tree_cpu(), time.perf_counter()
    n = fn(*args)
    wall, c1 = time.perf_counter() - t0, tree_cpu()
    if isinstance(n, tuple):
        n, wall = n
    cpu: dict[str, float] = {}
    for pid, (group, sec) in c1.items():
        cpu[group] = cpu.get(group, 0.0) + sec - c0.get(pid, (group, 0.0))[1]
    total = sum(cpu.values())
    return {"images": n, "wall_s": wall, "rate": n / wall,
            "cpu_s": {k: round(v, 2) for k, v in sorted(cpu.items())}, "cpu_total_s": total,
            "cpu_ms_per_image": 1000 * total / max(n, 1), "cores_used": total / wall,
            "load_1m": os.getloadavg()[0]}


def describe(label: str, m: dict) -> str:
    return (f"{label}: {m['images']} images in {m['wall_s']:.1f}s = {m['rate']:.1f} images/s; "
            f"CPU {m['cpu_total_s']:.1f}s = {m['cores_used']:.2f} cores, "
            f"{m['cpu_ms_per_image']:.2f} ms/image {m['cpu_s']}; load avg {m['load_1m']:.1f}")


def single_process_epoch(storage, name: str, cfg, rmap) -> int:
    """The same work as the Ray reader, in one process: the reader's own window task over every
    window of epoch 0 (read row groups, permute, decode + crop, degrade), then row_to_microbatch."""
    from detailflow.pipelines.data.reader import DegradedStream, row_to_microbatch, window_task

    stream = DegradedStream(storage, name, "train", cfg, rmap, min_chunk_units=1 << 30)
    units, _ = stream.chunk_units(cfg.epoch, 0)
    produced = 0
    for out in window_task({"id": list(range(len(units.epoch)))}, storage=storage, rmap=rmap, cfg=cfg,
                           plan=stream.plan, units=units):
        for i in range(len(out["t"])):
            produced += row_to_microbatch({k: v[i:i + 1] for k, v in out.items()}).images.shape[0]
    return produced


def _single_epoch_args(args: tuple) -> int:
    return single_process_epoch(*args)


def plain_processes_epoch(pool, n: int, storage, name: str, cfg, rmap) -> int:
    """n plain processes each run the single loop over the whole set at once: what n cores give
    without Ray right now (the ceiling for Ray's ratio on this machine, given its other load)."""
    return sum(pool.map(_single_epoch_args, [(storage, name, cfg, rmap)] * n))


def ray_epoch(storage, name: str, cfg, rmap) -> int:
    """The training path: one rank's DegradedStream (ordered window tasks, task_stream.py)."""
    from detailflow.pipelines.data.reader import DegradedStream

    return sum(mb.images.shape[0] for mb in DegradedStream(storage, name, "train", cfg, rmap))


class _Rank:
    """A training rank's stand-in: an actor holding a placement-group bundle of every CPU (its own +
    its readers', raytrain.worker_resources) that consumes one rank's stream per call, its window tasks
    inside that bundle with no CPU of their own (raytrain.reader_task_options, picked by the stream).
    It lives across calls, as a rank lives for the whole run: the second call finds its window tasks'
    workers started. Torch on one thread, as in the plain loop (a Ray actor gets OMP threads = its
    CPUs: threads spinning beside the decoders)."""

    def __init__(self):
        import torch

        torch.set_num_threads(1)

    def epoch(self, storage, name: str, cfg, rmap) -> tuple[int, float]:
        """(images, seconds from building the stream to its end, inside the rank)."""
        t0 = time.perf_counter()
        n = ray_epoch(storage, name, cfg, rmap)
        return n, time.perf_counter() - t0


@contextlib.contextmanager
def rank_in_bundle():
    """A _Rank actor in a placement group of one bundle of every CPU; removed afterwards."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cpus = ray.cluster_resources()["CPU"]
    pg = placement_group([{"CPU": cpus}])
    ray.get(pg.ready(), timeout=60)
    try:
        in_bundle = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        rank = ray.remote(_Rank).options(num_cpus=cpus, scheduling_strategy=in_bundle).remote()
        yield rank
        ray.kill(rank)
    finally:
        remove_placement_group(pg)


def bundle_epoch(rank, storage, name: str, cfg, rmap) -> tuple[int, float]:
    """ray_epoch as a Ray Train rank runs it (rank: a _Rank in its bundle): images and the epoch's
    seconds inside the rank (the group's and the actor's start excluded: a rank starts once)."""
    import ray

    return ray.get(rank.epoch.remote(storage, name, cfg, rmap))


def ray_dataset_epoch(storage, name: str, cfg, rmap) -> int:
    """The one-pass Ray Dataset of the same window tasks (build_degraded_dataset; evaluation's path)."""
    from detailflow.pipelines.data.reader import build_degraded_dataset, iter_microbatches

    n = 0
    for img, _, _ in iter_microbatches(build_degraded_dataset(storage, name, "train", cfg, rmap)):
        n += img.shape[0]
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000,
                    help="images to synthesise and stream (3000: ~10 s epochs, start-up and tail < 15%%)")
    ap.add_argument("--src-size", type=int, default=320, help="source JPEG side (ADM resizes to [256, 320])")
    ap.add_argument("--task-cpus", type=float, default=1.0,
                    help="CPUs per task of the one-pass Ray Dataset (1 = 1 per core)")
    ap.add_argument("--stream-tasks", type=int, default=0,
                    help="window tasks at once in the training stream (0: one per core)")
    ap.add_argument("--window-groups", type=int, default=4,
                    help="row groups per window (= per Ray task); 4: 14 windows of the 3000 images, 7 per "
                    "core: the last wave of windows (one task left decoding) is a small part of the epoch, "
                    "as in training (an endless stream has no last wave)")
    ap.add_argument("--reader-cpus", type=float, default=6,
                    help="reader CPUs of a rank's bundle to extrapolate to (tokenizer-detailflow-*: 6)")
    ap.add_argument("--prefetch-batches", type=int, default=0,
                    help="micro-batches a window task may hold unconsumed (0: its whole window)")
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
    from detailflow.pipelines.data.reader import DegradedStream, ReaderConfig
    from detailflow.platform.storage import Storage
    from detailflow.platform.testing import isolated_services

    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    # undone last-in first-out: Ray, then the services, then their data (the temp dir)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="df-bench-data-")))
        t0 = time.perf_counter()
        settings = stack.enter_context(isolated_services(tmp / "state"))
        print(f"services up in {time.perf_counter() - t0:.1f}s ({settings.s3_endpoint_url})", flush=True)
        stack.callback(lambda: ray.shutdown() if ray.is_initialized() else None)
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
        cfg = ReaderConfig(image_size=256, micro_batch=32, degrade_prob=0.2, seed=0, num_cpus=args.task_cpus,
                           prefetch_windows=args.stream_tasks or cores,
                           window_groups=args.window_groups, prefetch_batches=args.prefetch_batches or None)
        expect = (n_images // cfg.micro_batch) * cfg.micro_batch

        with rank_in_bundle() as rank:  # every CPU: removed before the passes that need free CPUs
            cold = timed(bundle_epoch, rank, storage, "bench", cfg, rmap)
            print(describe("ray tasks (training stream in a rank's bundle), cold pass", cold), flush=True)
            warm = timed(bundle_epoch, rank, storage, "bench", cfg, rmap)
        n, ray_rate = warm["images"], warm["rate"]
        windows = DegradedStream(storage, "bench", "train", cfg, rmap).plan.num_windows
        assert expect - cfg.micro_batch * windows <= n <= expect, (n, expect)  # partials per window dropped
        print(describe("ray tasks (training stream in a rank's bundle), warm pass", warm), flush=True)
        stream = DegradedStream(storage, "bench", "train", cfg, rmap)
        print(f"stream: {windows} windows of {stream.plan.window_size} row groups, {cfg.prefetch_windows} "
              f"window tasks at once, each holding up to {stream.read_ahead_batches} micro-batches unread")
        driver = timed(ray_epoch, storage, "bench", cfg, rmap)  # the same stream consumed by this driver
        print(describe("ray tasks (training stream consumed by the driver, no bundle), warm pass", driver),
              flush=True)
        ray_dataset_epoch(storage, "bench", cfg, rmap)  # warm
        dataset = timed(ray_dataset_epoch, storage, "bench", cfg, rmap)
        assert dataset["images"] == n, (dataset["images"], n)
        print(describe("ray data (one-pass Dataset of the same tasks), warm pass", dataset), flush=True)

        single_process_epoch(storage, "bench", cfg, rmap)  # warm page cache / imports, same as Ray's
        single = timed(single_process_epoch, storage, "bench", cfg, rmap)
        # the loop uses no Ray: idle Ray processes' CPU in this pass is not its cost (stricter bound)
        single["cpu_total_s"] = sum(v for k, v in single["cpu_s"].items() if not k.startswith("ray_"))
        single["cpu_ms_per_image"] = 1000 * single["cpu_total_s"] / max(single["images"], 1)
        single["cores_used"] = single["cpu_total_s"] / single["wall_s"]
        single_rate = single["rate"]
        print(describe("single process", single), flush=True)

        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(cores) as pool:
            plain_processes_epoch(pool, cores, storage, "bench", cfg, rmap)  # imports, page cache
            plain = timed(plain_processes_epoch, pool, cores, storage, "bench", cfg, rmap)
        print(describe(f"{cores} plain processes, no Ray (each the whole set)", plain), flush=True)

        ratio = ray_rate / single_rate
        plain_ratio = plain["rate"] / single_rate
        print(f"ceiling now: {cores} plain processes / single = {plain_ratio:.2f}x; "
              f"ray reaches {ray_rate / plain['rate']:.0%} of it, using "
              f"{warm['cpu_ms_per_image'] / plain['cpu_ms_per_image']:.2f}x their CPU per image")
        overhead = warm["cpu_ms_per_image"] / single["cpu_ms_per_image"]
        bound = cores / overhead
        not_workers = {k: v for k, v in warm["cpu_s"].items() if k != "ray_workers"}
        print(f"load average (1 min) now {os.getloadavg()[0]:.1f} on {cores} cores: other work on the "
              "machine caps the cores Ray can get, not the single process's one core")
        print(f"CPU per image: ray {warm['cpu_ms_per_image']:.2f} ms vs single "
              f"{single['cpu_ms_per_image']:.2f} ms = {overhead:.2f}x (Ray's CPU outside its workers: "
              f"{not_workers}); with {cores} idle cores and perfect overlap Ray would reach at most "
              f"{bound:.2f}x")
        # images per CPU-second of the whole stream (decode tasks, consumer, Ray, S3): independent of the
        # cores other work leaves this pass on a shared machine
        per_core = 1000 / warm["cpu_ms_per_image"]
        per_gpu = per_core * args.reader_cpus
        print(f"ratio ray / single process = {ratio:.2f}x on {cores} cores (goal >= 1.6x)")
        print(f"per-GPU rate with {args.reader_cpus:g} reader CPUs in each rank's bundle: 1000 / "
              f"{warm['cpu_ms_per_image']:.2f} CPU ms per image = {per_core:.0f} img/s per CPU x "
              f"{args.reader_cpus:g} = {per_gpu:.0f} img/s per GPU (needed: 65-80; {args.src_size} px "
              "synthetic JPEGs)")
        print("reproduce: .venv/bin/python benchmarks/data_throughput.py " + " ".join(sys.argv[1:]))
        print(json.dumps({"ray_vs_single_process": round(ratio, 3), "ray_images_per_s": round(ray_rate, 1),
                          "ray_cores_used": round(warm["cores_used"], 2),
                          "ray_cpu_ms_per_image": round(warm["cpu_ms_per_image"], 3),
                          "single_cpu_ms_per_image": round(single["cpu_ms_per_image"], 3),
                          "ray_cpu_s": warm["cpu_s"], "single_cpu_s": single["cpu_s"],
                          "ray_cpu_overhead": round(overhead, 3),
                          "plain_processes_vs_single": round(plain_ratio, 3),
                          "ray_vs_plain_processes": round(ray_rate / plain["rate"], 3),
                          "ray_dataset_vs_plain_processes": round(dataset["rate"] / plain["rate"], 3),
                          "driver_stream_vs_plain_processes": round(driver["rate"] / plain["rate"], 3),
                          "ray_dataset_cpu_ms_per_image": round(dataset["cpu_ms_per_image"], 3),
                          "ray_cpu_vs_plain": round(warm["cpu_ms_per_image"] / plain["cpu_ms_per_image"], 3),
                          "plain_cpu_ms_per_image": round(plain["cpu_ms_per_image"], 3),
                          "load_avg_1m_plain": round(plain["load_1m"], 2),
                          "ray_ratio_bound_idle_cores": round(bound, 3),
                          "load_avg_1m_ray": round(warm["load_1m"], 2),
                          "load_avg_1m_single": round(single["load_1m"], 2),
                          "window_groups": cfg.window_groups, "task_cpus": cfg.num_cpus,
                          "single_images_per_s": round(single_rate, 1),
                          "ingest_images_per_s": round(ingest_rate, 1),
                          "ray_cold_images_per_s": round(cold["rate"], 1), "cores": cores, "images": n_images,
                          "per_gpu_images_per_s": round(per_gpu, 1), "reader_cpus": args.reader_cpus,
                          "prefetch_batches": args.prefetch_batches or "window",
                          "load_avg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
