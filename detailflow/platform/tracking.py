"""MLflow tracking from rank 0 only (Ray Train V2 rejects the MLflow logger callback).

Usage (inside a train loop):
    tracker = Tracker.start(tracking_uri, experiment="tokenizer", run_name=name,
                            run_id=client_state.get("mlflow_run_id"), params=resolved_config,
                            enabled=(rank == 0))
    tracker.log_metrics({"loss": 0.3, "lr": 1e-4}, step=10)
    tracker.log_png(png_bytes, "samples/step_000010.png")
    tracker.finish()

A restarted attempt resumes the SAME run: first by the run id stored in the checkpoint, else by
the deterministic run name (tag `detailflow.run_name`), so a crash before the first checkpoint
does not create a duplicate run (the legacy integration's bug ray-project/ray#48664).
On ranks != 0 every method is a no-op.
"""

from __future__ import annotations

import io
import json
import math
import time
from typing import Any

RUN_NAME_TAG = "detailflow.run_name"
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value (keeps long lists from failing log_batch)


def flatten(d: dict, prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"} with string values (nested dicts crash log_params, ray#33246)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name, sep))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:MAX_PARAM_LEN]
    return out


class Tracker:
    """One MLflow run, written by rank 0; a disabled tracker ignores every call."""

    def __init__(self, client=None, run_id: str | None = None):
        self.client = client
        self.run_id = run_id

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @classmethod
    def start(cls, tracking_uri: str, *, experiment: str, run_name: str, run_id: str | None = None,
              params: dict | None = None, tags: dict | None = None, enabled: bool = True) -> Tracker:
        if not enabled:
            return cls()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        if run_id is None:
            found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
            run_id = found[0].info.run_id if found else None
        fresh = run_id is None
        if fresh:
            run_id = client.create_run(exp_id, run_name=run_name,
                                       tags={RUN_NAME_TAG: run_name,
                                             **{k: str(v) for k, v in (tags or {}).items()}}).info.run_id
        else:
            client.update_run(run_id, status="RUNNING")
        tracker = cls(client, run_id)
        if fresh and params:
            tracker.log_params(params)
        return tracker

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):  # log_batch accepts at most 100 params per call
            self.client.log_batch(self.run_id, params=flat[i:i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items()
                if isinstance(v, int | float) and math.isfinite(float(v))]
        if rows:
            self.client.log_batch(self.run_id, metrics=rows)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_png(self, png: bytes, artifact_file: str) -> None:
        """Log PNG bytes (or a PIL image) as an artefact at artifact_file ("dir/name.png")."""
        if not self.enabled:
            return
        from PIL import Image

        image = png if hasattr(png, "save") else Image.open(io.BytesIO(png))
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_dict(self.run_id, data, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)
