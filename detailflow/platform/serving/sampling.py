"""One KV-cached group-parallel sampling run shared by several requests (the @serve.batch backend).

    job = BatchJob(ar, tokenizer, [SampleSpec([3, 3], cfg_scale=1.5, seed=7, tokens=16, previews=True),
                                   SampleSpec([1], cfg_scale=1.0, seed=9, tokens=4)])
    while not job.done:
        events = job.step()          # one forward pass over every live row; one entry per spec:
        ...                          # Preview | Final | None (nothing new for that request this pass)
    job.cancel(0)                    # the client went away: its rows leave the batch before the next pass

Requests may differ in everything: class ids, CFG scale (guided rows get an unconditional twin, unguided
rows run alone), temperature / top-k / top-p, seed and token budget `tokens` (= prefix length t). Each
request owns a torch.Generator seeded with its seed and draws its uniforms (k x L x V per pass) from it,
in the same order as detailflow.models.sampler.sample does for that request alone; the pyfunc stops at t
the same way. So a request's images do not depend on its batch-mates: served alone, batched, streamed,
or through the registered pyfunc, the same seed and model version give the same codes (up to the float
noise of differently shaped matmuls, which Gumbel-max turns into a different token only at near-ties).
A request leaves the batch at the pass that reaches its t (fewer tokens = fewer passes, faster), and
the KV cache shrinks with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from detailflow.models.generator import to_uint8
from detailflow.models.sampler import decode_plan, draw, draw_uniforms, step_logits


@dataclass
class SampleSpec:
    """What one request asks the sampler for (already validated against the model)."""

    class_ids: list[int]  # one entry per image
    cfg_scale: float = 1.5  # >= 1; 1 = no guidance
    temperature: float = 1.0  # 0 = argmax
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0  # seeds this request's own torch.Generator
    tokens: int = 0  # prefix length t to sample and decode; 0 = all N
    previews: bool = False  # emit a Preview after every pass (the prefix decoded at c(t))

    @property
    def num_images(self) -> int:
        return len(self.class_ids)


@dataclass
class Preview:
    t: int  # tokens known so far
    canvas: int  # c(t): side of the decoded preview
    step: int  # 1-based pass index
    steps: int  # passes this request needs in all
    images: object  # numpy uint8 k x 3 x c x c


@dataclass
class Final:
    t: int  # tokens decoded
    canvas: int  # side of the images
    steps: int  # passes it took
    images: object  # numpy uint8 k x 3 x c x c
    batch_requests: int = 1  # requests in the sampler call that produced it
    batch_images: int = 1  # images in that call
    sample_s: float = 0.0  # seconds from the job's start to this result
    info: dict = field(default_factory=dict)  # filled by the Generator (version, seed, replica)


@dataclass
class _Live:
    index: int  # position in the job's spec list
    spec: SampleSpec
    generator: torch.Generator
    tokens: int  # resolved t
    steps: int  # passes needed
    step: int = 0  # passes done


class BatchJob:
    """See the module docstring. Not thread-safe: one thread steps it."""

    def __init__(self, ar, tokenizer, specs: list[SampleSpec], simulated_pass_s: float = 0.0):
        self.ar, self.tokenizer, self.specs = ar, tokenizer, specs
        cfg = ar.cfg
        self.device = ar.tok_emb.weight.device
        self.simulated_pass_s = simulated_pass_s
        self.plan = decode_plan(cfg.num_tokens, cfg.group_size, cfg.causal_num)
        self.pass_index = 0
        self.passes_run = 0
        self.started = time.perf_counter()
        self.cancelled: set[int] = set()
        self.live: list[_Live] = []
        for i, spec in enumerate(specs):
            t = spec.tokens or cfg.num_tokens
            steps = next(k + 1 for k, (_, stop) in enumerate(self.plan) if stop >= t)
            self.live.append(_Live(i, spec, torch.Generator().manual_seed(int(spec.seed)), t, steps))
        self.batch_requests = len(specs)
        self.batch_images = sum(s.num_images for s in specs)
        self._build_rows()
        self.cache = ar.new_cache(self.classes.shape[0])

    @property
    def done(self) -> bool:
        return not self.live

    # ---- rows: [cond rows of every live request] + [uncond twins of the guided ones] ------------------
    def _build_rows(self, keep: torch.Tensor | None = None) -> None:
        null = self.ar.null_class
        cond = [c for lv in self.live for c in lv.spec.class_ids]
        self.batch = len(cond)
        offsets, guided_rows, scales, o = [], [], [], 0
        for lv in self.live:
            k = lv.spec.num_images
            offsets.append((o, o + k))
            if lv.spec.cfg_scale > 1.0:
                guided_rows += list(range(o, o + k))
                scales += [lv.spec.cfg_scale] * k
            o += k
        self.offsets = offsets
        self.guided = torch.tensor(guided_rows, dtype=torch.long, device=self.device)
        self.scales = torch.tensor(scales, dtype=torch.float32, device=self.device)[:, None, None]
        classes = cond + [null] * len(guided_rows)
        self.classes = torch.tensor(classes, dtype=torch.long, device=self.device)
        if keep is None:
            self.codes = torch.zeros(len(classes), self.ar.cfg.num_tokens, dtype=torch.long,
                                     device=self.device)
        else:
            self.codes = self.codes[keep]
            self.cache.k = [k[keep] for k in self.cache.k]
            self.cache.v = [v[keep] for v in self.cache.v]

    def _drop(self, leaving: set[int]) -> None:
        """Remove requests (spec indices) from the batch, with their rows of codes and KV cache."""
        old_offsets = dict(zip((lv.index for lv in self.live), self.offsets, strict=True))
        old_guided = {lv.index: lv.spec.cfg_scale > 1.0 for lv in self.live}
        keep_cond, keep_uncond, g = [], [], self.batch
        for lv in self.live:
            lo, hi = old_offsets[lv.index]
            if lv.index not in leaving:
                keep_cond += range(lo, hi)
            if old_guided[lv.index]:
                if lv.index not in leaving:
                    keep_uncond += range(g, g + hi - lo)
                g += hi - lo
        self.live = [lv for lv in self.live if lv.index not in leaving]
        if self.live:
            keep = torch.tensor(keep_cond + keep_uncond, dtype=torch.long, device=self.device)
            self._build_rows(keep)

    def cancel(self, index: int) -> None:
        """Spec `index` is no longer wanted: it leaves before the next pass (its slot is free)."""
        self.cancelled.add(index)

    # ---- one pass ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list:
        """Run the next forward pass for every live request; returns one event (or None) per spec."""
        events: list = [None] * len(self.specs)
        gone = {lv.index for lv in self.live if lv.index in self.cancelled}
        if gone:
            self._drop(gone)
        if self.done:
            return events
        start, stop = self.plan[self.pass_index]
        self.pass_index += 1
        self.passes_run += 1
        was_training = self.ar.training
        self.ar.eval()
        try:
            logits = step_logits(self.ar, self.codes, self.classes, start, stop, self.cache)
        finally:
            self.ar.train(was_training)
        cond = logits[:self.batch]
        if len(self.guided):
            uncond = logits[self.batch:]
            cond = cond.clone()
            cond[self.guided] = uncond + self.scales * (cond[self.guided] - uncond)
        vocab = self.ar.cfg.vocab_size
        new = []
        for lv, (lo, hi) in zip(self.live, self.offsets, strict=True):
            s = lv.spec
            u = draw_uniforms(hi - lo, stop - start, vocab, lv.generator, self.device)
            new.append(draw(cond[lo:hi], u, s.temperature, s.top_k, s.top_p))
        new = torch.cat(new)
        self.codes[:self.batch, start:stop] = new
        if len(self.guided):
            self.codes[self.batch:, start:stop] = new[self.guided]
        if self.simulated_pass_s:
            time.sleep(self.simulated_pass_s)
        finished = set()
        for lv, (lo, hi) in zip(self.live, self.offsets, strict=True):
            lv.step += 1
            if stop >= lv.tokens:
                images = self._decode(self.codes[lo:hi, :lv.tokens], lv.tokens)
                events[lv.index] = Final(lv.tokens, images.shape[-1], lv.steps, images, self.batch_requests,
                                         self.batch_images, time.perf_counter() - self.started)
                finished.add(lv.index)
            elif lv.spec.previews:
                images = self._decode(self.codes[lo:hi, :stop], stop)
                events[lv.index] = Preview(stop, images.shape[-1], lv.step, lv.steps, images)
        if finished:
            self._drop(finished)
        return events

    def _decode(self, codes_Bt: torch.Tensor, t: int):
        tok = self.tokenizer
        was_training = tok.training
        tok.eval()
        try:
            return to_uint8(tok.decode(codes_Bt, t)).cpu().numpy()
        finally:
            tok.train(was_training)

    def run(self) -> list:
        """Step to the end; the Final of every spec that was not cancelled (None for those)."""
        finals: list = [None] * len(self.specs)
        while not self.done:
            for i, ev in enumerate(self.step()):
                if isinstance(ev, Final):
                    finals[i] = ev
        return finals
