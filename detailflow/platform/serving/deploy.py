"""Put the serving app on Ray from a serve file: what `detailflow serve up | status | down` run.

    info = up(settings, load_serve_file("configs/serve-local.yaml"), port=8000)   # {"url": ..., ...}
    status(settings)                 # {"running": bool, "applications": {...}, "endpoint": {...}}
    down(settings)                   # delete the app, stop the Ray head `up` started (if it did)

    deploy_app(serve_file)           # on an already connected Ray (tests, notebooks): merge + apply
    delete_app("detailflow")         # remove one application, keep the others

Ray: with settings.ray_address "local", `up` starts its own Ray head on 127.0.0.1 (`ray start --head
--block` in its own process group, pid file <state_dir>/serve/ray-head.json; the dashboard stays off) so
the endpoint outlives the command; `down` stops exactly that process group. With another ray_address
(a cluster) it connects there and `down` deletes only the application.
API keys: unless DETAILFLOW_API_KEYS or DETAILFLOW_API_KEYS_FILE is set, `up` creates
<state_dir>/serve/api-keys (mode 600, one key) and gives its path to the Ray head's environment.
The application is applied like `serve deploy FILE` does (declaratively, so the ChampionWatcher can
update its user_config), merged with the other config-deployed applications instead of replacing them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from detailflow.platform.serving.config import GENERATOR, ServeFile
from detailflow.platform.serving.ingress import DEFAULT_FRONT, front_env

HEAD_FILE, KEYS_FILE, ENDPOINT_FILE = "ray-head.json", "api-keys", "endpoint.json"


class DeployError(RuntimeError):
    """The app could not be deployed / reached; the message says why."""


def serve_dir(settings) -> Path:
    d = Path(settings.state_dir) / "serve"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def head_info(settings) -> dict | None:
    """The Ray head `up` started, if its process still runs."""
    import psutil

    info = _read_json(serve_dir(settings) / HEAD_FILE)
    if not info:
        return None
    try:
        proc = psutil.Process(info["pid"])
        if abs(proc.create_time() - info["create_time"]) > 1 or not proc.is_running():
            return None
    except psutil.Error:
        return None
    return info


def key_file(settings) -> Path:
    return serve_dir(settings) / KEYS_FILE


def _ensure_keys(settings) -> dict[str, str]:
    from detailflow.platform.serving.auth import new_key_file

    if os.environ.get("DETAILFLOW_API_KEYS") or os.environ.get("DETAILFLOW_API_KEYS_FILE"):
        return {}
    path = key_file(settings)
    if not path.exists():
        new_key_file(path)
    return {"DETAILFLOW_API_KEYS_FILE": str(path)}


def start_head(settings, num_cpus: int, timeout_s: float = 90.0, front: str = DEFAULT_FRONT) -> dict:
    """`ray start --head --block` in its own session; returns {pid, address, front, ...} once it accepts
    drivers. front: the HTTP ingress the head runs (ingress.py); a running head keeps its own."""
    import psutil

    from detailflow.platform.serving import proxy_errors
    from detailflow.platform.storage import storage_env

    if (info := head_info(settings)) is not None:
        return info
    port, client_port = _free_port(), _free_port()
    env = {**os.environ, **settings.to_env(), **storage_env(settings), **_ensure_keys(settings)}
    env.setdefault(proxy_errors.ENV, proxy_errors.IMPORT_PATH)  # the proxy answers JSON when a replica dies
    env.update(front_env(front, shared_host=True))
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           f"--ray-client-server-port={client_port}", f"--num-cpus={num_cpus}", "--include-dashboard=false",
           "--disable-usage-stats"]
    log = open(serve_dir(settings) / "ray-head.log", "ab")  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    info = {"pid": proc.pid, "pgid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
            "address": f"127.0.0.1:{port}", "num_cpus": num_cpus, "front": front}
    (serve_dir(settings) / HEAD_FILE).write_text(json.dumps(info))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"ray start exited with {proc.returncode}; "
                              f"see {serve_dir(settings)}/ray-head.log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                time.sleep(2.0)  # GCS listens before the raylet has registered
                return info
        except OSError:
            time.sleep(0.5)
    stop_head(settings)
    raise DeployError(f"the Ray head did not come up within {timeout_s:.0f} s")


def stop_head(settings, grace_s: float = 20.0) -> bool:
    info = head_info(settings)
    (serve_dir(settings) / HEAD_FILE).unlink(missing_ok=True)
    if info is None:
        return False
    try:
        os.killpg(info["pgid"], signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            os.killpg(info["pgid"], 0)
            time.sleep(0.5)
        os.killpg(info["pgid"], signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def connect(settings, start: bool = False, num_cpus: int = 4, front: str = DEFAULT_FRONT) -> str | None:
    """ray.init to the serving cluster; None when it is local and not running (and start is False)."""
    import ray

    if settings.ray_address in ("", "local"):
        info = start_head(settings, num_cpus, front=front) if start else head_info(settings)
        if info is None:
            return None
        address = info["address"]
    else:
        address = settings.ray_address
    if not ray.is_initialized():
        ray.init(address=address, namespace="serve", log_to_driver=False)
    return address


def deploy_app(sf: ServeFile, port: int | None = None, wait_s: float = 180.0) -> None:
    """Apply the serve file's application (merged with the other config-deployed apps) and wait for it."""
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    from detailflow.platform.serving.watcher import app_configs

    http = sf.schema.http_options.model_dump()
    if port is not None:
        http["port"] = port
    client = serve_start(http_options=http, proxy_location=sf.schema.proxy_location,
                         grpc_options=gRPCOptions(**sf.schema.grpc_options.model_dump()))
    apps = {name: cfg for name, cfg in app_configs().items()}
    for app in sf.raw["applications"]:
        apps[app.get("name", "default")] = app
    client.deploy_apps(ServeDeploySchema.model_validate({**{k: v for k, v in sf.raw.items()
                                                            if k != "applications"},
                                                         "applications": list(apps.values())}))
    wait_running(sf.app_name, wait_s)
    serve.status()


