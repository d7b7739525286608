"""The generation engine in a process of its own, so the replica's event loop never takes its GIL.

    engine = EngineProcess(ar, slots=32, mode="eager", torch_threads=1)  # spawns the child, waits until warm
    handle = engine.submit(Request(class_id=3, cfg_scale=1.5, seed=7), on_pass=hook)  # GenerationEngine's API
    codes = await handle.wait(); handle.cancel()
    engine.passes, engine.active, engine.waiting, engine.free_slots, engine.idle, engine.pid
    engine.stop()                                   # the child exits; what it held fails (EngineProcessDied)

Why a process: a thread that drives a small model's forward passes lets go of the GIL in every torch op
and must win it back for the Python in between. Any other Python in the same process (the HTTP front:
parsing, routing, responses) takes it meanwhile. Measured on this 2-vCPU box with the tiny model:
BatchJob's images/s fell from ~200 to 89 with a thread of the same process busy 3 ms in every 7, and did
not move with the same load in another process (`benchmarks/serve_throughput.py --user-config
engine_process=false` is the in-replica thread, for A/B). vLLM splits its API server from its engine
core for the same reason. The child runs the engine only; the replica keeps the tokenizer and decodes
(engine_backend.BatchDecoder), so decoding and the HTTP work overlap the passes on another core.

Protocol: a socket pair speaking multiprocessing.connection (pickled tuples).
    parent -> child   ("submit", id, Request, previews) | ("cancel", id) | ("stop",)
    child -> parent   ("ready", pid) | ("pass", id, t, codes) | ("done", id, codes) |
                      ("failed", id, text) | ("cancelled", id) | ("fatal", text)
The child writes its counters (passes, active, waiting, free slots) into a shared page after
every pass, so reading them costs the replica no message. Weights go through a private folder
(safetensors, removed once the child has loaded them). The child exits when its socket closes (the replica
stopped or was killed); the replica fails what the child held when the child's socket closes
(EngineProcessDied) and calls on_death: the Generator then ends its replica, so Serve replaces it at
once (as vLLM's API server shuts down when its engine core dies) rather than a replica with no engine
answering 503s until its next health check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection

import numpy as np
import torch

from detailflow.models.engine import (
    CANCELLED,
    DONE,
    FAILED,
    Request,
    RequestHandle,
    check_request,
    fire,
    settle,
)
from detailflow.models.sampler import decode_plan

COUNTERS = ("passes", "active", "waiting", "free_slots")  # int64 each, in the shared page
READY_TIMEOUT_S = 600.0  # spawn + import + load + warm-up (CUDA graph capture of every bucket)


class EngineProcessDied(RuntimeError):
    """The engine's process exited or broke its connection; the requests it held failed with this."""


def _scratch_dir() -> str:
    shm = "/dev/shm"  # memory-backed where it exists: the weights cross without touching a disk
    return tempfile.mkdtemp(prefix="df-engine-", dir=shm if os.access(shm, os.W_OK) else None)


