"""Rank 0's console progress line of a training loop (Progress) and its duration format.

Usage:
    progress = Progress("tokenizer", run_name, total=cfg.steps, start=start, enabled=rank == 0,
                        tracker=tracker)          # the tracker's last checkpoint is shown
    progress.update(step + 1, images)            # prints every every_s seconds and at the last step
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from detailflow.platform.tracking import Tracker


class Progress:
    """Rank 0's console line every `every_s` seconds (and at the last step), e.g.

        [tokenizer tokenizer-tiny-2026-11-28-1a2b3c4d] step 120/1000 (12%) | loss 0.1432 | 245.1 img/s
        | ETA 3m36s | last ckpt step 100 s3://detailflow/runs/.../checkpoint_step00000100_...

    printed with flush so Ray forwards it to the driver's console (log_to_driver, on by default).
    Throughput is measured since the previous line; `loss` is the latest value handed in (the loops
    pass the mean over ranks on logging steps)."""

    def __init__(self, stage: str, run_name: str, *, total: int, start: int, unit: str = "img",
                 every_s: float = 10.0, enabled: bool = True, tracker: Tracker | None = None):
        self.label = f"[{stage} {run_name}]"
        self.total, self.unit, self.every_s, self.enabled = total, unit, every_s, enabled
        self.tracker = tracker
        self.loss: float | None = None
        self._t0 = self._last = time.perf_counter()
        self._step0 = self._last_step = start
        self._items = 0

    def update(self, step: int, items: int, loss: float | None = None) -> str | None:
        """After finishing `step` steps in total with `items` more samples (all ranks); prints when due."""
        if not self.enabled:
            return None
        self._items += items
        if loss is not None:
            self.loss = float(loss)
        now = time.perf_counter()
        if now - self._last < self.every_s and step < self.total:
            return None
        line = self.line(step, now)
        # not print(): inside a Ray Train worker print is patched to ALSO log the line to the console
        # whenever sys.stdout is wrapped (it is, there), so every progress line appeared twice
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        self._last, self._last_step, self._items = now, step, 0
        return line

    def line(self, step: int, now: float) -> str:
        rate = self._items / max(now - self._last, 1e-9)
        steps_per_s = (step - self._step0) / max(now - self._t0, 1e-9)
        eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("inf")
        parts = [f"{self.label} step {step}/{self.total} ({100 * step / max(1, self.total):.0f}%)"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        parts += [f"{rate:.1f} {self.unit}/s", f"ETA {format_duration(eta)}"]
        ckpt = self.tracker.last_checkpoint if self.tracker is not None else None
        parts.append(f"last ckpt step {ckpt[0]} {ckpt[1]}" if ckpt else "no checkpoint yet")
        return " | ".join(parts)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