def delete_app(app_name: str, wait_s: float = 60.0) -> None:
    """Remove one application: the other config-deployed ones are re-submitted without it."""
    from ray import serve

    from detailflow.platform.serving.watcher import app_configs, apply_app_configs

    others = [cfg for name, cfg in app_configs().items() if name != app_name]
    if others:
        apply_app_configs(others)
    else:
        serve.delete(app_name)
    deadline = time.monotonic() + wait_s
    while app_name in serve.status().applications:
        if time.monotonic() > deadline:
            raise DeployError(f"application {app_name!r} still there after {wait_s:.0f} s")
        time.sleep(0.5)


def wait_running(app_name: str, wait_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + wait_s
    last = None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        last = app
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise DeployError(f"application {app_name!r} failed to deploy: {app.message}")
        time.sleep(1.0)
    raise DeployError(f"application {app_name!r} not running after {wait_s:.0f} s "
                      f"(status {getattr(last, 'status', None)}: {getattr(last, 'message', '')})")


def up(settings, sf: ServeFile, port: int | None = None, num_cpus: int = 4, wait_s: float = 240.0,
       front: str = DEFAULT_FRONT) -> dict:
    """Deploy sf; a local head is started with `front` (ingress.py). The endpoint records the front the
    head runs (a cluster named by DETAILFLOW_RAY_ADDRESS: its own, from its nodes' env)."""
    address = connect(settings, start=True, num_cpus=num_cpus, front=front)
    deploy_app(sf, port=port, wait_s=wait_s)
    host = sf.http_host if sf.http_host not in ("0.0.0.0", "") else "127.0.0.1"
    url = f"http://{host}:{port or sf.http_port}{sf.route_prefix.rstrip('/')}"
    ours = key_file(settings).exists() and not os.environ.get("DETAILFLOW_API_KEYS")
    keys = os.environ.get("DETAILFLOW_API_KEYS_FILE") or (str(key_file(settings)) if ours else "")
    head = head_info(settings) if settings.ray_address in ("", "local") else None
    info = {"url": url, "app": sf.app_name, "ray_address": address, "api_keys_file": keys,
            "playground": url + "/", "docs": url + "/docs", "front": head.get("front", "proxy") if head
            else "cluster"}
    (serve_dir(settings) / ENDPOINT_FILE).write_text(json.dumps(info, indent=2))
    return info


def endpoint(settings) -> dict | None:
    return _read_json(serve_dir(settings) / ENDPOINT_FILE)


def status(settings) -> dict:
    from ray import serve

    if connect(settings) is None:
        return {"running": False, "reason": "no Ray head started by `detailflow serve up`"}
    try:
        st = serve.status()
    except Exception as exc:  # Serve not started on this cluster
        return {"running": False, "reason": f"Serve is not running: {exc}"}
    name_of = lambda x: str(getattr(x, "value", x))  # Serve's status enums -> "RUNNING"
    apps = {}
    for name, app in st.applications.items():
        apps[name] = {"status": name_of(app.status), "message": app.message,
                      "deployments": {d: {"status": name_of(s.status),
                                          "replicas": {name_of(k): v for k, v in s.replica_states.items()}}
                                      for d, s in app.deployments.items()}}
    ep = endpoint(settings)
    served = None
    if ep and ep.get("app") in apps:
        try:
            served = serve.get_deployment_handle(GENERATOR, ep["app"]).info.remote().result(timeout_s=10)
        except Exception as exc:
            served = {"error": str(exc)}
    return {"running": bool(apps), "applications": apps, "endpoint": ep, "served": served}


def down(settings) -> dict:
    from ray import serve

    ep = endpoint(settings)
    local = settings.ray_address in ("", "local")
    out = {"application_deleted": False, "ray_head_stopped": False}
    if connect(settings) is not None:
        try:
            if local:
                serve.shutdown()
            elif ep:
                delete_app(ep["app"])
            out["application_deleted"] = True
        except Exception as exc:
            out["error"] = str(exc)
        import ray

        ray.shutdown()
    if local:
        out["ray_head_stopped"] = stop_head(settings)
    (serve_dir(settings) / ENDPOINT_FILE).unlink(missing_ok=True)
    return out
