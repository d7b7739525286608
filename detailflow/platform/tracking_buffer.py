"""Write-behind buffer for a Tracker: the training step never waits on the tracking server.

    buf = TrackingBuffer(tracking_uri, run_id, apply=apply_record)   # starts the flusher thread
    buf.append({"op": "metrics", "rows": [...]})    # a local file append: microseconds, server up or down
    buf.close(deadline_s=30)                        # flush with a deadline; True when all reached MLflow

Each record is one JSON line appended to this process's spool file
``<spool root>/<run_id>/<host>-<pid>-<nonce>.jsonl``; the file is flock'ed while its process lives.
A background thread sends the records, in order, with its own MlflowClient, and after each
batch stores how far it got (``<file>.acked``, a byte offset, replaced atomically). While the
server is away the thread backs off (1 s, 2 s, ... capped at ``max_backoff_s``) behind a 2 s
health probe, so MLflow's own HTTP retries (minutes) are rarely entered and never on the caller's
thread. What ``close`` could not send stays in the spool: the next process that opens a buffer
on the same run (a resumed attempt on that node) finds the unlocked file and sends it first
(backfill), then deletes it. Records must be idempotent to replay (metrics carry their own
timestamp; a checkpoint looks its model up before creating one).

A record the server refuses (a 4xx other than 429: it would be refused again on every retry) is
moved to ``<run_id>/rejected/records.jsonl`` with the server's answer (a subfolder: the run folder's
own ``*.jsonl`` are spool files to send), one warning line is printed, and the records after it are
sent: one bad record never holds back the run's metrics or its end status.

Spool root: ``$DETAILFLOW_TRACKING_SPOOL_DIR``, else ``<tmp>/detailflow-tracking-spool-<uid>``
(node-local, per user; every process has its own file, so ranks and restarts never share one).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

SPOOL_ENV = "DETAILFLOW_TRACKING_SPOOL_DIR"
GROUPABLE = {"metrics": 1000, "params": 100, "tags": 100}  # op -> MLflow's log_batch limit per call
REJECTED = "rejected/records.jsonl"  # under a run's spool folder: what the server refused (never sent)
EXIT_DEADLINE_S = 10.0  # at interpreter exit, how long an open buffer may still try to send
_OPEN: weakref.WeakSet = weakref.WeakSet()  # open buffers, flushed (bounded) at exit


def spool_root() -> Path:
    env = os.environ.get(SPOOL_ENV)
    return Path(env) if env else Path(tempfile.gettempdir()) / f"detailflow-tracking-spool-{os.getuid()}"


class _SpoolFile:
    """One JSONL spool file and its acknowledged byte offset."""

    def __init__(self, path: Path, fh):
        self.path, self.fh = path, fh
        self.ack_path = path.with_name(path.name + ".acked")
        try:
            self.acked = int(self.ack_path.read_text())
        except (FileNotFoundError, ValueError):
            self.acked = 0

    def pending(self) -> list[tuple[int, dict]]:
        """(end offset, record) of every complete line after the acknowledged offset."""
        out = []
        with open(self.path, "rb") as f:
            f.seek(self.acked)
            offset = self.acked
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a torn last line (the writer died mid-append): never acknowledged
                offset += len(line)
                out.append((offset, json.loads(line)))
        return out

    def ack(self, offset: int) -> None:
        tmp = self.ack_path.with_name(self.ack_path.name + ".tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self.ack_path)
        self.acked = offset

    def remove(self) -> None:
        for p in (self.path, self.ack_path):
            p.unlink(missing_ok=True)


def _lock(path: Path, mode: str):
    """Open `path` and take its exclusive flock without blocking; None when another process has it."""
    fh = open(path, mode)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


class TrackingBuffer:
    """A durable spool of tracking records and the thread that sends them (module docstring)."""

    def __init__(self, tracking_uri: str, run_id: str, apply: Callable, *, interval_s: float = 1.0,
                 max_backoff_s: float = 15.0, root: Path | None = None, opener: Callable | None = None):
        """run_id: the MLflow run, or (with `opener`) a spool key for a run not created yet: the
        spool then starts with an "open" record, and sending it calls opener(client, record),
        which returns the run id the records after it go to."""
        self.tracking_uri, self.run_id, self.apply, self.opener = tracking_uri, run_id, apply, opener
        self.interval_s, self.max_backoff_s = interval_s, max_backoff_s
        self.dir = (root or spool_root()) / run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self.own = _SpoolFile(self.dir / name, _lock(self.dir / name, "ab"))
        self._write_lock = threading.Lock()
        self._written = 0  # bytes appended to the own file
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()  # set while everything written has been sent
        self._idle.set()
        self._hurry = False  # a flush() waits: retry at once, no backoff
        self.failures = 0  # consecutive failed attempts (0 while the server answers)
        self.last_error: str | None = None
        self._client = None
        self._thread = threading.Thread(target=self._loop, name=f"tracking-flush-{run_id[:8]}", daemon=True)
        self._thread.start()
        _OPEN.add(self)

    # ---- caller side: never touches the network ----------------------------------------------------
    def append(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._write_lock:
            self._idle.clear()
            self.own.fh.write(line)
            self.own.fh.flush()  # in the OS page cache: survives the process; fsync'd by the flusher
            self._written += len(line)
        self._wake.set()

    def flush(self, deadline_s: float) -> bool:
        """Wait up to deadline_s for everything appended so far to reach MLflow; True when it did.
        While someone waits, the flusher retries every interval_s instead of backing off."""
        self._hurry = True
        self._wake.set()
        return self._idle.wait(timeout=max(0.0, deadline_s))

    def close(self, deadline_s: float = 30.0) -> bool:
        """Flush with a deadline, stop the thread, release the spool file (kept for backfill when
        not everything was sent). True when all records reached MLflow."""
        done = self.flush(deadline_s)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)
        with self._write_lock:
            if self.own.fh is not None:
                self.own.fh.close()  # releases the flock: a later process may backfill it
                self.own.fh = None
        if done and not self._thread.is_alive():
            self.own.remove()
        _OPEN.discard(self)
        return done

    # ---- flusher thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.interval_s)
            self._wake.clear()
            try:
                self._pass()
                self.failures, self.last_error = 0, None
            except Exception as exc:  # the server is away (or answered an error): back off, keep all
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                self._back_off(min(self.max_backoff_s, 2.0 ** (self.failures - 1)))

    def _back_off(self, delay_s: float) -> None:
        end = time.monotonic() + delay_s
        while not self._stop.is_set() and not self._hurry and time.monotonic() < end:
            self._stop.wait(0.2)

    def _pass(self) -> None:
        orphans = self._orphans()
        with self._write_lock:
            own_done = self.own.acked >= self._written
            if own_done:
                self._idle.set()
                self._hurry = False
        if own_done and not orphans:
            return  # nothing to send: no request, not even a health probe
        if not self._healthy():
            raise ConnectionError(f"MLflow at {self.tracking_uri} does not answer /health")
        for path in orphans:  # earlier processes' leftovers first
            self._backfill(path)
        with self._write_lock:
            if self.own.fh is not None:
                os.fsync(self.own.fh.fileno())
        self._send(self.own)
        with self._write_lock:
            if self.own.acked >= self._written:
                self._idle.set()
                self._hurry = False

    def _orphans(self) -> list[Path]:
        """Spool files of this run whose process is gone (their flock is free)."""
        out = []
        for path in sorted(self.dir.glob("*.jsonl")):
            if path != self.own.path:
                fh = _lock(path, "ab")
                if fh is not None:
                    fh.close()
                    out.append(path)
        return out

    def _backfill(self, path: Path) -> None:
        fh = _lock(path, "ab")
        if fh is None:
            return  # its process is alive and sends it itself
        try:
            spool = _SpoolFile(path, fh)
            self._send(spool)
            spool.remove()
        finally:
            fh.close()

    def _send(self, spool: _SpoolFile) -> None:
        """Send the pending records in order; consecutive groupable ones in batches."""
        pending = spool.pending()
        i = 0
        while i < len(pending):
            op = pending[i][1]["op"]
            j = i + 1
            if op in GROUPABLE:
                while j < len(pending) and pending[j][1]["op"] == op:
                    j += 1
            group = [rec for _, rec in pending[i:j]]
            if op == "open":  # a run started while the server was away: created (or found) now
                if self.opener is None:
                    raise ValueError(f"{spool.path}: an 'open' record but this buffer has no opener")
                self.run_id = self.opener(self._mlflow(), group[-1])
            else:
                try:
                    self.apply(self._mlflow(), self.run_id, op, group)
                except Exception as exc:
                    if not refused(exc):
                        raise  # the server is away or failed: back off and send it again
                    self._reject(group, exc)
            spool.ack(pending[j - 1][0])
            i = j

    def _reject(self, records: list[dict], exc: Exception) -> None:
        """Keep what the server refused, with its answer, under the spool folder (never sent again)."""
        why = f"{type(exc).__name__}: {exc}"[:500]
        kept = self.dir / REJECTED
        kept.parent.mkdir(exist_ok=True)
        with open(kept, "a") as f:
            for rec in records:
                f.write(json.dumps({"record": rec, "error": why}) + "\n")
        print(f"[tracking] MLflow refused {len(records)} {records[0]['op']} record(s) of run {self.run_id} "
              f"({why}); kept in {kept}, the rest is sent", flush=True)

    def _mlflow(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _healthy(self) -> bool:
        return server_healthy(self.tracking_uri)

    def drain(self) -> bool:
        """Send what this buffer's spool folder holds (earlier processes' files included) now, in
        the caller's thread; False when the server did not take it all (the rest stays spooled)."""
        try:
            self._pass()
            return True
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            return False


def refused(exc: Exception) -> bool:
    """Did the server answer this request with a client error it will repeat (a 4xx but 429)?"""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status != 429


def server_healthy(tracking_uri: str, timeout_s: float = 2.0) -> bool:
    """Does the tracking server answer /health (within timeout_s)? Always True for a file or
    database store (no server)."""
    if not tracking_uri.startswith("http"):
        return True
    import requests

    with contextlib.suppress(requests.RequestException):
        return requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s).status_code == 200
    return False


def _flush_open_buffers() -> None:
    """atexit: a process that never called close() still gets a bounded last flush (the rest stays
    in the spool for backfill)."""
    for buf in list(_OPEN):
        with contextlib.suppress(Exception):
            buf.close(EXIT_DEADLINE_S)


atexit.register(_flush_open_buffers)
