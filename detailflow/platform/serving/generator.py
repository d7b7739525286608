"""The Generator deployment: one model per replica, concurrent requests share one sampler call.

    gen = Generator.options(user_config={"model": "smoke"}).bind()      # app.build_app does this
    await handle.generate.remote(spec)          # -> Final (images + info) | Rejected (422 reasons)
    async for ev in handle.options(stream=True).stream.remote(spec): ...   # Preview..., Final

Model source: reconfigure(user_config) resolves `<model>-generator@<alias>` (or the pinned `version`)
in MLflow and builds that version's modules (model_store.py). A changed version is loaded in a thread
while requests keep being served by the old model; the swap is one reference assignment, and every
sampler call keeps the model it started with, so nothing in flight is dropped. The ChampionWatcher
(watcher.py) writes the alias' version into this user_config when the alias moves.

Batching (backend "batch"): `_run` is a @serve.batch async generator. Requests arriving within
batch_wait_timeout_s join one BatchJob (sampling.py) of up to max_batch_size images (batch_size_fn
counts images); it yields one event per request per forward pass. Requests with different CFG scales,
temperatures, top-k/p, seeds and token budgets share the call: each keeps its own settings and random
stream, and leaves at its own last pass. A request whose caller went away (client disconnect) is
marked cancelled and its rows leave the batch before the next pass. Backend "engine" hands the same
tickets to the continuous-batching engine instead (engine_backend.py); everything else is the same.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

from ray import serve

from detailflow.platform.serving.config import GENERATOR, GeneratorOptions
from detailflow.platform.serving.sampling import BatchJob, Final, Preview, SampleSpec

logger = logging.getLogger("ray.serve")


@dataclass
class Rejected:
    """The request breaks a model-dependent rule: the ingress answers 422 with these."""

    errors: list  # [(field, rule)]


@dataclass
class Ticket:
    """One request inside the replica."""

    spec: SampleSpec
    created: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # the caller went away
    finished: bool = False  # its Final was produced

    @property
    def num_images(self) -> int:
        return self.spec.num_images


def count_images(tickets: list[Ticket]) -> int:
    """@serve.batch's batch_size_fn: a batch's size is its number of images."""
    return sum(t.num_images for t in tickets)


@serve.deployment(name=GENERATOR, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32,
                  max_queued_requests=64, health_check_period_s=10, graceful_shutdown_timeout_s=30,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                                      "upscale_delay_s": 10, "downscale_delay_s": 60})
class Generator:
    def __init__(self):
        from detailflow.platform.settings import load_settings

        self.tracking_uri = load_settings().mlflow_tracking_uri
        self.opts: GeneratorOptions | None = None
        self.model = None  # model_store.ServedModel
        self.engine = None  # engine_backend.EngineBackend when backend == "engine"
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

    # ---- model source ----------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict) -> None:
        from detailflow.platform.serving.model_store import load_served_model, resolve_version

        opts = GeneratorOptions.from_dict(user_config)
        async with self._swap_lock:
            version = opts.version or await asyncio.to_thread(
                resolve_version, self.tracking_uri, opts.registered_model, opts.alias)
            cur = self.model
            same = (cur is not None and cur.registered_model == opts.registered_model
                    and cur.version == version and self.opts is not None
                    and (self.opts.device, self.opts.ar_dtype) == (opts.device, opts.ar_dtype))
            if opts.torch_threads:
                import torch

                torch.set_num_threads(opts.torch_threads)
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
                self.load_error = None
                self.model = new  # in-flight sampler calls keep the model object they started with
                self.versions_served.append(new.version)
                self.counters["swaps"] += 1 if cur is not None else 0
                logger.info("Generator %s: serving %s v%s (loaded in %.2f s)", self.replica,
                            new.registered_model, new.version, new.load_s)
            self._run.set_max_batch_size(opts.max_batch_size)
            self._run.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)
            if opts.backend == "engine":
                from detailflow.platform.serving.engine_backend import EngineBackend

                if self.engine is None or self.engine.model is not self.model:
                    old, self.engine = self.engine, EngineBackend(self.model, opts)
                    if old is not None:
                        old.retire()  # finishes what it holds, takes nothing new
            elif self.engine is not None:
                self.engine.retire()
                self.engine = None
            self.opts = opts

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("no model loaded")

    def info(self) -> dict:
        opts = self.opts
        return {**(self.model.info() if self.model else {}), "alias": opts.alias if opts else None,
                "pinned": bool(opts and opts.version), "backend": opts.backend if opts else None,
                "max_batch_size": opts.max_batch_size if opts else None,
                "max_images_per_request": opts.max_images_per_request if opts else None,
                "replica": self.replica, "load_error": self.load_error}

    def stats(self) -> dict:
        return {"replica": self.replica, "pid": os.getpid(), "ongoing": self.ongoing,
                "live_jobs": self.live_jobs, "version": self.model.version if self.model else None,
                "versions_served": self.versions_served,
                "batch_requests_hist": {str(k): v for k, v in sorted(self.batch_requests_hist.items())},
                **dict(self.counters)}

    # ---- requests --------------------------------------------------------------------------------
    def _check(self, spec: SampleSpec) -> Rejected | None:
        errors = []
        limit = self.opts.max_images_per_request
        if not 1 <= spec.num_images <= limit:
            errors.append(("num_images", f"len(class_ids) * num_images must be in [1, {limit}] "
                                         f"(got {spec.num_images})"))
        errors += self.model.check(spec.class_ids, spec.tokens)
        return Rejected(errors) if errors else None

    def _events(self, ticket: Ticket):
        """The backend switch: an async iterator of Preview / Final (None = nothing new) for a ticket."""
        if self.engine is not None:
            return self._engine_events(ticket)
        return self._run(ticket)

    async def _engine_events(self, ticket: Ticket):
        backend, started = self.engine, time.perf_counter()
        passes = backend.engine.passes
        async with contextlib.aclosing(backend.events(ticket)) as events:
            async for ev in events:
                if isinstance(ev, Final):
                    self._annotate(ev, ticket, backend.model, started)
                yield ev
        self.counters["passes"] += backend.engine.passes - passes  # shared passes: counted per request

    async def generate(self, spec: SampleSpec):
        """Final (numpy images + info) or Rejected."""
        if (rejected := self._check(spec)) is not None:
            return rejected
        spec.previews = False
        async with contextlib.aclosing(self._track(Ticket(spec))) as events:
            async for ev in events:
                if isinstance(ev, Final):
                    return ev
        raise RuntimeError("the sampler finished without producing this request's images")

    async def stream(self, spec: SampleSpec):
        """Yields Rejected once, or Preview after every pass and then the Final."""
        if (rejected := self._check(spec)) is not None:
            yield rejected
            return
        spec.previews = True
        async with contextlib.aclosing(self._track(Ticket(spec))) as events:
            async for ev in events:
                yield ev
                if isinstance(ev, Final):
                    return

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
                    yield ev
        finally:
            self.ongoing -= 1
            if not ticket.finished:  # the caller left (disconnect, timeout) or the sampler failed
                ticket.cancelled = True
                self.counters["cancelled"] += 1

    def _annotate(self, ev: Final, ticket: Ticket, model, started: float) -> Final:
        ev.info = {"model": model.registered_model, "model_version": model.version, "seed": ticket.spec.seed,
                   "tokens": ev.t, "canvas": ev.canvas, "replica": self.replica,
                   "batch": {"requests": ev.batch_requests, "images": ev.batch_images},
                   "queue_s": round(started - ticket.created, 4), "sample_s": round(ev.sample_s, 4)}
        return ev

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, batch_size_fn=count_images)
    async def _run(self, tickets: list[Ticket]):
        started = time.perf_counter()
        model, opts = self.model, self.opts  # this call keeps this model even if a swap happens now
        job = BatchJob(model.ar, model.tokenizer, [t.spec for t in tickets], opts.simulated_pass_s)
        self.counters["batches"] += 1
        self.batch_requests_hist[len(tickets)] += 1
        self.live_jobs += 1
        done = [False] * len(tickets)
        try:
            while not job.done:
                for i, t in enumerate(tickets):
                    if t.cancelled and not done[i]:
                        job.cancel(i)
                ran = job.passes_run
                events = await asyncio.to_thread(job.step)
                self.counters["passes"] += job.passes_run - ran
                out = []
                for i, ev in enumerate(events):
                    if done[i]:
                        out.append(StopIteration)
                        continue
                    if isinstance(ev, Final):
                        self._annotate(ev, tickets[i], model, started)
                        done[i] = True
                    elif ev is None and tickets[i].cancelled:
                        done[i] = True
                        self.counters["cancelled_rows"] += tickets[i].num_images
                        ev = StopIteration
                    out.append(ev)
                yield out
        finally:
            self.live_jobs -= 1


__all__ = ["Generator", "Rejected", "Ticket", "Final", "Preview", "SampleSpec"]
