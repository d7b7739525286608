"""Registered smoke models for the serving tests (imported by tests/test_serving*.py, test_playground.py).

    version = register_smoke(services, storage, name, seed=1, champion=True)

The random-init smoke tokenizer + AR(seed) pair (platform.serving.testing.smoke_modules) is exported
to S3 where the training stages write theirs and registered through pipelines.registry.register, the
registry's own path, so the Generator loads it exactly as it loads trained models.
"""

from __future__ import annotations

import dataclasses

from registry_models import upload_export

from detailflow.platform.serving.testing import promote_now, smoke_modules


def register_smoke(settings, storage, name: str, seed: int, champion: bool = False) -> str:
    """Upload a smoke tokenizer + AR(seed) export pair, register `<name>-generator`; returns the version."""
    from detailflow.pipelines.registry.register import register

    mc, tok, ar = smoke_modules(seed)
    prefix = f"tests/serving/{name}"
    tok_config = {"kind": "tokenizer", "model": "smoke", "run_name": f"tok-{name}",
                  "tokenizer": dataclasses.asdict(mc.tokenizer)}
    tok_uri = upload_export(storage, tok, tok_config, f"{prefix}/tok/export")
    ar_uri = upload_export(storage, ar, {"kind": "ar", "model": "smoke", "run_name": f"ar-{name}-{seed}",
                                         "tokenizer": tok_uri, "ar": dataclasses.asdict(mc.ar)},
                           f"{prefix}/ar-{seed}/export")
    version = register(settings, name, ar=ar_uri, tokenizer=tok_uri)["generator_version"]
    if champion:
        promote_now(settings, name, version)
    return version


def kill_under_load(url: str, headers: dict, kill, clients: int = 6, before_s: float = 2.0,
                    after_s: float = 5.0) -> tuple[list, float]:
    """`clients` closed-loop threads POST one image each to url/v1/generate (seed per client and
    request); `kill()` runs after before_s; the load stops after_s later. Returns ([(t_sent, t_done,
    status or None for a dropped connection, headers, body)], t_kill)."""
    import threading
    import time

    import requests

    stop, results = threading.Event(), []

    def load(k):
        s, i = requests.Session(), 0
        while not stop.is_set():
            t0 = time.time()
            try:
                r = s.post(f"{url}/v1/generate", json={"class_ids": [i % 10], "seed": 1000 * k + i},
                           headers=headers, timeout=60)
                results.append((t0, time.time(), r.status_code, r.headers, r.content))
            except requests.RequestException as exc:  # a dropped connection is a failure too
                results.append((t0, time.time(), None, {}, repr(exc).encode()))
            i += 1

    threads = [threading.Thread(target=load, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    try:
        time.sleep(before_s)
        t_kill = time.time()
        kill()
        time.sleep(after_s)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    return results, t_kill
