"""What a pipeline run tells the outside: where its logs live, a webhook, and a history in S3.

Usage:
    log_locations(settings)             # "logs: ... Ray job <id>; pod <name>" for this environment
    notify(settings, "stage_failed", {...}, log)   # POST JSON to the webhook, never raises
    write_history(storage, "tiny", record); list_history(storage, "tiny")   # newest first

Webhook URL: settings.webhook_url when Settings has it, else DETAILFLOW_WEBHOOK_URL (optional; unset
= no calls). Events: stage_failed, promoted, rejected. A webhook that is down is logged and never
fails the pipeline. History: one object per invocation under pipelines/<name>/history/ (no
read-modify-write, so concurrent writers cannot lose each other's records).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import urllib.request
from pathlib import Path

WEBHOOK_ENV = "DETAILFLOW_WEBHOOK_URL"


def history_prefix(pipeline: str) -> str:
    return f"pipelines/{pipeline}/history/"


def log_locations(settings) -> str:
    """Where this process's logs live on this environment (local dir, Ray job, pod)."""
    parts = [f"this process's output (host {socket.gethostname()})"]
    ray_dir = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    if ray_dir.exists():
        parts.append(f"Ray worker logs {ray_dir}")
    job = os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID")
    if job:
        parts.append(f"Ray job {job} (`ray job logs {job}`)")
    pod = os.environ.get("POD_NAME") or (
        os.environ.get("HOSTNAME") if os.environ.get("KUBERNETES_SERVICE_HOST") else None)
    if pod:
        ns = os.environ.get("POD_NAMESPACE", "")
        parts.append(f"pod {pod} (`kubectl logs {pod}{' -n ' + ns if ns else ''}`; gone when the pod is "
                     "deleted: the MLflow run keeps the error)")
    return "logs: " + "; ".join(parts)


def webhook_url(settings) -> str:
    return getattr(settings, "webhook_url", "") or os.environ.get(WEBHOOK_ENV, "")


def notify(settings, event: str, payload: dict, log=print, timeout_s: float = 5.0) -> bool:
    """POST {"event", ...payload} as JSON; True when the hook answered 2xx."""
    url = webhook_url(settings)
    if not url:
        return False
    body = json.dumps({"event": event, **payload}, default=str).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return 200 <= resp.status < 300
    except Exception as exc:  # a hook that is down never fails the pipeline
        log(f"[pipeline] webhook {url} ({event}) failed: {type(exc).__name__}: {exc}")
        return False


def write_history(storage, pipeline: str, record: dict) -> None:
    storage.put_json(f"{history_prefix(pipeline)}{record['invocation']}.json", record)  # time-sorted name


def list_history(storage, pipeline: str, limit: int = 50) -> list[dict]:
    keys = sorted(storage.list_keys(history_prefix(pipeline)), reverse=True)[:limit]
    return [storage.get_json(k) for k in keys]
