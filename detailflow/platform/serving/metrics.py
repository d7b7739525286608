"""Application metrics of a Generator replica, exported by Ray's metrics agent (Prometheus format).

    m = ServeMetrics()                     # in the replica (ray.serve.metrics adds deployment/replica tags)
    m.request(route="/v1/generate", status=200, key="3fa1c2d0", images=4, seconds=0.31)
    m.gauges(pending_images=12, queue_images=4, slots_used=8, slots=32)   # also flushes the counters

Names (Prometheus adds the ray_ prefix): detailflow_requests_total{route,status,key},
detailflow_images_total{key}, detailflow_request_seconds (histogram){route},
detailflow_pending_images, detailflow_queue_images, detailflow_slot_occupancy (0..1).
images/s = rate(detailflow_images_total[1m]). Outside Ray (unit tests) every call is a no-op.
The two counters are summed in the replica and handed to Ray once per gauge sample (the app samples
at most every 0.5 s, and Serve's periodic autoscaling call samples an idle replica): a Ray metric
call costs tens of microseconds of tag handling on the event loop, and Prometheus scrapes every few
seconds anyway. The latency histogram is observed per request (Ray has no bulk observe).
"""

from __future__ import annotations

import collections

BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


def _ray_metrics():
    from ray.serve import metrics

    return metrics


class ServeMetrics:
    def __init__(self, metrics=None):
        """metrics: the module with Counter / Histogram / Gauge (default ray.serve.metrics)."""
        self._requests: collections.Counter = collections.Counter()  # (route, status, key) -> n, unflushed
        self._images: collections.Counter = collections.Counter()  # key -> images, unflushed
        try:
            m = metrics or _ray_metrics()
            self.requests = m.Counter("detailflow_requests_total", "HTTP requests by route, status, key",
                                      tag_keys=("route", "status", "key"))
            self.images = m.Counter("detailflow_images_total", "images delivered by key",
                                    tag_keys=("key",))
            self.latency = m.Histogram("detailflow_request_seconds", "request latency (s) by route",
                                       boundaries=BOUNDARIES_S, tag_keys=("route",))
            self.pending = m.Gauge("detailflow_pending_images", "images admitted and not finished")
            self.queue = m.Gauge("detailflow_queue_images", "images waiting for KV-cache slots")
            self.occupancy = m.Gauge("detailflow_slot_occupancy", "fraction of KV-cache slots in use")
        except Exception:  # noqa: BLE001 - no Ray worker here (unit tests): metrics off
            self.requests = None

    def request(self, route: str, status: int, key: str, images: int, seconds: float) -> None:
        if self.requests is None:
            return
        self._requests[(route, str(status), key)] += 1
        if images:
            self._images[key] += images
        self.latency.observe(seconds, tags={"route": route})

    def flush(self) -> None:
        """Hand the summed counters to Ray: one inc per tag set since the last flush."""
        if self.requests is None:
            return
        pending, self._requests = self._requests, collections.Counter()
        images, self._images = self._images, collections.Counter()
        for (route, status, key), n in pending.items():
            self.requests.inc(n, tags={"route": route, "status": status, "key": key})
        for key, n in images.items():
            self.images.inc(n, tags={"key": key})

    def gauges(self, pending_images: int, queue_images: int, slots_used: int, slots: int) -> None:
        if self.requests is None:
            return
        self.flush()
        self.pending.set(pending_images)
        self.queue.set(queue_images)
        self.occupancy.set(slots_used / slots if slots else 0.0)
