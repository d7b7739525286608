"""Generation engine: iteration-level ("continuous") batching of group-parallel DetailFlow sampling.

Usage:
    from detailflow.models.engine import GenerationEngine, Request
    engine = GenerationEngine(model, slots=64, device="cpu")     # slots = KV-cache rows of the pool
    handle = engine.submit(Request(class_id=3, cfg_scale=1.5, seed=7, tokens=0))   # thread-safe
    while not handle.done():
        finished = engine.step()          # ONE forward pass for every active request -> finished handles
    codes_t = handle.result()             # 1-D long, equal to sampling it alone:
    #   sample(model, torch.tensor([3]), cfg_scale=1.5, generator=torch.Generator().manual_seed(7))[0, :t]

    # serving (asyncio): a driver thread steps while there is work; awaiting never blocks the loop
    engine.start()
    handle = engine.submit(req, on_pass=lambda request_id, prefix_codes_t, t: ...)   # previews
    codes_t = await handle.wait()         # raises RequestCancelled / the pass's error
    handle.cancel()                       # frees its slots at once (after the pass in flight, if any)
    engine.stop()
    # GPU: bf16 weights, fixed shapes per pass, one CUDA graph per bucket of rows, CUDA generators:
    engine = GenerationEngine(model, slots=128, device="cuda", dtype=torch.bfloat16, mode="graph",
                              generator_device="cuda")

Scheduling: a fixed pool of `slots` KV-cache rows. A request takes one row, or an aligned pair of rows
(2k, 2k+1) when cfg_scale > 1 (its conditional row and a null-class row: guidance only costs where it
is asked for; a guided request waits, first-come first-served, until a pair is free). Each step():
(1) admits waiting requests while rows are free (eager: round the pool like a ring, so requests sit in
arrival order and a pass cuts into few attention runs; static: lowest rows first, so its bucket stays
small), (2) runs one forward pass in which every active request advances by its own next chunk of the
decode plan (sampler.decode_plan: one token in the causal phase, one group after; requests at different
positions share the pass: engine_plan.py lays it out, engine_pass.py runs it), (3) samples each
request's new tokens with its own settings (engine_sampling.py), (4) calls the hooks, and (5) returns
the requests that reached their token budget (`tokens`: a prefix length, 0 = all N; fewer tokens =
fewer passes), whose rows are free for the very next pass. A request submitted during a pass joins at
the next one. Requests and handles: engine_requests.py (re-exported here).

Randomness: each request owns a torch.Generator seeded with its seed (on `generator_device`) and draws,
every pass, the 1 x L x V uniforms that sampler.sample draws for a batch of one, so its codes equal those
of the same request sampled alone (up to float noise in the logits, which Gumbel-max turns into a
different token only at near-ties; tests/test_engine.py). Use generator_device="cuda" on a GPU to draw
on the device (then it matches sample with a CUDA generator); CPU generators cost host time per request.

Modes: "eager" packs the active rows' real tokens (no padding; shapes vary; CPU default); "static" uses
fixed shapes per bucket of rows (1, 2, 4, ..., slots; N+1 key columns), runnable anywhere; "graph" is
static plus one captured CUDA graph per (bucket, top-k/p on/off), replayed every pass (CUDA only;
compile_pass=True also torch.compiles the pass before capture). The engine puts the model in eval mode.

Threads: submit/cancel/properties may be called from any thread; step() from one driver at a time
(start() runs one). Hooks run on the driver thread after the pass: on_pass(request_id, prefix_codes_t,
t) with t = the prefix length so far (capped at the budget) and prefix_codes_t a 1-D CPU long tensor
that is only valid during the call (clone to keep). A hook that raises fails its request only.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

import numpy as np
import torch

from detailflow.models.ar import DetailFlowGPT
from detailflow.models.engine_pass import EagerRunner, StaticRunner
from detailflow.models.engine_plan import RowState, build_eager_plan, build_static_plan
from detailflow.models.engine_requests import (  # noqa: F401 - re-exported: the engine's public API
    CANCELLED,
    DONE,
    FAILED,
    RUNNING,
    WAITING,
    PassHook,
    Request,
    RequestCancelled,
    RequestHandle,
    fire,
    settle,
)
from detailflow.models.sampler import decode_plan, draw_uniforms


def check_request(cfg, plan_ends: tuple[int, ...], slots: int, request: Request) -> tuple[int, int]:
    """(tokens it will produce, forward passes until they are drawn), or ValueError naming the rule it
    breaks; plan_ends: the decode plan's group ends. Any engine front (this one, a process's) checks
    with it before taking the request."""
    if not 0 <= request.class_id <= cfg.num_classes:
        raise ValueError(f"class_id must be in [0, {cfg.num_classes}] ({cfg.num_classes} = null class)")
    if request.cfg_scale < 1.0 or request.temperature < 0 or not 0 <= request.top_k < 2**63:
        raise ValueError(f"need cfg_scale >= 1, temperature >= 0, 0 <= top_k < 2**63: {request}")
    if not 0.0 < request.top_p <= 1.0 or not 0 <= request.tokens <= cfg.num_tokens:
        raise ValueError(f"need 0 < top_p <= 1 and 0 <= tokens <= {cfg.num_tokens}: {request}")
    if GenerationEngine._rows_needed(request) > slots:
        raise ValueError(f"a guided request needs 2 slots; this engine has {slots}")
    tokens = request.tokens or cfg.num_tokens
    return tokens, bisect.bisect_left(plan_ends, tokens) + 1  # passes until `tokens` are drawn


class GenerationEngine:
    """Continuous-batching sampler over a fixed pool of KV-cache rows; see the module docstring."""

    def __init__(self, model: DetailFlowGPT, slots: int = 64, device=None, *, mode: str = "eager",
                 dtype: torch.dtype | None = None, generator_device=None, on_pass: PassHook | None = None,
                 compile_pass: bool = False, clock: Callable[[], float] = time.perf_counter):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if mode not in ("eager", "static", "graph"):
            raise ValueError(f"mode must be eager | static | graph, got {mode!r}")
        self.device = torch.device(device) if device is not None else model.tok_emb.weight.device
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.cfg, self.slots, self.mode, self.on_pass, self.clock = model.cfg, slots, mode, on_pass, clock
        self.generator_device = torch.device(generator_device or "cpu")
        if mode == "eager":
            self.runner = EagerRunner(self.model, slots, self.device)
        else:
            self.runner = StaticRunner(self.model, slots, self.device, capture=mode == "graph",
                                       compile_pass=compile_pass)
        plan = decode_plan(self.cfg.num_tokens, self.cfg.group_size, self.cfg.causal_num)
        self.plan_start_P = np.array([s for s, _ in plan], np.int64)
        self.plan_len_P = np.array([e - s for s, e in plan], np.int64)
        self.plan_ends = tuple(e for _, e in plan)  # submit's lookup in plain Python: it runs on the
        # server's event loop, where a numpy call drops the GIL and waits to get it back from the driver
        self.rows = RowState.empty(slots)
        self._free_R = np.ones(slots, bool)  # rows not owned by a request
        self._cursor = 0  # eager: next row of the ring allocation
        self._waiting: deque[RequestHandle] = deque()
        self._running: list[RequestHandle] = []
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._in_pass = False
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.passes = 0  # forward passes run so far
        self.tokens_run = 0  # real (unpadded) token positions run so far, null-class rows included
        self.last_error: BaseException | None = None  # the last error of a pass (background driver)

    # ---- submitting and cancelling (any thread) ------------------------------------------------------
    def submit(self, request: Request, on_pass: PassHook | None = None) -> RequestHandle:
        """Queue a request; it joins the next pass that has room. Returns its handle at once."""
        tokens, needed = check_request(self.cfg, self.plan_ends, self.slots, request)
        with self._cv:
            handle = RequestHandle(self._next_id, request, tokens, needed, on_pass, self,
                                   submitted_at=self.clock())
            self._next_id += 1
            self._waiting.append(handle)
            self._cv.notify_all()
        return handle

    def cancel(self, handle: RequestHandle) -> bool:
        """Cancel a waiting or running request; its slots are free at once (or right after the pass in
        flight). False if it had already settled."""
        with self._lock:
            if handle.status == WAITING:
                self._waiting.remove(handle)
            elif handle.status == RUNNING:
                if not self._in_pass:
                    self._release(handle)
            else:
                return False
            handle.status, handle.finished_at = CANCELLED, self.clock()
            callbacks = self._settle(handle)
        self._fire(handle, callbacks)
        return True

    @property
    def free_slots(self) -> int:
        return int(self._free_R.sum())

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not (self._running or self._waiting)

    # ---- driving (one thread) -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestHandle]:
        """Admit, run one forward pass for every active request, return those that finished in it."""
        with self._lock:
            self._admit()
            running = list(self._running)
            if not running:
                return []
            self._in_pass = True
        try:
            plan = self._run_pass(running)
        except BaseException as err:
            self.last_error = err
            self._fail(running, err)
            raise
        with self._lock:
            self._in_pass = False
            for h in running:
                if h.status == RUNNING:
                    h.passes_done += 1
                    self.rows.pass_R[list(h.rows)] += 1
                elif h.rows:  # cancelled during the pass
                    self._release(h)
        return self._after_pass([h for h in running if h.status == RUNNING], plan)

    def warmup(self, filters: tuple[bool, ...] = (False, True)) -> None:
        """static / graph: build and capture every bucket's pass now (else at first use, mid-serving);
        filters: the top-k/top-p variants to prepare (False = none truncates)."""
        if isinstance(self.runner, StaticRunner):
            with torch.no_grad():
                self.runner.warmup(filters)

    def run_until_idle(self, max_passes: int | None = None) -> list[RequestHandle]:
        """step() until nothing is waiting or running (or max_passes); the handles finished meanwhile."""
        finished, n = [], 0
        while not self.idle and (max_passes is None or n < max_passes):
            finished += self.step()
            n += 1
        return finished

    def generate(self, requests: Iterable[Request]) -> list[torch.Tensor]:
        """Submit, drive to completion, return each request's codes (in order)."""
        handles = [self.submit(r) for r in requests]
        self.run_until_idle()
        return [h.result(0) for h in handles]

    def start(self) -> None:
        """Drive the engine from a daemon thread that steps while there is work."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="generation-engine", daemon=True)
        self._thread.start()

    def stop(self, cancel: bool = True) -> None:
        """Stop the driver thread (after its pass); with cancel, cancel what is still queued/running."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if cancel:
            for h in list(self._waiting) + list(self._running):
                self.cancel(h)

    # ---- internals ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and self.idle:
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - its requests were failed; keep serving the others
                pass

    @staticmethod
    def _rows_needed(request: Request) -> int:
        return 2 if request.cfg_scale > 1.0 else 1

    def _admit(self) -> None:
        """FIFO admission while the head of the queue fits (caller holds the lock)."""
        while self._waiting:
            rows = self._allocate(self._rows_needed(self._waiting[0].request))
            if rows is None:
                return
            h = self._waiting.popleft()
            r = h.request
            st = self.rows
            for row, twin in zip(rows, rows[::-1], strict=True):  # (cond, null) <-> (null, cond)
                st.pass_R[row], st.twin_R[row], st.primary_R[row] = 0, twin, row == rows[0]
                st.scale_R[row], st.temperature_R[row] = r.cfg_scale, r.temperature
                st.top_k_R[row], st.top_p_R[row] = r.top_k, r.top_p
            classes = [r.class_id] + ([self.model.null_class] if len(rows) == 2 else [])
            self.runner.classes_S[list(rows)] = torch.tensor(classes, device=self.device)
            h.rows, h.status, h.started_at = rows, RUNNING, self.clock()
            h.generator = torch.Generator(device=self.generator_device).manual_seed(r.seed)
            self._running.append(h)

    def _allocate(self, n: int) -> tuple[int, ...] | None:
        """Rows for a request (caller holds the lock): one row, or an aligned pair (2k, 2k+1) for a
        guided one; None if there is none. Eager: a ring from the last allocation, so requests sit in
        the pool in arrival order and a pass cuts into few runs; static: lowest rows first, so the
        pass's bucket stays small."""
        free = self._free_R
        cand = np.flatnonzero(free) if n == 1 else 2 * np.flatnonzero(free[0:-1:2] & free[1::2])
        if self.mode == "eager" and len(cand):
            cand = np.concatenate([cand[cand >= self._cursor], cand[cand < self._cursor]])
        if not len(cand):
            return None
        rows = tuple(range(int(cand[0]), int(cand[0]) + n))
        free[list(rows)] = False
        self._cursor = (rows[-1] + 1) % self.slots
        return rows

    def _run_pass(self, running: list[RequestHandle]):
        c = self.cfg
        if self.mode == "eager":
            plan = build_eager_plan(self.rows, self.plan_start_P, self.plan_len_P, c.vocab_size)
        else:
            bucket = self.runner.bucket(int(np.flatnonzero(self.rows.pass_R >= 0)[-1]) + 1)
            plan = build_static_plan(self.rows, self.plan_start_P, self.plan_len_P, c.vocab_size,
                                     c.num_tokens, c.group_size, bucket)
        uniforms_QV = self.runner.uniforms(plan)
        for h in running:  # each request's own stream, exactly what sample() draws for a batch of one
            row = h.rows[0]
            lo, length = int(plan.q_offset_R[row]), int(plan.len_R[row])
            target = uniforms_QV[lo:lo + length]
            if self.generator_device == self.device:
                torch.rand((length, c.vocab_size), generator=h.generator, out=target)
            else:
                target.copy_(draw_uniforms(1, length, c.vocab_size, h.generator, self.generator_device)[0])
        self.runner.run(plan, uniforms_QV)
        self.passes += 1
        self.tokens_run += int(plan.len_R.sum())
        return plan

    def _after_pass(self, running: list[RequestHandle], plan) -> list[RequestHandle]:
        """Hooks, then settle the finished / failed ones (rows freed before the next pass)."""
        codes_SN = self.runner.codes_SN
        hooked = self.on_pass is not None or any(h.on_pass is not None for h in running)
        finishing = [h for h in running if h.passes_done >= h.passes_needed]
        if self.device.type != "cpu" and (hooked or finishing):
            codes_SN = codes_SN[:plan.rows].cpu()  # one copy for every hook / result of this pass
        failed = {}
        if hooked:
            for h in running:
                rows = h.rows
                if not rows:  # cancelled by another thread meanwhile
                    continue
                t = min(int(plan.stop_R[rows[0]]), h.tokens)
                for hook in (self.on_pass, h.on_pass):
                    if hook is not None and h.id not in failed and h.status == RUNNING:
                        try:
                            hook(h.id, codes_SN[rows[0], :t], t)
                        except Exception as err:  # noqa: BLE001 - fails this request only
                            failed[h.id] = err
        settled, finished = [], []
        with self._lock:
            for h in running:
                if h.status != RUNNING or (h.id not in failed and h.passes_done < h.passes_needed):
                    continue  # cancelled by a hook / another thread, or not there yet
                if h.id in failed:
                    h.status, h.error = FAILED, failed[h.id]
                else:
                    h.status, h.codes = DONE, codes_SN[h.rows[0], :h.tokens].clone().cpu()
                    finished.append(h)
                h.finished_at = self.clock()
                self._release(h)
                settled.append((h, self._settle(h)))
        for h, callbacks in settled:
            self._fire(h, callbacks)
        return finished

    def _fail(self, running: list[RequestHandle], err: BaseException) -> None:
        settled = []
        with self._lock:
            self._in_pass = False
            for h in running:
                if h.rows:
                    self._release(h)
                if h.status == RUNNING:
                    h.status, h.error, h.finished_at = FAILED, err, self.clock()
                    settled.append((h, self._settle(h)))
        for h, callbacks in settled:
            self._fire(h, callbacks)

    def _release(self, h: RequestHandle) -> None:
        """Free a request's rows (caller holds the lock)."""
        for row in h.rows:
            self.rows.free(row)
            self._free_R[row] = True
        h.rows = ()
        if h in self._running:
            self._running.remove(h)

    _settle, _fire = staticmethod(settle), staticmethod(fire)
