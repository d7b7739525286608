"""Requests and handles of the generation engine (engine.py re-exports everything here).

Usage:
    from detailflow.models.engine import GenerationEngine, Request, RequestCancelled
    handle = engine.submit(Request(class_id=3, cfg_scale=1.5, seed=7))
    handle.done(); handle.status; handle.result(timeout=5); await handle.wait(); handle.cancel()
    handle.add_done_callback(lambda h: ...)   # on the thread that settles it (the engine's driver)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

WAITING, RUNNING, DONE, CANCELLED, FAILED = "waiting", "running", "done", "cancelled", "failed"
PassHook = Callable[[int, torch.Tensor, int], None]  # (request_id, prefix_codes_t, t)


class RequestCancelled(Exception):
    """Raised by RequestHandle.result()/wait() of a cancelled request."""


@dataclass(frozen=True)
class Request:
    """One image to sample; the fields mean what they mean for sampler.sample."""
    class_id: int  # class label in [0, num_classes]; num_classes itself = the null class
    cfg_scale: float = 1.0  # classifier-free guidance scale; 1 = none, > 1 adds a null-class row
    temperature: float = 1.0  # softmax temperature; 0 = greedy (argmax)
    top_k: int = 0  # keep the k best codes; 0 = no truncation
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = no truncation
    seed: int = 0  # seed of this request's own torch.Generator
    tokens: int = 0  # prefix length to produce, 1..N; 0 = all N


@dataclass(eq=False)
class RequestHandle:
    """A submitted request: its state, its result, and ways to wait for it or cancel it."""
    id: int  # engine-assigned request id (submission order)
    request: Request  # what was asked
    tokens: int  # prefix length that will be produced (request.tokens, or N for 0)
    passes_needed: int  # forward passes until the budget is reached
    on_pass: PassHook | None  # this request's own per-pass hook (previews)
    engine: Any = field(repr=False)  # the GenerationEngine it was submitted to
    submitted_at: float = 0.0  # engine clock at submit
    started_at: float | None = None  # engine clock when it got its slots
    finished_at: float | None = None  # engine clock when it finished, failed or was cancelled
    status: str = WAITING  # waiting | running | done | cancelled | failed
    rows: tuple[int, ...] = ()  # cache rows while running: (conditional,) or (conditional, null class)
    passes_done: int = 0  # forward passes taken so far
    codes: torch.Tensor | None = None  # result: 1-D long (tokens,) on the CPU once done
    error: BaseException | None = None  # why it failed
    generator: torch.Generator | None = field(default=None, repr=False)  # its own random stream
    _event: threading.Event = field(default_factory=threading.Event, repr=False)  # set when settled
    _callbacks: list = field(default_factory=list, repr=False)  # fn(handle) run once settled

    def done(self) -> bool:
        """Finished, failed or cancelled."""
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> torch.Tensor:
        """The codes (blocks up to timeout); raises RequestCancelled or the request's error."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self.status == CANCELLED:
            raise RequestCancelled(f"request {self.id} was cancelled")
        if self.error is not None:
            raise self.error
        return self.codes

    def add_done_callback(self, fn: Callable[[RequestHandle], None]) -> None:
        """fn(handle) once settled (on the thread that settles it; at once if already settled)."""
        with self.engine._lock:
            if not self.done():
                self._callbacks.append(fn)
                return
        fn(self)

    async def wait(self) -> torch.Tensor:
        """Await the result from an asyncio loop; cancelling the awaiting task cancels the request."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        settle = lambda _: None if fut.done() else fut.set_result(None)
        self.add_done_callback(lambda h: loop.call_soon_threadsafe(settle, h))
        try:
            await fut
        except asyncio.CancelledError:
            self.cancel()
            raise
        return self.result(0)

    def cancel(self) -> bool:
        """See GenerationEngine.cancel."""
        return self.engine.cancel(self)


def settle(h: RequestHandle) -> list:
    """Mark h settled (its waiters wake) and hand back its callbacks, to run via fire() once the
    caller has let go of the engine's lock."""
    h._event.set()
    callbacks, h._callbacks = h._callbacks, []
    return callbacks


def fire(h: RequestHandle, callbacks: list) -> None:
    for fn in callbacks:
        fn(h)
