"""One MLflow run per evaluation, which only ever looks complete when it finished.

API:
    with EvalRun.start(settings, kind="generator", subject="ar-tiny-...", params={...}) as ev:
        ev.log_metrics({"fid": 12.3}, step=0)
        ev.log_png(png_bytes, "plots/cfg_sweep.png")
        ev.log_file(local_path, "samples")                # e.g. the ADM .npz
        ev.complete(results)                              # results.json, tag eval.complete=true, FINISHED
    results = read_complete(client, run_id)               # None unless FINISHED + complete + results.json

Completion protocol: the run is created with tag eval.complete = "false". complete() writes the
results.json artefact, then sets eval.complete = "true" as its LAST write, then ends the run FINISHED.
An exception inside the block (KeyboardInterrupt included) ends it FAILED with tag eval.error; a
process killed outright leaves it RUNNING with eval.complete = "false". Either way read_complete()
returns None, so a gate that requires it never acts on a partial evaluation.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid

from detailflow.platform.tracking import MAX_TAG_LEN, Tracker

EXPERIMENT = "detailflow-eval"
COMPLETE_TAG = "eval.complete"
KIND_TAG = "eval.kind"
SUBJECT_TAG = "eval.subject"  # the evaluated model's export URI
ERROR_TAG = "eval.error"
RESULTS_FILE = "results.json"


def eval_run_name(kind: str, subject: str) -> str:
    """Unique per evaluation: eval-<kind>-<subject>-<UTC time>-<6 hex>."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    short = subject.rstrip("/").split("/")[-2 if subject.rstrip("/").endswith("/export") else -1]
    return f"eval-{kind}-{short}-{stamp}-{uuid.uuid4().hex[:6]}"


class EvalRun:
    def __init__(self, tracker: Tracker, run_name: str):
        self.tracker, self.run_name = tracker, run_name
        self.completed = False

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    @classmethod
    def start(cls, settings, *, kind: str, subject: str, params: dict, tags: dict | None = None,
              experiment: str = EXPERIMENT) -> EvalRun:
        name = eval_run_name(kind, subject)
        tracker = Tracker.start(settings.mlflow_tracking_uri, experiment=experiment, run_name=name,
                                params=params, tags={KIND_TAG: kind, SUBJECT_TAG: subject,
                                                     COMPLETE_TAG: "false", **(tags or {})})
        print(f"[eval {kind}] MLflow run {name} ({tracker.run_id}) in experiment {experiment!r}", flush=True)
        return cls(tracker, name)

    def __enter__(self) -> EvalRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and not self.completed:
            self.fail(exc if exc is not None else exc_type.__name__)
        elif not self.completed:
            self.fail("the evaluation block ended without complete()")
        return False

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        self.tracker.log_metrics(metrics, step=step)

    def log_png(self, png: bytes, artifact_file: str) -> None:
        self.tracker.log_png(png, artifact_file)

    def log_file(self, path, artifact_dir: str | None = None) -> str | None:
        """Through the tracker: a file above tracking.LINK_BYTES (the ADM .npz) goes to S3 directly
        and the run links it (returns its s3:// URI); a smaller one is a run artefact."""
        return self.tracker.log_file(path, artifact_dir)

    def set_tags(self, tags: dict) -> None:
        self.tracker.set_tags(tags)

    def complete(self, results: dict) -> None:
        """results.json first, the completion tag last, then FINISHED."""
        self.tracker.log_dict(json_safe(results), RESULTS_FILE)
        self.tracker.set_tags({COMPLETE_TAG: "true"})
        self.tracker.finish("FINISHED")
        self.completed = True

    def fail(self, error) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        try:
            self.tracker.set_tags({ERROR_TAG: text[-MAX_TAG_LEN:]})
        finally:
            self.tracker.finish("FAILED")


def json_safe(obj):
    """Floats/ints/strings/lists/dicts only (numpy scalars converted, NaN/inf kept as strings)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, str):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def read_complete(client, run_id: str) -> dict | None:
    """The results of a complete evaluation run, or None (running, failed, killed, or never completed)."""
    run = client.get_run(run_id)
    if run.info.status != "FINISHED" or run.data.tags.get(COMPLETE_TAG) != "true":
        return None
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="df-eval-") as d:
        try:
            path = client.download_artifacts(run_id, RESULTS_FILE, d)
        except Exception:  # the artefact is missing: not a complete evaluation
            return None
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)
