"""Helpers for serving tests and experiments: small registered models and a test serve config.

    name = unique_name("srv")
    mc, tok, ar = smoke_modules(seed=1)                                     # random-init smoke pair
    sf = parse_serve_config(test_serve_config(name, keys_file, app="t", route="/", port=port))
    deploy_app(sf, port=port); url = f"http://127.0.0.1:{http_port()}"

Models are random-init smoke modules; the tests (tests/serving_models.py) export them to S3 where the
training stages write theirs and register them through pipelines.registry.register, so the Generator loads
them exactly as it loads trained ones (this module is platform code: it never imports pipelines).
The AR head is re-initialised with a larger std than training's zero init, so samples depend on
class, CFG and seed (a zero head samples uniformly).
"""

from __future__ import annotations

import uuid

from detailflow.platform.serving.autoscale import IMAGE_POLICY
from detailflow.platform.serving.config import APP_IMPORT_PATH, GENERATOR, WATCHER


def unique_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def free_port() -> int:
    """A port for a server started later (Serve's HTTP port): outside the ephemeral range, so no
    process's port-0 bind takes it in the meantime (services.stable_free_port)."""
    from detailflow.platform.services import stable_free_port

    return stable_free_port()


def smoke_modules(seed: int, head_std: float = 0.5):
    import torch

    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import get_model_config
    from detailflow.models.tokenizer import DetailFlowTokenizer

    mc = get_model_config("smoke")
    torch.manual_seed(0)
    tok = DetailFlowTokenizer(mc.tokenizer).eval()  # one tokenizer for every AR seed
    torch.manual_seed(seed)
    ar = DetailFlowGPT(mc.ar).eval()
    torch.nn.init.normal_(ar.head.weight, 0.0, head_std)
    torch.nn.init.normal_(ar.cls_emb.weight, 0.0, 1.0)
    return mc, tok, ar


def promote_now(settings, name: str, version: str) -> None:
    """Move `champion` (under the registry lock, recorded in the history) without an evaluation."""
    from detailflow.platform.registry import Registry, generator_name

    reg = Registry(settings.mlflow_tracking_uri)
    with reg.lock(generator_name(name)):
        reg.move_champion(generator_name(name), version, by="test", reason="serving test")


def test_serve_config(model: str, keys_file: str, *, app: str = "dftest", route: str = "/",
                      port: int = 8000, simulated_pass_s: float = 0.0, poll_interval_s: float = 1.0,
                      min_replicas: int = 1, max_replicas: int = 2, target_ongoing_requests: float = 2,
                      max_ongoing_requests: int = 16, max_queued_requests: int = 64, max_batch_size: int = 16,
                      batch_wait_timeout_s: float = 0.05, request_timeout_s: float = 60.0,
                      downscale_delay_s: float = 4.0, backend: str = "engine", max_pending_images: int = 0,
                      target_images_per_replica: float = 2.0, args: dict | None = None) -> dict:
    """A serve config for a local test cluster: short autoscaling delays, small fractional CPUs; one
    Generator deployment (HTTP front + engine) and the watcher."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": app, "route_prefix": route, "import_path": APP_IMPORT_PATH,
            "args": {"api_keys_file": keys_file, "api_keys_env": "", "revoked_keys_env": "",
                     "request_timeout_s": request_timeout_s, "retry_after_s": 1, "watch_alias": True,
                     "poll_interval_s": poll_interval_s, **(args or {})},
            "deployments": [
                {"name": GENERATOR, "max_ongoing_requests": max_ongoing_requests,
                 "max_queued_requests": max_queued_requests,
                 "autoscaling_config": {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                        "target_ongoing_requests": target_ongoing_requests,
                                        "upscale_delay_s": 1.0, "downscale_delay_s": downscale_delay_s,
                                        "metrics_interval_s": 0.5, "look_back_period_s": 2.0,
                                        "policy": {"policy_function": IMAGE_POLICY, "policy_kwargs": {
                                            "target_images_per_replica": target_images_per_replica}}},
                 "graceful_shutdown_timeout_s": 5, "graceful_shutdown_wait_loop_s": 0.5,
                 "ray_actor_options": {"num_cpus": 0.25},
                 "user_config": {"model": model, "device": "cpu", "torch_threads": 1,
                                 "max_batch_size": max_batch_size,
                                 "batch_wait_timeout_s": batch_wait_timeout_s,
                                 "max_images_per_request": min(16, max_batch_size),
                                 "simulated_pass_s": simulated_pass_s, "backend": backend,
                                 "max_pending_images": max_pending_images}},
                {"name": WATCHER, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
            ]}],
    }


test_serve_config.__test__ = False  # not a pytest test


def http_port() -> int:
    """The port Serve's proxy listens on (Serve may have been started earlier in this process)."""
    import ray
    from ray.serve.context import _get_global_client

    return ray.get(_get_global_client()._controller.get_http_config.remote()).port


def generate_png_from_endpoint(state_dir, class_ids=(1, 2), seed: int = 0):
    """POST /v1/generate (format=grid) to the endpoint `detailflow serve up` recorded under state_dir (its
    first API key) and return the grid of the images as an HxWx3 uint8 array; raises naming the status
    and body when the answer is not a 200 PNG."""
    import io
    import json
    from pathlib import Path

    import numpy as np
    import requests
    from PIL import Image

    from detailflow.platform.serving.auth import first_key

    endpoint = json.loads((Path(state_dir) / "serve" / "endpoint.json").read_text())
    key = first_key(endpoint["api_keys_file"])
    resp = requests.post(f"{endpoint['url']}/v1/generate",
                         json={"class_ids": list(class_ids), "seed": seed, "format": "grid"},
                         headers={"Authorization": f"Bearer {key}", "Accept": "image/png"}, timeout=120)
    if resp.status_code != 200 or resp.headers.get("content-type") != "image/png":
        raise AssertionError(f"generate answered {resp.status_code}: {resp.text[:500]}")
    return endpoint, np.asarray(Image.open(io.BytesIO(resp.content)))
