"""Generation engine (continuous batching) vs a static batcher under open-loop load, pure torch on CPU.

Usage:
    .venv/bin/python benchmarks/engine_load.py                  # default run: ~1-3 min on 2 busy cores
    .venv/bin/python benchmarks/engine_load.py --requests 256 --repeats 1 --load 0.5

Model: a tiny-but-realistic GPT with DetailFlow-16's sequence shape: N = 128, g = 8, causal 8 (23 passes),
4 layers, width 256, 4 heads, vocab 8192, 1000 classes, random weights (head std 0.2, so the logits
are not flat). Every request is one image, CFG 1.5, its own seed.

Static batcher (what `@serve.batch` does): when it is free and a request is queued it waits up to
--wait-s for more (or until --max-batch are queued), then samples the whole batch with sampler.sample;
everyone in the batch gets their image when the batch ends. The engine: GenerationEngine with
2 x max_batch slots (a guided request takes two rows, so both hold max_batch requests at once);
requests join at the next pass and leave at their last.

Measured in one run, --repeats times (medians / pooled):
  1. saturated images/s of each: an endless queue (static: full batches back to back; engine: a deep
     queue of the same images);
  2. right after, open-loop Poisson arrivals at --load (0.7) x that static saturated rate, the same
     arrival times for both: p50 / p95 latency (arrival -> codes), pooled over the repeats.
Clock: each system runs in its own thread on a virtual clock = that thread's CPU time (one torch
thread) + the idle gaps of the arrival process (an idle server waits for the next arrival or its wait
window without using the CPU): a discrete-event simulation whose costs are measured, not modelled. The
two systems advance in turns of one forward pass, whichever is behind in virtual time going next, so
the load of this shared machine (its load average is printed) falls on both alike; their ratios are
the robust figures. p95_engine_vs_static is the median over the repeats of each repeat's ratio (each
repeat is one controlled comparison; the machine's speed drifts between repeats, which pooling would
mix in: the pooled ratio is reported too). Last line: one JSON object. Goals (issue 13):
p95_engine_vs_static <= 0.6, throughput_engine_vs_static >= 0.95.

Measured (default command, this 2-vCPU shared machine, one torch thread; four runs within 20 minutes,
the first before a behaviour-preserving refactor of the pass code):
    load average  6-8  : p95 ratio 0.596 (per repeat 0.600, 0.591), throughput 1.008
    load average  3-10 : p95 ratio 0.738 (per repeat 0.705, 0.770), throughput 1.002
    load average 17-22 : p95 ratio 0.829 (per repeat 0.793, 0.865), throughput 0.974
    load average 12-16 : p95 ratio 0.779 (per repeat 0.612, 0.946), throughput 0.927 (one repeat's
                         saturated engine run 16% below static: timing noise under this contention)
The p95 goal is met only on the quietest run, the throughput goal on three of four. Why p95 is hard on a
CPU: a pass costs about a + b x positions with the linear part dominant (b x positions is ~70% of the
time at 70% load), so the engine's passes are processor-sharing: a request pays for everyone's positions
in each of its 23 passes (latency ~ 23a / (1 - rho)); the engine removes the static batcher's wait for
the batch in flight but not that. An offline queueing simulation (not shipped) with the measured a, b
gives ~0.60 at equal pass costs and +0.07 per 5% of extra engine cost; under heavy contention the per-
pass fixed cost a (weights streamed from memory every pass) grows, and the engine runs more, smaller
passes than the static batcher. On a GPU a pass is nearly flat in batch size, which is where the <= 0.6
target is natural (owed: no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections import deque

import numpy as np
import torch

from detailflow.models.ar import DetailFlowGPT
from detailflow.models.configs import ARConfig
from detailflow.models.engine import GenerationEngine, Request
from detailflow.models.sampler import sample


class Server(threading.Thread):
    """One system on its own virtual clock; hands control back to the driver after every pass."""

    def __init__(self, name: str, body):
        super().__init__(name=name, daemon=True)
        self.body, self.result, self.error = body, None, None
        self.turn, self.yielded = threading.Event(), threading.Event()
        self.offset, self.t0, self.finished = 0.0, 0.0, False

    def now(self) -> float:
        return time.thread_time() - self.t0 + self.offset

    def wait_until(self, t: float) -> None:
        self.offset += max(0.0, t - self.now())
        self.pause()

    def pause(self) -> None:
        self.yielded.set()
        self.turn.wait()
        self.turn.clear()

    def run(self) -> None:
        torch.set_num_threads(1)
        self.turn.wait()
        self.turn.clear()
        self.t0 = time.thread_time()
        try:
            self.result = self.body(self)
        except BaseException as err:  # noqa: BLE001 - reported by the driver
            self.error = err
        self.finished = True
        self.yielded.set()


def race(*servers: Server) -> list:
    """Run the servers in turns (the one furthest behind in virtual time next); their results."""
    for s in servers:
        s.start()
    while not all(s.finished for s in servers):
        s = min((s for s in servers if not s.finished), key=lambda s: s.now() if s.t0 else 0.0)
        s.turn.set()
        s.yielded.wait()
        s.yielded.clear()
    for s in servers:
        if s.error is not None:
            raise s.error
    return [s.result for s in servers]


def build_model() -> DetailFlowGPT:
    cfg = ARConfig(vocab_size=8192, num_classes=1000, num_tokens=128, group_size=8, causal_num=8,
                   dim=256, depth=4, heads=4)
    torch.manual_seed(0)
    model = DetailFlowGPT(cfg)
    torch.nn.init.normal_(model.head.weight, 0.0, 0.2)
    return model.eval()


def static_body(model, reqs, arrivals, max_batch: int, wait_s: float, cfg_scale: float):
    """The static batcher: latency of every request (arrivals relative to the start)."""
    def body(srv: Server):
        nxt, queue, lat = 0, deque(), [0.0] * len(reqs)
        while nxt < len(reqs) or queue:
            while nxt < len(reqs) and arrivals[nxt] <= srv.now():
                queue.append(nxt)
                nxt += 1
            if not queue:
                srv.wait_until(arrivals[nxt])
                continue
            deadline = srv.now() + wait_s  # wait for more, up to the window or a full batch
            while len(queue) < max_batch and nxt < len(reqs) and arrivals[nxt] <= deadline:
                srv.wait_until(arrivals[nxt])
                queue.append(nxt)
                nxt += 1
            if len(queue) < max_batch:
                srv.wait_until(deadline)
            batch = [queue.popleft() for _ in range(min(max_batch, len(queue)))]
            classes = torch.tensor([reqs[i].class_id for i in batch])
            gen = torch.Generator().manual_seed(reqs[batch[0]].seed)  # one stream per batch
            sample(model, classes, cfg_scale=cfg_scale, generator=gen, on_pass=lambda *a: srv.pause())
            for i in batch:
                lat[i] = srv.now() - arrivals[i]
        return lat
    return body


def engine_body(model, reqs, arrivals, slots: int):
    """The engine on the same arrivals: latency of every request."""
    def body(srv: Server):
        engine = GenerationEngine(model, slots=slots, clock=srv.now)
        nxt, lat, index, done = 0, [0.0] * len(reqs), {}, 0
        while done < len(reqs):
            while nxt < len(reqs) and arrivals[nxt] <= srv.now():
                index[engine.submit(reqs[nxt]).id] = nxt
                nxt += 1
            if engine.idle:
                srv.wait_until(arrivals[nxt])
                continue
            for h in engine.step():
                lat[index[h.id]] = srv.now() - arrivals[index[h.id]]
                done += 1
            srv.pause()
        return lat
    return body


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=96, help="requests per open-loop run")
    p.add_argument("--repeats", type=int, default=2, help="open-loop runs (arrival seeds seed, seed+1, ..)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--wait-s", type=float, default=0.05, help="static batcher's wait window")
    p.add_argument("--load", type=float, default=0.7, help="arrival rate / static saturated rate")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--saturated-batches", type=int, default=2, help="full batches per saturation run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_before, wall0 = os.getloadavg(), time.perf_counter()
    model = build_model()
    cfg, b = model.cfg, args.max_batch
    mk = lambda i: Request(i % cfg.num_classes, cfg_scale=args.cfg_scale, seed=args.seed + i)
    print(f"model: N={cfg.num_tokens} g={cfg.group_size} depth={cfg.depth} dim={cfg.dim} "
          f"vocab={cfg.vocab_size} passes={cfg.forward_passes}; max_batch={b} wait={args.wait_s}s "
          f"cfg={args.cfg_scale} load_avg_before={load_before}", flush=True)
    both = lambda reqs, arrivals, wait_s: race(
        Server("static", static_body(model, reqs, arrivals, b, wait_s, args.cfg_scale)),
        Server("engine", engine_body(model, reqs, arrivals, 2 * b)))
    both([mk(i) for i in range(4)], [0.0] * 4, 0.0)  # warm-up

    lat, sats, ratios, rates = {"static": [], "engine": []}, [], [], []
    for r in range(args.repeats):
        # 1. saturated: an endless queue for both, the same images (again before every open-loop run, so
        # the arrival rate follows this shared machine's speed of the moment)
        n_sat = args.saturated_batches * b
        sat_reqs = [mk(10_000 * (r + 1) + i) for i in range(n_sat)]
        done_s, done_e = both(sat_reqs, [0.0] * n_sat, 0.0)
        sats.append((n_sat / max(done_s), n_sat / max(done_e)))
        # 2. open loop: the same Poisson arrival times for both, at --load x the static saturated rate
        rate = args.load * sats[-1][0]
        rates.append(rate)
        rng = np.random.default_rng(args.seed + r)
        arrivals = np.cumsum(rng.exponential(1.0 / rate, args.requests)).tolist()
        reqs = [mk(100_000 * (r + 1) + i) for i in range(args.requests)]
        ls, le = both(reqs, arrivals, args.wait_s)
        lat["static"] += ls
        lat["engine"] += le
        ratios.append(round(pct(le, 95) / pct(ls, 95), 3))
        print(f"repeat {r}: saturated images/s static {sats[-1][0]:.2f} engine {sats[-1][1]:.2f}; open loop "
              f"at {rate:.2f}/s: static p50 {pct(ls, 50):.3f}s p95 {pct(ls, 95):.3f}s | engine p50 "
              f"{pct(le, 50):.3f}s p95 {pct(le, 95):.3f}s", flush=True)
    static_sat = statistics.median(x for x, _ in sats)
    engine_sat = statistics.median(y for _, y in sats)
    ls, le = lat["static"], lat["engine"]
    fig = lambda xs, sat_: {"saturated_images_per_s": round(sat_, 3), "p50_s": round(pct(xs, 50), 4),
                            "p95_s": round(pct(xs, 95), 4), "mean_s": round(statistics.mean(xs), 4)}
    res = {
        "p95_engine_vs_static": round(statistics.median(ratios), 3),
        "p95_engine_vs_static_pooled": round(pct(le, 95) / pct(ls, 95), 3),
        "throughput_engine_vs_static": round(engine_sat / static_sat, 3),
        "p50_engine_vs_static": round(pct(le, 50) / pct(ls, 50), 3),
        "p95_ratio_per_repeat": ratios,
        "saturated_per_repeat": [[round(x, 2), round(y, 2)] for x, y in sats],
        "static": fig(ls, static_sat), "engine": fig(le, engine_sat),
        "arrival_rate_per_s": [round(x, 3) for x in rates], "load": args.load,
        "requests_per_run": args.requests,
        "repeats": args.repeats, "max_batch": b, "engine_slots": 2 * b, "wait_s": args.wait_s,
        "cfg_scale": args.cfg_scale, "clock": "thread cpu time + virtual idle", "threads": 1,
        "wall_s": round(time.perf_counter() - wall0, 1),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }
    res["goals_met"] = {"p95": res["p95_engine_vs_static"] <= 0.6,
                        "throughput": res["throughput_engine_vs_static"] >= 0.95}
    print("reproduce: python benchmarks/engine_load.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
