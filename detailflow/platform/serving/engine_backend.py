"""Backend "engine": the Generator's tickets on models.engine.GenerationEngine (continuous batching).

    backend = EngineBackend(served_model, opts)       # starts the engine's driver thread
    async for ev in backend.events(ticket): ...       # Preview after every pass (if asked), then Final
    backend.retire()                                  # after a model swap: finish what it holds, then stop

The @serve.batch backend runs one sampler call per batch; the engine instead admits a request into the
very next forward pass that has free KV-cache rows and frees its rows the pass it finishes, so a short
request never waits for a long one. An image is one engine request: a request for K images submits K
with seeds seed, seed + 1, ..., seed + K - 1 (the engine draws 1 x L x V uniforms per request per pass),
so under this backend image i of (seed s) is image 0 of (seed s + i); same seed + same version + same
backend = same images. A cancelled ticket (client gone) cancels its engine requests: their rows are free
for the next pass. Previews: the engine's per-pass hook hands over each prefix; once all K images of a
ticket have prefix t, the ticket gets a Preview of the K prefixes decoded at c(t).
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


class EngineBackend:
    def __init__(self, served, opts):
        from detailflow.models.engine import GenerationEngine

        self.model = served  # model_store.ServedModel (the Generator compares it to know when to rebuild)
        slots = opts.engine_slots or 2 * opts.max_batch_size
        self.engine = GenerationEngine(served.ar, slots=slots, device=served.device, mode=opts.engine_mode,
                                       generator_device="cuda" if served.device.startswith("cuda") else "cpu")
        self.engine.warmup()
        self.engine.start()
        plan = decode_plan(served.ar.cfg.num_tokens, served.ar.cfg.group_size, served.ar.cfg.causal_num)
        self.stops = [stop for _, stop in plan]

    def retire(self) -> None:
        """Take nothing new; stop the driver once the requests it holds are done (in the background)."""
        def drain():
            while not self.engine.idle:
                time.sleep(0.05)
            self.engine.stop()

        threading.Thread(target=drain, name="engine-retire", daemon=True).start()

    @torch.no_grad()
    def _decode(self, codes_Kt: torch.Tensor, t: int):
        tok = self.model.tokenizer  # eval mode since load; decoding does not change module state
        return to_uint8(tok.decode(codes_Kt.to(self.model.device), t)).cpu().numpy()

    async def events(self, ticket):
        from detailflow.models.engine import Request

        spec, loop = ticket.spec, asyncio.get_running_loop()
        k, t_final = spec.num_images, spec.tokens or self.model.num_tokens
        pending: collections.deque = collections.deque()  # (image index, t, prefix codes) from the hooks
        changed = asyncio.Event()
        started = time.perf_counter()

        def arrive(item) -> None:
            pending.append(item)
            changed.set()

        def hook_for(i: int):
            def hook(_request_id, codes_t, t):  # engine driver thread, before the request settles
                if spec.previews and t < t_final:
                    loop.call_soon_threadsafe(arrive, (i, t, codes_t.clone()))
            return hook

        requests = [Request(class_id=c, cfg_scale=spec.cfg_scale, temperature=spec.temperature,
                            top_k=spec.top_k, top_p=spec.top_p, seed=spec.seed + i, tokens=spec.tokens)
                    for i, c in enumerate(spec.class_ids)]
        handles = [self.engine.submit(r, on_pass=hook_for(i)) for i, r in enumerate(requests)]
        steps = handles[0].passes_needed
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
                        codes = torch.stack([got[j] for j in range(k)])
                        images = await asyncio.to_thread(self._decode, codes, t)
                        yield Preview(t, images.shape[-1], self.stops.index(t) + 1, steps, images)
                if results.done() and not pending:
                    codes = torch.stack(results.result())
                    images = await asyncio.to_thread(self._decode, codes, t_final)
                    active = self.engine.active + k
                    yield Final(t_final, images.shape[-1], steps, images, batch_requests=active,
                                batch_images=active, sample_s=time.perf_counter() - started)
                    return
        finally:
            for h in handles:
                h.cancel()  # no-op for the finished ones; frees the rows of a gone client's requests
            if not results.done():
                results.cancel()
