"""Backend "engine": the replica's tickets on models.engine.GenerationEngine (continuous batching).

    backend = await asyncio.to_thread(EngineBackend, served_model, opts)   # built + warmed off the loop
    async for ev in backend.events(ticket): ...       # Preview after every pass (if asked), then Final
    backend.retire()                                  # after a model swap: finish what it holds, then stop

The engine runs in a child process of the replica (engine_process.py, user_config engine_process: the
HTTP work never holds the GIL the engine's passes need; false = a thread here). It admits a request into
the very next forward pass that has free KV-cache rows and frees its
rows the pass it finishes, so a short request never waits for a long one. An image is one engine
request: a request for K images submits K with seeds seed, seed + 1, ..., seed + K - 1 (the engine draws
1 x L x V uniforms per request per pass, on the model's device when it is a GPU), so image i of (seed s)
is image 0 of (seed s + i). A cancelled ticket (client gone) cancels its engine requests.
Host syncs: a request gets a per-pass hook (a device -> host copy of the prefix) only when it asked for
previews; otherwise the engine copies codes once, at the pass that finishes it.
Decoding is batched: finished rows of every request that completes while a decode is running wait for
it and then go through the tokenizer together, one decode call per prefix length (BatchDecoder).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import torch

from detailflow.models.generator import to_uint8
from detailflow.models.sampler import decode_plan
from detailflow.platform.serving.sampling import Final, Preview


class BatchDecoder:
    """Awaitable decode(codes_Kt, t) -> uint8 K x 3 x c x c that merges concurrent calls: whatever is
    queued while a decode runs goes into the next one (one tokenizer call per distinct t)."""

    def __init__(self, decode_fn):
        self.decode_fn = decode_fn  # (codes_Bt long, t) -> numpy uint8 B x 3 x c x c (runs in a thread)
        self.pending: list = []  # (codes_Kt, t, future)
        self.task: asyncio.Task | None = None
        self.calls = 0  # tokenizer decode calls made
        self.rows = 0  # images decoded in them

    async def __call__(self, codes_Kt: torch.Tensor, t: int):
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((codes_Kt, t, fut))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            groups: dict[int, list] = collections.defaultdict(list)
            for item in batch:
                groups[item[1]].append(item)
            for t, items in groups.items():
                codes = torch.cat([c for c, _, _ in items])
                try:
                    images = await asyncio.to_thread(self.decode_fn, codes, t)
                except Exception as exc:  # noqa: BLE001 - every waiter of this call gets the error
                    for _, _, f in items:
                        if not f.done():
                            f.set_exception(exc)
                    continue
                self.calls, self.rows, o = self.calls + 1, self.rows + len(codes), 0
                for c, _, f in items:
                    if not f.done():
                        f.set_result(images[o:o + len(c)])
                    o += len(c)


class EngineBackend:
    def __init__(self, served, opts, on_death=None):
        """Builds the engine and warms it (static / graph: every bucket captured): call it in a thread.
        on_death(reason): the engine process died unasked (its requests have failed)."""
        from detailflow.models.engine import GenerationEngine
        from detailflow.platform.serving.engine_process import EngineProcess

        self.model = served  # model_store.ServedModel: the one every request of this backend runs on
        slots = opts.engine_slots or 2 * opts.max_batch_size
        gen_device = "cuda" if served.device.startswith("cuda") else "cpu"
        if opts.engine_process:  # its own process: warmed there, driven there (engine_process.py)
            self.engine = EngineProcess(served.ar, slots, mode=opts.engine_mode, device=served.device,
                                        generator_device=gen_device, torch_threads=opts.torch_threads,
                                        simulated_pass_s=opts.simulated_pass_s, on_death=on_death)
        else:
            self.engine = GenerationEngine(served.ar, slots=slots, device=served.device,
                                           mode=opts.engine_mode, generator_device=gen_device)
            self.engine.warmup()
            if opts.simulated_pass_s:  # tests / load experiments: a big model's pass time on a CPU box
                run, pause = self.engine.runner.run, opts.simulated_pass_s

                def slow_run(*args, **kwargs):
                    out = run(*args, **kwargs)
                    time.sleep(pause)
                    return out

                self.engine.runner.run = slow_run
            self.engine.start()
        plan = decode_plan(served.ar.cfg.num_tokens, served.ar.cfg.group_size, served.ar.cfg.causal_num)
        self.stops = [stop for _, stop in plan]
        self.decoder = BatchDecoder(self._decode)
        self.row_passes = 0  # sum over finished images of the passes they took (images per pass =
        # row_passes / passes over a window where everything finished)

    @property
    def slots(self) -> int:
        return self.engine.slots

    @property
    def alive(self) -> bool:
        """False once an engine process has died (its requests failed; the replica is unhealthy)."""
        return getattr(self.engine, "alive", True)

    @property
    def dead_reason(self) -> str | None:
        return getattr(self.engine, "dead_reason", None)

    def retire(self) -> None:
        """Take nothing new; stop the driver once the requests it holds are done (in the background)."""
        def drain():
            while not self.engine.idle:
                time.sleep(0.05)
            self.engine.stop()

        threading.Thread(target=drain, name="engine-retire", daemon=True).start()

    def stats(self) -> dict:
        e = self.engine
        return {"passes": e.passes, "active": e.active, "waiting": e.waiting, "slots": e.slots,
                "free_slots": e.free_slots, "row_passes": self.row_passes, "decode_calls": self.decoder.calls,
                "decoded_images": self.decoder.rows,
                "engine_pid": getattr(self.engine, "pid", None)}

    @torch.no_grad()
    def _decode(self, codes_Kt: torch.Tensor, t: int):
        tok = self.model.tokenizer  # eval mode since load; decoding does not change module state
        return to_uint8(tok.decode(codes_Kt.to(self.model.device), t)).cpu().numpy()

    async def _final(self, codes, k: int, steps: int, t_final: int, started: float, first_pass: int) -> Final:
        last_pass = self.engine.passes
        self.row_passes += k * steps
        images = await self.decoder(codes, t_final)
        active = self.engine.active + k
        return Final(t_final, images.shape[-1], steps, images, batch_requests=active, batch_images=active,
                     sample_s=time.perf_counter() - started, info={"passes": [first_pass, last_pass]})

    async def events(self, ticket):
        from detailflow.models.engine import Request

        spec, loop = ticket.spec, asyncio.get_running_loop()
        k, t_final = spec.num_images, spec.tokens or self.model.num_tokens
        pending: collections.deque = collections.deque()  # (image index, t, prefix codes) from the hooks
        changed = asyncio.Event()
        started, first_pass = time.perf_counter(), self.engine.passes

        def arrive(item) -> None:
            pending.append(item)
            changed.set()

        def hook_for(i: int):
            def hook(_request_id, codes_t, t):  # engine driver thread, before the request settles
                if t < t_final:
                    loop.call_soon_threadsafe(arrive, (i, t, codes_t.clone()))
            return hook

        requests = [Request(class_id=c, cfg_scale=spec.cfg_scale, temperature=spec.temperature,
                            top_k=spec.top_k, top_p=spec.top_p, seed=spec.seed + i, tokens=spec.tokens)
                    for i, c in enumerate(spec.class_ids)]
        handles = [self.engine.submit(r, on_pass=hook_for(i) if spec.previews else None)
                   for i, r in enumerate(requests)]
        steps = handles[0].passes_needed
        if not spec.previews:  # the plain request: await the codes, decode once (no gather, no events)
            try:
                codes = torch.stack([await h.wait() for h in handles])
                yield await self._final(codes, k, steps, t_final, started, first_pass)
                return
            finally:
                for h in handles:
                    h.cancel()  # no-op for the finished ones; frees the rows of a gone client's requests
        # the settle callbacks are queued on this loop after every hook callback of their request, so once
        # `results` is done and `pending` is empty, no preview is still on its way
        results = asyncio.ensure_future(asyncio.gather(*(h.wait() for h in handles)))
        results.add_done_callback(lambda _: changed.set())
        partial: dict[int, dict[int, torch.Tensor]] = {}
        try:
            while True:
                await changed.wait()
                changed.clear()
                while pending:
                    i, t, codes = pending.popleft()
                    partial.setdefault(t, {})[i] = codes
                    if len(partial[t]) == k:
                        got = partial.pop(t)
                        images = await self.decoder(torch.stack([got[j] for j in range(k)]), t)
                        yield Preview(t, images.shape[-1], self.stops.index(t) + 1, steps, images)
                if results.done() and not pending:
                    yield await self._final(torch.stack(results.result()), k, steps, t_final, started,
                                            first_pass)
                    return
        finally:
            for h in handles:
                h.cancel()  # no-op for the finished ones; frees the rows of a gone client's requests
            if not results.done():
                results.cancel()
