"""How spooled tracking records become MLflow calls (tracking.py writes them, tracking_buffer.py
sends them): one op per record kind, each safe to replay after a crash between send and ack."""

from __future__ import annotations

import contextlib
from pathlib import Path

ERROR_TAG = "detailflow.error"  # set with status FAILED when a run gives up
PREVIOUS_ERROR_TAG = "detailflow.previous_error"  # the error of the attempt a resumed run recovered from
KIND_TAG = "detailflow.kind"  # "checkpoint" | "export" on the run's logged models
CHECKPOINT_MODEL_TYPE = "detailflow-checkpoint"
CHECKPOINT_METRIC_PREFIX = "checkpoint/"  # a checkpoint's metrics, on its logged model and the run


def apply_records(client, run_id: str, op: str, records: list[dict]) -> None:
    """Send spooled records of one kind to MLflow (the flusher thread; an attached tracker at once).
    Idempotent: metric rows carry their timestamp (MLflow drops exact duplicates), params and tags
    repeat the same values, a checkpoint model is looked up by URI before one is created and linked to
    the run only when it is not yet (tests/test_tracking_outage.py replays every kind twice)."""
    from mlflow.entities import Metric, Param, RunTag

    from detailflow.platform.tracking_buffer import GROUPABLE

    if op == "metrics":
        rows = [Metric(k, v, ts, step) for rec in records for k, v, ts, step in rec["rows"]]
        for i in range(0, len(rows), GROUPABLE["metrics"]):
            client.log_batch(run_id, metrics=rows[i:i + GROUPABLE["metrics"]])
    elif op in ("params", "tags"):
        merged = {k: v for rec in records for k, v in rec[op].items()}
        make = Param if op == "params" else RunTag
        items = [make(k, v) for k, v in merged.items()]
        for i in range(0, len(items), GROUPABLE[op]):
            client.log_batch(run_id, **{op: items[i:i + GROUPABLE[op]]})
    else:
        for rec in records:
            _apply_one(client, run_id, op, rec)


def _apply_one(client, run_id: str, op: str, rec: dict) -> None:
    if op == "artifact":
        path = Path(rec["path"])
        if path.exists():  # gone: an earlier attempt sent it and died before acknowledging
            client.log_artifact(run_id, str(path), rec["dir"] if rec["dir"] not in ("", ".") else None)
            path.unlink()
            with contextlib.suppress(OSError):
                path.parent.rmdir()
    elif op == "checkpoint":
        _apply_checkpoint(client, run_id, rec)
    elif op == "status":
        client.set_terminated(run_id, status=rec["status"])
    elif op == "resume":  # a resumed or resubmitted run: back to RUNNING, the old error kept as history
        client.update_run(run_id, status="RUNNING")
        error = client.get_run(run_id).data.tags.get(ERROR_TAG)
        if error is not None:
            client.set_tag(run_id, PREVIOUS_ERROR_TAG, error)
            client.delete_tag(run_id, ERROR_TAG)
    else:
        raise ValueError(f"unknown tracking record op {op!r}")


def _apply_checkpoint(client, run_id: str, rec: dict) -> None:
    from mlflow.entities import LoggedModelOutput, Metric, RunTag

    uri, step = rec["uri"], rec["step"]
    run = client.get_run(run_id)
    known = [m for m in _logged_models(client, run_id, "checkpoint", run.info.experiment_id)
             if m.tags.get("detailflow.checkpoint_uri") == uri]
    linked = set()
    if known:  # a replay: the model, and maybe its link to the run, exist already
        model = known[0]
        linked = {(o.model_id, o.step) for o in (run.outputs.model_outputs if run.outputs else [])}
    else:
        tags = {KIND_TAG: "checkpoint", "detailflow.checkpoint_uri": uri, "detailflow.step": str(step)}
        model = client.create_logged_model(run.info.experiment_id,
                                           name=f"checkpoint-step-{step}", source_run_id=run_id, tags=tags,
                                           model_type=CHECKPOINT_MODEL_TYPE)
    if (model.model_id, step) not in linked:  # MLflow refuses a second identical link (UNIQUE)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    # A model's metrics are run metrics too: the prefix keeps them out of the loop's own series
    # ("loss" at step 3 from the loop, "checkpoint/loss" at step 4 from the checkpoint after it).
    rows = [Metric(f"{CHECKPOINT_METRIC_PREFIX}{k}", v, ts, s, model_id=model.model_id)
            for k, v, ts, s in rec["rows"]]
    if rows:
        client.log_batch(run_id, metrics=rows)
    client.finalize_logged_model(model.model_id, "READY")
    client.log_batch(run_id, tags=[RunTag("detailflow.checkpoint.latest_uri", uri),
                                   RunTag("detailflow.checkpoint.latest_step", str(step))])


def _logged_models(client, run_id: str, kind: str, experiment_id: str | None = None) -> list:
    exp_id = experiment_id or client.get_run(run_id).info.experiment_id
    models, token = [], None
    while True:
        page = client.search_logged_models(
            [exp_id], filter_string=f"source_run_id = '{run_id}' AND tags.`{KIND_TAG}` = '{kind}'",
            page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            return models
