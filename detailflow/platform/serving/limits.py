"""Per-key request rate (token bucket) and daily image quota: what the front checks before any work.

    limiter = Limiter(default_rate=5, default_burst=10, default_quota=1000)
    refused = limiter.admit("3fa1c2d0", images=4, limits={"rate": 2, "quota": 100})   # None = go ahead
    # else (wait_s, "rate" | "quota"): answer 429 with Retry-After = ceil(wait_s)

Rate: each key has a bucket of `burst` tokens refilled at `rate` per second; a request takes one
token (rate 0 = unlimited). Quota: images per key per UTC day, counted when admitted (a cached or
failed request still counts; the operator bills admitted work); a request that would pass the quota
is refused whole, with Retry-After = seconds to the next UTC midnight. State is per replica (with R
replicas a key gets up to R x its rate; set limits per replica accordingly, or front the API with a
shared limiter). `clock` is injectable for tests.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float  # tokens left
    at: float  # clock of the last refill


class Limiter:
    def __init__(self, default_rate: float = 0.0, default_burst: int = 0, default_quota: int = 0,
                 clock=time.time):
        self.default_rate, self.default_burst, self.default_quota = default_rate, default_burst, default_quota
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._used: dict[str, tuple[int, int]] = {}  # key id -> (UTC day number, images admitted that day)
        self._lock = threading.Lock()

    def used_today(self, kid: str) -> int:
        day, n = self._used.get(kid, (None, 0))
        return n if day == int(self.clock() // 86400) else 0

    def admit(self, kid: str, images: int, limits: dict | None = None) -> tuple[float, str] | None:
        """None if the request may go ahead (then it is counted), else (seconds until it could, which
        limit: "rate" | "quota")."""
        limits = limits or {}
        rate = float(limits.get("rate", self.default_rate))
        burst = int(limits.get("burst", self.default_burst)) or max(1, math.ceil(2 * rate))
        quota = int(limits.get("quota", self.default_quota))
        now = self.clock()
        day = int(now // 86400)
        with self._lock:
            if quota and self.used_today(kid) + images > quota:
                return (day + 1) * 86400 - now, "quota"
            bucket = None
            if rate > 0:
                bucket = self._buckets.setdefault(kid, _Bucket(float(burst), now))
                bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.at) * rate)
                bucket.at = now
                if bucket.tokens < 1.0:
                    return (1.0 - bucket.tokens) / rate, "rate"
                bucket.tokens -= 1.0
            self._used[kid] = (day, self.used_today(kid) + images)
        return None


def retry_after(wait_s: float) -> str:
    """The Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