class EngineProcess:
    """A GenerationEngine in a child process, behind GenerationEngine's submit / cancel / counters API."""

    def __init__(self, model, slots: int, *, mode: str = "eager", device: str = "cpu",
                 generator_device: str = "cpu", torch_threads: int = 0, simulated_pass_s: float = 0.0,
                 on_death=None):
        """on_death(reason): called (reader thread) when the child dies unasked, after what it held
        failed; not after stop()."""
        from detailflow.models.export import save_pretrained

        self.cfg, self.slots, self.device = model.cfg, slots, device
        self.plan_ends = tuple(e for _, e in decode_plan(self.cfg.num_tokens, self.cfg.group_size,
                                                         self.cfg.causal_num))
        self._lock = threading.Lock()  # RequestHandle's callbacks and cancel() use engine._lock
        self._send_lock = threading.Lock()
        self._handles: dict[int, RequestHandle] = {}  # submitted, not settled
        self._next_id = 0
        self.dead_reason: str | None = None  # why the child is gone (then submit refuses)
        self.on_death, self._stopping = on_death, False
        folder = _scratch_dir()
        try:
            save_pretrained(model, {"kind": "ar", "ar": dataclasses.asdict(model.cfg)}, f"{folder}/ar")
            with open(f"{folder}/counters", "wb") as f:
                f.write(bytes(mmap.PAGESIZE))
            with open(f"{folder}/counters", "r+b") as f:
                self._page = mmap.mmap(f.fileno(), mmap.PAGESIZE)
            self._counters = np.frombuffer(self._page, np.int64, len(COUNTERS))
            spec = {"slots": slots, "mode": mode, "device": device, "generator_device": generator_device,
                    "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                    "torch_threads": torch_threads, "simulated_pass_s": simulated_pass_s}
            with open(f"{folder}/spec.json", "w") as f:
                json.dump(spec, f)
            ours, theirs = socket.socketpair()
            self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno()), folder],
                                         pass_fds=(theirs.fileno(),))
            theirs.close()
            self._conn = Connection(ours.detach())
            try:
                self._await_ready()
            except BaseException:
                self._conn.close()
                raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the child has mapped the counters and loaded
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)
        self._reader.start()

    def _await_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._conn.poll(0.2):
            if self.proc.poll() is not None:
                raise EngineProcessDied(f"the engine process exited with code {self.proc.returncode} "
                                        "before it was ready (its error is in this replica's log)")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise EngineProcessDied(f"the engine process was not ready after {READY_TIMEOUT_S:.0f} s")
        try:
            msg = self._conn.recv()
        except EOFError:
            msg = ("fatal", f"exited with code {self.proc.wait()}")
        if msg[0] != "ready":
            self.proc.wait()
            raise EngineProcessDied(f"the engine process failed to start: {msg[1]}")

    # ---- GenerationEngine's API ---------------------------------------------------------------------
    def submit(self, request: Request, on_pass=None) -> RequestHandle:
        tokens, needed = check_request(self.cfg, self.plan_ends, self.slots, request)
        with self._lock:
            if self.dead_reason is not None:
                raise EngineProcessDied(self.dead_reason)
            handle = RequestHandle(self._next_id, request, tokens, needed, on_pass, self,
                                   submitted_at=time.perf_counter())
            self._next_id += 1
            self._handles[handle.id] = handle
        self._send(("submit", handle.id, request, on_pass is not None))
        return handle

    def cancel(self, handle: RequestHandle) -> bool:
        """Cancelled at once here (the waiter is released); the child frees its rows at its next chance."""
        if not self._settle_one(handle, CANCELLED):
            return False
        self._send(("cancel", handle.id))
        return True

    def counter(self, name: str) -> int:
        return int(self._counters[COUNTERS.index(name)])

    passes = property(lambda self: self.counter("passes"))
    active = property(lambda self: self.counter("active"))
    waiting = property(lambda self: self.counter("waiting"))
    free_slots = property(lambda self: self.counter("free_slots"))

    @property
    def idle(self) -> bool:
        return not self._handles

    @property
    def alive(self) -> bool:
        return self.dead_reason is None

    def stop(self) -> None:
        """Stop the child (it cancels what it holds) and wait for it; what it held fails here."""
        self._stopping = True
        self._send(("stop",))
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)
        self._conn.close()
        self._fail_all("the engine process was stopped")

    # ---- internals ----------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError):  # the child is gone: _read fails what it held
            pass

    def _read(self) -> None:
        """Settle handles as the child reports (this thread), until its socket closes."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind, rid = msg[0], msg[1]
            if kind == "fatal":
                self.dead_reason = f"the engine process failed: {rid}"
                continue
            handle = self._handles.get(rid)
            if handle is None:  # cancelled here already
                continue
            if kind == "pass":
                if handle.on_pass is not None:
                    try:
                        handle.on_pass(rid, torch.from_numpy(msg[3]), msg[2])
                    except Exception as err:  # noqa: BLE001 - fails this request only, as in the engine
                        self._settle_one(handle, FAILED, error=err)
                        self._send(("cancel", rid))
                continue
            if kind == "done":
                self._settle_one(handle, DONE, codes=torch.from_numpy(msg[2]))
            elif kind == "failed":
                self._settle_one(handle, FAILED, error=RuntimeError(msg[2]))
            elif kind == "cancelled":
                self._settle_one(handle, CANCELLED)
        code = self.proc.wait()
        self._fail_all(self.dead_reason or f"the engine process exited with code {code}")
        if not self._stopping and self.on_death is not None:
            self.on_death(self.dead_reason)

    def _settle_one(self, handle: RequestHandle, status: str, codes=None, error=None) -> bool:
        """Settle a handle still outstanding here (False if it had settled already)."""
        with self._lock:
            if self._handles.pop(handle.id, None) is None:
                return False
            handle.status, handle.codes, handle.error = status, codes, error
            handle.finished_at = time.perf_counter()
            callbacks = settle(handle)
        fire(handle, callbacks)
        return True

    def _fail_all(self, why: str) -> None:
        with self._lock:
            self.dead_reason = self.dead_reason or why
            left = list(self._handles.values())
        for h in left:
            self._settle_one(h, FAILED, error=EngineProcessDied(why))


# ---- the child --------------------------------------------------------------------------------------
def _child(fd: int, folder: str) -> None:
    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import ARConfig
    from detailflow.models.engine import GenerationEngine
    from detailflow.models.export import load_state_checked, read_config

    conn, send_lock = Connection(fd), threading.Lock()

    def send(msg: tuple) -> None:
        with send_lock:
            conn.send(msg)

    try:
        with open(f"{folder}/spec.json") as f:
            spec = json.load(f)
        if spec["torch_threads"]:
            torch.set_num_threads(spec["torch_threads"])
        with open(f"{folder}/counters", "r+b") as f:
            page = mmap.mmap(f.fileno(), mmap.PAGESIZE)
        counters = np.frombuffer(page, np.int64, len(COUNTERS))
        model = DetailFlowGPT(ARConfig(**read_config(f"{folder}/ar")["ar"]))
        load_state_checked(model, f"{folder}/ar")
        engine = GenerationEngine(model.eval(), slots=spec["slots"], device=spec["device"], mode=spec["mode"],
                                  dtype=getattr(torch, spec["dtype"]),
                                  generator_device=spec["generator_device"])
        engine.warmup()
    except Exception as exc:  # noqa: BLE001 - reported to the replica, which raises it
        send(("fatal", f"{type(exc).__name__}: {exc}"))
        raise

    def publish() -> None:
        counters[:] = (engine.passes, engine.active, engine.waiting, engine.free_slots)

    handles: dict[int, RequestHandle] = {}
    work, stopping = threading.Event(), threading.Event()

    def settled(rid: int):
        def report(h: RequestHandle) -> None:
            handles.pop(rid, None)
            if h.status == DONE:
                send(("done", rid, h.codes.numpy()))
            elif h.status == FAILED:
                send(("failed", rid, f"{type(h.error).__name__}: {h.error}"))
            else:
                send(("cancelled", rid))
        return report

    def hook_for(rid: int, tokens: int):
        def hook(_engine_id: int, codes_t: torch.Tensor, t: int) -> None:
            if t < tokens:  # the final prefix comes with "done"
                send(("pass", rid, t, codes_t.numpy().copy()))
        return hook

    def drive() -> None:
        pause = spec["simulated_pass_s"]
        while not stopping.is_set():
            work.clear()
            if engine.idle:
                publish()
                work.wait()
                continue
            try:
                engine.step()
            except Exception:  # noqa: BLE001 - its requests were failed and reported; serve the others
                pass
            publish()
            if pause:  # tests / load experiments: a big model's pass time on a CPU box
                time.sleep(pause)

    driver = threading.Thread(target=drive, name="generation-engine", daemon=True)
    publish()
    send(("ready", os.getpid()))
    driver.start()
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "submit":
                _, rid, request, previews = msg
                tokens = request.tokens or engine.cfg.num_tokens
                try:
                    h = engine.submit(request, on_pass=hook_for(rid, tokens) if previews else None)
                except ValueError as exc:  # a rule only the engine checks: this request fails, not the child
                    send(("failed", rid, f"ValueError: {exc}"))
                    continue
                handles[rid] = h
                h.add_done_callback(settled(rid))
                work.set()
            elif msg[0] == "cancel" and msg[1] in handles:
                engine.cancel(handles[msg[1]])
            elif msg[0] == "stop":
                break
    except (EOFError, OSError):  # the replica is gone
        pass
    stopping.set()
    work.set()
    driver.join(timeout=30)
    for h in list(handles.values()):
        engine.cancel(h)
    os._exit(0)  # no interpreter teardown: nothing is left to flush, and torch's can be slow


def main() -> None:
    ap = argparse.ArgumentParser(description="the engine process (started by EngineProcess)")
    ap.add_argument("fd", type=int, help="this end of the replica's socket pair")
    ap.add_argument("folder", help="spec.json, counters and the AR export (ar/)")
    args = ap.parse_args()
    _child(args.fd, args.folder)


if __name__ == "__main__":
    main()
