"""`detailflow serve up | status | down` and `detailflow generate` as a user runs them: real subprocesses,
a Ray head of their own (started and stopped by the CLI), the session's MLflow + SeaweedFS."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml
from serving_models import kill_under_load, register_smoke

from detailflow.platform.serving import testing as st

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
DETAILFLOW = [sys.executable, "-m", "detailflow.cli"]


def run(args, env, timeout=420):
    return subprocess.run(DETAILFLOW + args, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def cli_env(services, state) -> dict:
    """The CLI's environment: the session's services, its own state dir (key file, head), no keys or
    cluster address inherited from this shell."""
    env = {**os.environ, **services.to_env(), "DETAILFLOW_STATE_DIR": str(state)}
    for var in ("DETAILFLOW_API_KEYS", "DETAILFLOW_API_KEYS_FILE", "DETAILFLOW_API_KEY",
                "DETAILFLOW_RAY_ADDRESS"):
        env.pop(var, None)
    return env


def local_serve_file(tmp_path, autoscaling: dict, **user_config) -> Path:
    """configs/serve-local.yaml, smaller than shipped (a shared 2-core box): the Generator at 0.1 CPU,
    with these autoscaling bounds and user_config fields; written to tmp_path/serve.yaml."""
    cfg = yaml.safe_load((ROOT / "configs" / "serve-local.yaml").read_text())
    (gen,) = [d for d in cfg["applications"][0]["deployments"] if d["name"] == "Generator"]
    gen["ray_actor_options"] = {"num_cpus": 0.1}
    gen["autoscaling_config"].update(autoscaling)
    gen["user_config"].update(user_config)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def served_key(state) -> str:
    """The API key `serve up` wrote into its key file."""
    return next(line for line in (state / "serve" / "api-keys").read_text().splitlines()
                if line.startswith("dfk_"))


def test_serve_up_status_generate_down(services, storage, tmp_path):
    import psutil

    name = st.unique_name("cli")
    version = register_smoke(services, storage, name, seed=5, champion=True)
    config = local_serve_file(tmp_path, {"max_replicas": 1})
    state = tmp_path / "state"
    env = cli_env(services, state)
    port = st.free_port()
    # HAProxy's default side ports (Prometheus 9101, stats 8404) held, as another head's HAProxy on this
    # machine holds them (a demo left running): serve up gives its HAProxy free ones (ingress.py)
    taken = []
    for side in (9101, 8404):
        sock = socket.socket()
        try:
            sock.bind(("0.0.0.0", side))
            sock.listen()
            taken.append(sock)
        except OSError:  # already in use on this machine: taken all the same
            sock.close()
    try:
        up = run(["serve", "up", "--config", str(config), "--model", name, "--port", str(port),
                  "--num-cpus", "2"], env)
        assert up.returncode == 0, up.stdout + up.stderr
        url = f"http://127.0.0.1:{port}"
        assert f"playground  {url}/" in up.stdout and f"{name}-generator" in up.stdout
        head = json.loads((state / "serve" / "ray-head.json").read_text())
        # the default front: Ray's HAProxy (ingress.py) on the port, forwarding to the replica's own server
        assert "front       haproxy" in up.stdout and head["front"] == "haproxy"
        procs = psutil.Process(head["pid"]).children(recursive=True)
        assert any(p.name() == "haproxy" for p in procs), sorted({p.name() for p in procs})
        assert (state / "serve" / "api-keys").stat().st_mode & 0o077 == 0, "the key file must be private"
        key = served_key(state)
        assert key not in up.stdout + up.stderr, "serve up printed the key"
        assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
        assert requests.get(f"{url}/readyz", timeout=30).json()["model_version"] == version
        r = requests.post(f"{url}/v1/generate", json={"class_ids": [2], "seed": 1},
                          headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert r.status_code == 200 and r.headers["x-model-version"] == version, r.text[:300]
        assert r.headers["content-type"] == "image/png" and r.headers.get("x-request-id")
        huge = requests.post(f"{url}/v1/generate", data=b"x" * 70_000, timeout=30,
                            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        assert huge.status_code == 413 and huge.json()["error"]["request_id"], huge.text[:300]  # JSON + id

        status = run(["serve", "status", "--json"], env, timeout=120)
        assert status.returncode == 0, status.stdout + status.stderr
        st_json = json.loads(status.stdout)
        app = st_json["applications"]["detailflow"]
        assert app["status"] == "RUNNING" and app["deployments"]["Generator"]["replicas"] == {"RUNNING": 1}
        assert st_json["served"]["version"] == version
        text = run(["serve", "status"], env, timeout=120).stdout
        assert f"model       {name}-generator v{version}" in text

        out = tmp_path / "grid.png"
        gen = run(["generate", "--class", "1", "--num", "3", "--out", str(out), "--seed", "4"], env,
                  timeout=120)
        assert gen.returncode == 0, gen.stdout + gen.stderr
        assert out.stat().st_size > 100 and f"v{version}" in gen.stdout

        # more images than one request may hold: the CLI splits them, request j with seed + j; the grid
        # equals the one built from the same two requests made directly
        import numpy as np

        from detailflow.platform.serving.client import Client
        from detailflow.platform.serving.images import grid_png

        limit = Client(url, key).models()["data"][0]["max_images_per_request"]
        big = tmp_path / "big.png"
        gen = run(["generate", "--class", "0", "--class", "1", "--num", str(limit // 2 + 1), "--out",
                   str(big), "--seed", "7", "--columns", "6"], env, timeout=240)
        assert gen.returncode == 0 and "in 2 request(s)" in gen.stdout, gen.stdout + gen.stderr
        ids = [0] * (limit // 2 + 1) + [1] * (limit // 2 + 1)
        direct = [Client(url, key).generate(ids[:limit], 1, seed=7),
                  Client(url, key).generate(ids[limit:], 1, seed=8)]
        assert big.read_bytes() == grid_png(np.concatenate([g.images for g in direct]), 6)
    finally:
        for sock in taken:
            sock.close()
        down = run(["serve", "down"], env, timeout=120)
    assert down.returncode == 0 and "ray head stopped" in down.stdout, down.stdout + down.stderr
    assert not psutil.pid_exists(head["pid"]) or psutil.Process(head["pid"]).status() == psutil.STATUS_ZOMBIE
    after = run(["serve", "status"], env, timeout=120)
    assert after.returncode == 1 and "not serving" in after.stdout


def test_kill_9_behind_haproxy_fails_only_the_killed_replicas_in_flight_requests(services, storage, tmp_path):
    """The default front (HAProxy, what serve up and the RayService run): 6 closed-loop clients on 2
    replicas, SIGKILL one replica's process. Failures: at most one per client (the request it had in
    flight on the victim), each a dropped connection (what HAProxy does when the server dies
    mid-response; measured: 3 of 225 requests) or a 5xx (its static page: Ray's template, no id);
    requests sent after the kill are all served by the other replica (HAProxy retries what it could
    not send and drops the dead server)."""
    import collections
    import signal
    import time

    import psutil

    name = st.unique_name("k9")
    register_smoke(services, storage, name, seed=7, champion=True)
    # requests stay in flight long enough to be hit
    config = local_serve_file(tmp_path, {"min_replicas": 2, "max_replicas": 2}, simulated_pass_s=0.03)
    state = tmp_path / "state"
    env = cli_env(services, state)
    port = st.free_port()
    try:
        up = run(["serve", "up", "--config", str(config), "--model", name, "--port", str(port),
                  "--num-cpus", "2"], env)
        assert up.returncode == 0 and "front       haproxy" in up.stdout, up.stdout + up.stderr
        url = f"http://127.0.0.1:{port}"
        key = served_key(state)
        head = json.loads((state / "serve" / "ray-head.json").read_text())
        deadline = time.time() + 120
        while True:
            replicas = [p for p in psutil.Process(head["pid"]).children(recursive=True)
                        if any("ServeReplica:detailflow:Generator" in a for a in p.cmdline())]
            if len(replicas) >= 2 or time.time() > deadline:
                break
            time.sleep(1)
        assert len(replicas) == 2, replicas
        clients = 6
        results, t_kill = kill_under_load(url, {"Authorization": f"Bearer {key}"},
                                          lambda: replicas[0].send_signal(signal.SIGKILL), clients, 4.0, 6.0)
        failed = [x for x in results if x[2] != 200]
        before = collections.Counter(h["x-replica"] for t0, _, c, h, _ in results if c == 200 and t0 < t_kill)
        print(f"kill -9 behind HAProxy: {len(results)} requests, {len(failed)} failed "
              f"{collections.Counter(c for _, _, c, _, _ in failed)}; served before by {dict(before)}")
        assert len(before) == 2, before  # both replicas took traffic
        assert len(failed) <= clients, f"{len(failed)} failures for {clients} requests in flight"
        for t0, t1, code, _, body in failed:
            # measured: HAProxy closes the client's connection without an answer (code None) when the
            # server dies mid-response; a 5xx is its page when nothing was sent yet
            assert code is None or 500 <= code < 600, (code, body[:200])
            assert t0 <= t_kill + 1.0 and t1 >= t_kill, "a failure away from the kill"
        after = [x for x in results if x[0] > t_kill + 1.0]
        assert after and all(c == 200 for _, _, c, _, _ in after), "requests after the kill failed"
        assert all(h.get("x-request-id") for _, _, _, h, _ in after)
    finally:
        down = run(["serve", "down"], env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
