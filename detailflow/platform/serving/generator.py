"""The request path of a Generator replica: model, backend, admission in images, result cache.

    class Generator(GeneratorCore): ...            # app.py: the one Serve deployment (HTTP routes + this)
    ticket = core.admit(spec)                       # Ticket pinned to a model | Rejected; raises Overloaded
    final = await core.generate(spec, cacheable=True)   # Final (images + info) | Rejected
    async for ev in core.stream(spec): ...          # Rejected | Preview..., Final

Model source: reconfigure(user_config) resolves `<model>-generator@<alias>` (or the pinned `version`)
in MLflow and loads that version in a thread; for the engine backend it also builds and warms the new
engine (CUDA graphs captured) in a thread, then swaps model and engine in one step on the loop. A
request is validated against the model it is pinned to at admission and runs on exactly that model
(and engine); the old engine finishes what it holds, so nothing in flight is dropped. The
ChampionWatcher (watcher.py) writes the alias' version into this user_config when the alias moves.

Admission counts images: a request for K images is admitted while the replica holds fewer than
capacity_images (max_pending_images, default 2 x max_batch_size: what the KV-cache slots start within
about a pass cycle) and otherwise raises Overloaded (the route answers 503 + Retry-After at once).

Backends: "engine" (default) puts every image into models.engine.GenerationEngine (continuous batching:
requests join the next forward pass, engine_backend.py). "batch": `_run` is a @serve.batch async
generator; requests arriving within batch_wait_timeout_s join one BatchJob (sampling.py) of up to
max_batch_size images and leave at their own last pass. Either way a request whose caller went away
(client disconnect, deadline) is cancelled and its rows leave before the next pass.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from ray import serve

from detailflow.platform.serving.config import GeneratorOptions
from detailflow.platform.serving.sampling import BatchJob, Final, Preview, SampleSpec

logger = logging.getLogger("ray.serve")


@dataclass
class Rejected:
    """The request breaks a model-dependent rule: the ingress answers 422 with these."""

    errors: list  # [(field, rule)]


class Overloaded(Exception):
    """The replica is at capacity (in images) or has no model yet: 503 + Retry-After."""


@dataclass
class Ticket:
    """One request inside the replica, pinned to the model (and engine) it was validated against."""

    spec: SampleSpec
    model: object = None  # model_store.ServedModel it runs on
    engine: object = None  # engine_backend.EngineBackend it runs on (None: the batch backend)
    created: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # the caller went away
    finished: bool = False  # its Final was produced

    @property
    def num_images(self) -> int:
        return self.spec.num_images


def count_images(tickets: list[Ticket]) -> int:
    """@serve.batch's batch_size_fn: a batch's size is its number of images."""
    return sum(t.num_images for t in tickets)


PYTHON_SWITCH_INTERVAL_S = sys.getswitchinterval()  # at import: the interpreter's own (5 ms)


def apply_process_settings(opts: GeneratorOptions) -> None:
    """The replica process's knobs from its user_config: torch's intra-op threads (0 leaves them) and
    the GIL switch interval (0 restores the interpreter's, so a reconfigure can undo an A/B value)."""
    if opts.torch_threads:
        import torch

        torch.set_num_threads(opts.torch_threads)
    sys.setswitchinterval(opts.gil_switch_interval_ms / 1000 or PYTHON_SWITCH_INTERVAL_S)


class GeneratorCore:
    """The model, the backend and the request path of one replica (app.Generator adds the HTTP routes)."""

    def __init__(self):
        from detailflow.platform.settings import load_settings

        self.tracking_uri = load_settings().mlflow_tracking_uri
        self.opts: GeneratorOptions | None = None
        self.model = None  # model_store.ServedModel
        self.engine = None  # engine_backend.EngineBackend when backend == "engine" (built for self.model)
        self._swap_lock = asyncio.Lock()
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (never in production)
            self.replica = f"pid-{os.getpid()}"
        self.counters = collections.Counter()
        self.batch_requests_hist = collections.Counter()  # requests per sampler call -> calls
        self.versions_served: list[str] = []  # every version this replica has loaded, in order
        self.load_error: str | None = None  # why the last requested version could not be loaded
        self.ongoing = 0  # requests inside this replica
        self.live_jobs = 0  # sampler calls running
        self.pending_images = 0  # images admitted and not finished (the unit of admission)
        self.results = ResultCache(0)  # deterministic results (seeded requests), resized in reconfigure

    # ---- model source ----------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict) -> None:
        """Load the configured version (in a thread) and, for the engine backend, build + warm its engine
        (in a thread too), then swap model and engine in one step: nothing runs on the event loop while
        requests are served, and a request always runs on the model it was validated against."""
        from detailflow.platform.serving.model_store import load_served_model, resolve_version

        opts = GeneratorOptions.from_dict(user_config)
        async with self._swap_lock:
            version = opts.version or await asyncio.to_thread(
                resolve_version, self.tracking_uri, opts.registered_model, opts.alias)
            cur = new = self.model
            same = (cur is not None and cur.registered_model == opts.registered_model
                    and cur.version == version and self.opts is not None
                    and (self.opts.device, self.opts.ar_dtype) == (opts.device, opts.ar_dtype))
            apply_process_settings(opts)
            if not same:
                logger.info("Generator %s: loading %s v%s (was %s)", self.replica, opts.registered_model,
                            version, cur.version if cur else None)
                try:
                    new = await asyncio.to_thread(load_served_model, self.tracking_uri, opts.registered_model,
                                                  version, device=opts.device, ar_dtype=opts.ar_dtype)
                except Exception as exc:
                    if cur is None:
                        raise  # nothing to serve: the replica fails to start and Serve reports why
                    # keep serving the running version rather than failing the replica and its requests
                    self.load_error = f"v{version}: {type(exc).__name__}: {exc}"[:500]
                    logger.error("Generator %s: keeping v%s, cannot load %s", self.replica, cur.version,
                                 self.load_error)
                    return
            engine, old_engine = self.engine, None
            shape = lambda o: (o.engine_slots, o.engine_mode, o.max_batch_size, o.simulated_pass_s,
                               o.engine_process, o.torch_threads)  # what an engine is built with
            rebuild = self.opts is None or shape(opts) != shape(self.opts)
            if opts.backend == "engine" and (engine is None or engine.model is not new or rebuild):
                from detailflow.platform.serving.engine_backend import EngineBackend

                built = await asyncio.to_thread(EngineBackend, new, opts, self._engine_died)
                engine, old_engine = built, engine
            elif opts.backend != "engine":
                engine, old_engine = None, engine
            # the swap: one step on the loop, no await in between
            self.model, self.engine, self.opts = new, engine, opts
            self.results.resize(opts.cache_entries)
            self._run.set_max_batch_size(opts.max_batch_size)
            self._run.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)
            if old_engine is not None:
                old_engine.retire()  # finishes what it holds, takes nothing new
            if not same:
                self.load_error = None
                self.versions_served.append(new.version)
                self.counters["swaps"] += 1 if cur is not None else 0
                logger.info("Generator %s: serving %s v%s (loaded in %.2f s)", self.replica,
                            new.registered_model, new.version, new.load_s)

    def _engine_died(self, reason: str) -> None:
        """The current engine's process died unasked (its requests failed with a 500 naming their request
        id). A replica without its engine cannot serve: in Serve it ends its own process, so Serve
        replaces it and routes around it now, not after a health-check period of fast 503s."""
        if self.engine is None or self.engine.alive:  # a retired engine's (the current one serves on)
            logger.error("Generator %s: a retired engine died: %s", self.replica, reason)
            return
        logger.error("Generator %s: %s; this replica exits so Serve replaces it", self.replica, reason)
        self.end_replica()

    def end_replica(self) -> None:
        """End this replica's process (Serve replaces it); outside Serve (unit tests) do nothing: the
        health check and admission report the dead engine."""
        if not self.replica.startswith("pid-"):
            logging.shutdown()
            os._exit(1)

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("no model loaded")
        if self.engine is not None and not self.engine.alive:  # Serve replaces this replica
            raise RuntimeError(f"the engine is gone: {self.engine.dead_reason}")

    @property
    def capacity_images(self) -> int:
        """Images this replica admits at once (running + queued); beyond it: 503 + Retry-After."""
        o = self.opts
        return o.max_pending_images or 2 * o.max_batch_size

    def info(self) -> dict:
        opts = self.opts
        return {**(self.model.info() if self.model else {}), "alias": opts.alias if opts else None,
                "pinned": bool(opts and opts.version), "backend": opts.backend if opts else None,
                "max_batch_size": opts.max_batch_size if opts else None,
                "max_images_per_request": opts.max_images_per_request if opts else None,
                "capacity_images": self.capacity_images if opts else None,
                "replica": self.replica, "load_error": self.load_error}

    def stats(self) -> dict:
        engine = self.engine.stats() if self.engine is not None else None
        counters = dict(self.counters)
        if engine is not None:  # every forward pass this replica's current engine ran
            counters["passes"] = counters.get("passes", 0) + engine["passes"]
        return {"replica": self.replica, "pid": os.getpid(), "ongoing": self.ongoing,
                "live_jobs": self.live_jobs, "version": self.model.version if self.model else None,
                "versions_served": self.versions_served, "pending_images": self.pending_images,
                "capacity_images": self.capacity_images if self.opts else None, "engine": engine,
                "batch_requests_hist": {str(k): v for k, v in sorted(self.batch_requests_hist.items())},
                **counters}

    def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metric (see autoscale.py): images admitted and not finished."""
        return {"pending_images": float(self.pending_images)}

    # ---- requests --------------------------------------------------------------------------------
    def _check(self, spec: SampleSpec, model) -> Rejected | None:
        errors = []
        limit = self.opts.max_images_per_request
        if not 1 <= spec.num_images <= limit:
            errors.append(("num_images", f"len(class_ids) * num_images must be in [1, {limit}] "
                                         f"(got {spec.num_images})"))
        errors += model.check(spec.class_ids, spec.tokens)
        return Rejected(errors) if errors else None

    def admit(self, spec: SampleSpec) -> Ticket | Rejected:
        """Pin the model (and engine) this request will run on, validate it against that model, and count
        its images in; Overloaded when they would take the replica past capacity_images."""
        model, engine = self.model, self.engine  # read together: reconfigure swaps both in one step
        if model is None:
            raise Overloaded("no model loaded yet")
        if engine is not None and not engine.alive:  # the moment before this replica ends (_engine_died)
            raise Overloaded("this replica's engine is gone; it is being replaced, retry")
        if (rejected := self._check(spec, model)) is not None:
            return rejected
        if self.pending_images and self.pending_images + spec.num_images > self.capacity_images:
            self.counters["overloaded"] += 1
            raise Overloaded(f"this replica holds {self.pending_images} images "
                             f"(capacity {self.capacity_images}), retry later")
        self.pending_images += spec.num_images
        return Ticket(spec, model=model, engine=engine)

    def cache_key(self, spec: SampleSpec, model) -> tuple:
        backend = "engine" if self.engine is not None else "batch"  # image i's seed differs per backend
        return (model.registered_model, model.version, backend, tuple(spec.class_ids), spec.seed,
                spec.cfg_scale, spec.temperature, spec.top_k, spec.top_p, spec.tokens or model.num_tokens)

    async def generate(self, spec: SampleSpec, cacheable: bool = False):
        """Final (numpy images + info) or Rejected; raises Overloaded. cacheable: the client chose the
        seed, so the result is a pure function of (model version, backend, classes, seed, params)."""
        key = self.cache_key(spec, self.model) if cacheable and self.model is not None else None
        if key is not None and (hit := self.results.get(key)) is not None:
            self.counters["cache_hits"] += 1
            return dataclasses.replace(hit, info={**hit.info, "cached": True})
        spec.previews = False
        ticket = self.admit(spec)
        if isinstance(ticket, Rejected):
            return ticket
        async with contextlib.aclosing(self._track(ticket)) as events:
            async for ev in events:
                if isinstance(ev, Final):
                    if key is not None and key == self.cache_key(spec, ticket.model):
                        self.results.put(key, ev)
                    return ev
        raise RuntimeError("the sampler finished without producing this request's images")

    async def stream(self, spec: SampleSpec):
        """Yields Rejected once, or Preview after every pass and then the Final; raises Overloaded."""
        spec.previews = True
        ticket = self.admit(spec)
        if isinstance(ticket, Rejected):
            yield ticket
            return
        async with contextlib.aclosing(self._track(ticket)) as events:
            async for ev in events:
                yield ev
                if isinstance(ev, Final):
                    return

    async def _events(self, ticket: Ticket):
        """The backend switch: Preview / Final (None = nothing new) for a ticket, on its pinned backend."""
        if ticket.engine is not None:
            backend, started = ticket.engine, time.perf_counter()
            async with contextlib.aclosing(backend.events(ticket)) as events:
                async for ev in events:
                    if isinstance(ev, Final):
                        self._annotate(ev, ticket, started)
                    yield ev
            return
        async for ev in self._run(ticket):
            yield ev

    async def _track(self, ticket: Ticket):
        self.ongoing += 1
        self.counters["requests"] += 1
        try:
            async with contextlib.aclosing(self._events(ticket)) as events:
                async for ev in events:
                    if ev is None:
                        continue
                    if isinstance(ev, Final):
                        ticket.finished = True
                        self.counters["images"] += ticket.num_images
                    yield ev
        finally:
            self.ongoing -= 1
            self.pending_images -= ticket.num_images
            if not ticket.finished:  # the caller left (disconnect, timeout) or the sampler failed
                ticket.cancelled = True
                self.counters["cancelled"] += 1

    def _annotate(self, ev: Final, ticket: Ticket, started: float) -> Final:
        model = ticket.model
        batch = {"requests": ev.batch_requests, "images": ev.batch_images}
        if "passes" in ev.info:
            batch["passes"] = ev.info["passes"]  # engine pass counter when it was submitted / finished
        ev.info = {"model": model.registered_model, "model_version": model.version, "seed": ticket.spec.seed,
                   "tokens": ev.t, "canvas": ev.canvas, "replica": self.replica, "batch": batch,
                   "queue_s": round(started - ticket.created, 4), "sample_s": round(ev.sample_s, 4)}
        return ev

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, batch_size_fn=count_images)
    async def _run(self, tickets: list[Ticket]):
        """One BatchJob per model the tickets were validated against (two only across a swap)."""
        started = time.perf_counter()
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(tickets):
            groups.setdefault(id(t.model), []).append(i)
        sim = self.opts.simulated_pass_s
        jobs = [(BatchJob(tickets[idx[0]].model.ar, tickets[idx[0]].model.tokenizer,
                          [tickets[i].spec for i in idx], sim), idx) for idx in groups.values()]
        self.counters["batches"] += 1
        self.batch_requests_hist[len(tickets)] += 1
        self.live_jobs += 1
        done = [False] * len(tickets)
        try:
            while not all(job.done for job, _ in jobs):
                for job, idx in jobs:
                    for j, i in enumerate(idx):
                        if tickets[i].cancelled and not done[i]:
                            job.cancel(j)
                ran = sum(job.passes_run for job, _ in jobs)
                stepped = await asyncio.to_thread(lambda: [job.step() if not job.done else [None] * len(idx)
                                                          for job, idx in jobs])
                self.counters["passes"] += sum(job.passes_run for job, _ in jobs) - ran
                out: list = [None] * len(tickets)
                for (_, idx), events in zip(jobs, stepped, strict=True):
                    for j, i in enumerate(idx):
                        out[i] = events[j]
                for i, ev in enumerate(out):
                    if done[i]:
                        out[i] = StopIteration
                    elif isinstance(ev, Final):
                        self._annotate(ev, tickets[i], started)
                        done[i] = True
                    elif ev is None and tickets[i].cancelled:
                        done[i] = True
                        self.counters["cancelled_rows"] += tickets[i].num_images
                        out[i] = StopIteration
                yield out
        finally:
            self.live_jobs -= 1


class ResultCache:
    """LRU of Finals by cache key (model version, backend, classes, seed, params); 0 entries = off."""

    def __init__(self, entries: int):
        self.entries, self.data = entries, collections.OrderedDict()

    def resize(self, entries: int) -> None:
        self.entries = entries
        while len(self.data) > entries:
            self.data.popitem(last=False)

    def get(self, key):
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        return None

    def put(self, key, value) -> None:
        if self.entries:
            self.data[key] = value
            self.data.move_to_end(key)
            self.resize(self.entries)


__all__ = ["GeneratorCore", "Overloaded", "Rejected", "Ticket", "Final", "Preview", "SampleSpec"]
