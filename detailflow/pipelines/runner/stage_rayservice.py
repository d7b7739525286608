"""Stage kind `check-rayservice`: the cluster pipelines' last stage. The RayService (infra/k8s/
rayservice.yaml) follows the registry's champion alias by itself (serve config `watch_alias`), so a
pipeline running as a RayJob never deploys Serve into its own throw-away cluster (which would hold an
8-GPU node until the job's TTL); it checks that the long-lived endpoint now serves the champion.

Usage (pipeline file):
    - name: check-serving
      kind: check-rayservice
      params:
        url: http://detailflow-serve-serve-svc.detailflow.svc:8000   # kuberay.serve_url(ClusterSpec())
        model: "${stages.promote.model}"        # registered as <model>-generator
        version: "${stages.promote.champion}"   # the version that must be served
        timeout_s: 900                          # alias poll (30 s) + a GPU replica's model load

It polls the unauthenticated `GET /readyz` (200 with {"model", "model_version"} once a model is
loaded, 503 before) and fails with what the endpoint last said when the champion does not appear in
time. An empty version (a rejected candidate and no champion yet) has nothing to check.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


def served(url: str, timeout_s: float = 10.0) -> tuple[str, str] | str:
    """(registered model, version) the endpoint serves, or a short reason it serves none yet."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/readyz", timeout=timeout_s) as resp:
            body = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"unreachable ({exc})"
    if "model_version" not in body:
        return f"no model_version in {body}"
    return str(body.get("model", "")), str(body["model_version"])


def check_rayservice(params: dict, ctx) -> dict:
    """Wait until `url` serves `<model>-generator` version `version`; raise naming what it served."""
    url, version = str(params["url"]), str(params.get("version") or "")
    registered = f"{params['model']}-generator"
    if not version:
        ctx.log(f"[check-rayservice] no champion of {registered}: nothing to check")
        return {"url": url, "model": params["model"], "version": ""}
    deadline = time.monotonic() + float(params.get("timeout_s", 900))
    poll_s = float(params.get("poll_s", 10))
    while True:
        last = served(url)
        if last == (registered, version):
            ctx.log(f"[check-rayservice] {url} serves {registered} v{version}")
            return {"url": url, "model": params["model"], "version": version}
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"{url} does not serve {registered} v{version} after {params.get('timeout_s', 900)} s "
                f"(last answer: {last}); check the RayService (kubectl describe rayservice) and its "
                "serve config's watch_alias")
        time.sleep(poll_s)
