"""Process-wide environment defaults for Ray, DeepSpeed, gloo and MLflow.

Call ``apply_runtime_env()`` once, early, before ray/deepspeed/mlflow start work (the CLI and
``tests/conftest.py`` do it at import). Values the user already set win (``setdefault``), so a
cluster that exports e.g. ``RAY_AUTH_MODE=token`` keeps it.
"""

from __future__ import annotations

import os
import shutil

# Why each one (see measured-here.md pitfalls 5, 7, 11, 14):
RUNTIME_ENV: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting; nothing outside is reachable anyway
    "RAY_AUTH_MODE": "disabled",  # Ray 2.60 token auth otherwise breaks drivers after a `ray start`
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # makes Ray Train use MASTER_ADDR=127.0.0.1
    "GLOO_SOCKET_IFNAME": "lo",  # gloo collectives over loopback only
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}


def cuda_present() -> bool:
    """Cheap CUDA check that does not import torch (which costs seconds)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


def apply_runtime_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the defaults above in ``environ`` (default ``os.environ``); idempotent.

    Returns the variables this call actually set (empty on a second call).
    """
    env = os.environ if environ is None else environ
    wanted = dict(RUNTIME_ENV)
    if not cuda_present():
        wanted["DS_ACCELERATOR"] = "cpu"  # silences DeepSpeed's accelerator-detection warning
    changed = {}
    for name, value in wanted.items():
        if name not in env:
            env[name] = value
            changed[name] = value
    return changed
