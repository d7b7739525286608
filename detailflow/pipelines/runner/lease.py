"""One run of a pipeline at a time: a lease object in S3 taken and renewed with conditional writes.

Usage:
    with Lease(storage, "tiny", run_id="...").hold():   # LeaseHeld names the holder when taken
        ...                                             # a heartbeat thread renews it every ttl/3

s3://<bucket>/pipelines/<name>/lease.json = {host, pid, started, run_id, expires (epoch s)}.
Create: PUT If-None-Match: *. Renew / release / take over: PUT or DELETE If-Match on the ETag this
holder last wrote. A lease whose `expires` has passed (its holder died without releasing it) is
taken over with If-Match on the stale ETag, so of two runs taking it over at once one wins.
A holder whose renewal fails (taken over after a long stall) sets `lost`; the runner stops at the
next stage boundary, and its state.json writes (If-Match) fail instead of overwriting the new run's.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import threading
import time

from detailflow.platform.storage import PreconditionFailed


class LeaseHeld(RuntimeError):
    """Another run holds the pipeline's lease; the message names it."""

    def __init__(self, pipeline: str, holder: dict):
        left = float(holder.get("expires", 0)) - time.time()
        super().__init__(
            f"pipeline {pipeline!r} is already running: host {holder.get('host')}, pid {holder.get('pid')}, "
            f"started {holder.get('started')}, run {holder.get('run_id')} (lease expires in {left:.0f}s "
            f"unless renewed); wait for it, or stop it")
        self.holder = holder


def lease_key(pipeline: str) -> str:
    return f"pipelines/{pipeline}/lease.json"


class Lease:
    def __init__(self, storage, pipeline: str, run_id: str, ttl_s: float = 120.0):
        self.storage, self.pipeline, self.run_id, self.ttl_s = storage, pipeline, run_id, ttl_s
        self.key = lease_key(pipeline)
        self.etag: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id,
                       "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}

    def _body(self) -> dict:
        return {**self.record, "expires": time.time() + self.ttl_s}

    def acquire(self) -> dict | None:
        """Take the lease; returns the stale holder taken over (None: it was free). LeaseHeld if live."""
        current, etag = self.storage.get_json_etag(self.key)
        if current is None:
            try:
                self.etag = self.storage.put_json_if(self.key, self._body(), None)
                return None
            except PreconditionFailed:  # created between our read and write
                current, etag = self.storage.get_json_etag(self.key)
                if current is None:
                    raise
        if float(current.get("expires", 0)) > time.time():
            raise LeaseHeld(self.pipeline, current)
        try:
            self.etag = self.storage.put_json_if(self.key, self._body(), etag)
        except PreconditionFailed:  # another run took it over (or its holder renewed) first
            now, _ = self.storage.get_json_etag(self.key)
            raise LeaseHeld(self.pipeline, now or current) from None
        return current

    def renew(self) -> None:
        try:
            self.etag = self.storage.put_json_if(self.key, self._body(), self.etag)
        except PreconditionFailed:
            self.lost.set()
            raise

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.etag and not self.lost.is_set():
            with contextlib.suppress(PreconditionFailed):
                self.storage.delete_if(self.key, self.etag)
        self.etag = None

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except PreconditionFailed:
                return
            except Exception:  # S3 briefly away: retry at the next beat (expiry leaves 2 more)
                continue

    @contextlib.contextmanager
    def hold(self):
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.pipeline}", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self.release()
