"""Run a pipeline file: stages in order, skipped by content hash, resumable, one MLflow parent run.

Usage:
    from detailflow.pipelines.runner.runner import run_pipeline, read_state
    summary = run_pipeline(load_pipeline("configs/pipelines/tiny.yaml"), settings)
    read_state(Storage(settings), "tiny")["stages"]["tokenizer"]["status"]      # done | failed | running

State: s3://<bucket>/pipelines/<name>/state.json, rewritten after every stage transition (one PUT:
a reader sees the previous or the next state, never half of one). A stage runs when its content hash
(kind + resolved params, which include the upstream outputs + resources + the CONTENT of the config
files it names) differs from the recorded one, when its last attempt did not finish, or when its kind
is volatile (ingest: the source lives outside the pipeline; it resumes by its own markers and returns
the same dataset version when nothing changed, so downstream hashes stay equal). A failed run
therefore continues from the failed stage the next time; the stages' own deterministic run names
(pinned to the date of the stage's first attempt) make a retried training stage resume its checkpoint.

MLflow: every invocation is a parent run in experiment "detailflow-pipelines" with one child run per
stage that ran (params: kind, hash, resolved params; tags: status, error) and a tag per stage on the
parent (ran / skipped / failed). A failure ends both FAILED with the error as a tag and raises
StageFailed naming the stage and where its logs are.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
import traceback
import uuid
from pathlib import Path

from detailflow.pipelines.runner.spec import PipelineSpec, resolve
from detailflow.pipelines.runner.stages import KINDS, StageContext

EXPERIMENT = "detailflow-pipelines"


class StageFailed(RuntimeError):
    """A stage raised; the message names the pipeline, the stage, the cause and where to look."""

    def __init__(self, pipeline: str, stage: str, cause: BaseException, hint: str):
        super().__init__(
            f"pipeline {pipeline!r}: stage {stage!r} failed: {type(cause).__name__}: {cause}\n"
            f"{hint}\nre-run the same command to continue from this stage"
        )
        self.stage = stage


def state_key(name: str) -> str:
    return f"pipelines/{name}/state.json"


def read_state(storage, name: str) -> dict:
    key = state_key(name)
    return storage.get_json(key) if storage.exists(key) else {"pipeline": name, "stages": {}, "runs": []}


def _save(storage, state: dict) -> None:
    storage.put_json(state_key(state["pipeline"]), state)


def stage_hash(kind_name: str, params: dict, resources: dict, root: Path) -> str:
    """sha256 over what defines the stage's result (file contents, not file names' mtimes)."""
    kind = KINDS[kind_name]
    files = {}
    for key in kind.config_keys:
        path = params.get(key)
        if isinstance(path, str) and (root / path).is_file():
            files[key] = hashlib.sha256((root / path).read_bytes()).hexdigest()
    blob = json.dumps(
        {"kind": kind_name, "params": params, "resources": resources, "files": files},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def run_pipeline(
    spec: PipelineSpec, settings, *, force: tuple[str, ...] = (), log=print, root: Path | None = None
) -> dict:
    """Run every stage that needs it; returns {stage: {"status": ran|skipped, "outputs": ...}}."""
    from detailflow.platform.storage import Storage
    from detailflow.platform.tracking import ERROR_TAG, Tracker

    root = Path(root or Path.cwd())
    storage = Storage(settings)
    storage.ensure_bucket()
    state = read_state(storage, spec.name)
    state["file"] = spec.path
    # unique per invocation: Tracker.start resumes a run found by name (what training wants, not this)
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    parent = Tracker.start(
        settings.mlflow_tracking_uri,
        experiment=EXPERIMENT,
        run_name=f"pipeline-{spec.name}-{stamp}",
        params={"file": spec.path, "stages": ",".join(s.name for s in spec.stages)},
        tags={"detailflow.pipeline": spec.name},
    )
    state["runs"] = (state.get("runs", []) + [{"mlflow_run_id": parent.run_id, "started": _now()}])[-20:]
    outputs: dict[str, dict] = {}
    summary: dict[str, dict] = {}
    t_pipeline = time.perf_counter()
    for i, stage in enumerate(spec.stages, 1):
        kind = KINDS[stage.kind]
        params = resolve(stage.params, outputs)
        h = stage_hash(stage.kind, params, stage.resources, root)
        rec = state["stages"].get(stage.name) or {}
        head = f"[pipeline {spec.name}] stage {i}/{len(spec.stages)} {stage.name} ({stage.kind})"
        if (
            rec.get("hash") == h
            and rec.get("status") == "done"
            and not kind.volatile
            and stage.name not in force
        ):
            outputs[stage.name] = rec["outputs"]
            summary[stage.name] = {"status": "skipped", "outputs": rec["outputs"]}
            parent.set_tags({f"stage.{stage.name}": "skipped"})
            log(f"{head}: skipped (done, same inputs and config; hash {h})")
            continue
        date = rec["date"] if rec.get("hash") == h and rec.get("date") else dt.date.today().isoformat()
        child = Tracker.start(
            settings.mlflow_tracking_uri,
            experiment=EXPERIMENT,
            run_name=f"{spec.name}-{stage.name}-{stamp}",
            params={"kind": stage.kind, "hash": h, "params": params, "resources": stage.resources},
            tags={
                "mlflow.parentRunId": parent.run_id,
                "detailflow.pipeline": spec.name,
                "detailflow.stage": stage.name,
            },
        )
        experiment_id = child.client.get_run(child.run_id).info.experiment_id
        rec = {
            "hash": h,
            "kind": stage.kind,
            "status": "running",
            "date": date,
            "started": _now(),
            "mlflow_experiment_id": experiment_id,
            "attempts": int(rec.get("attempts", 0)) + 1 if rec.get("hash") == h else 1,
            "mlflow_run_id": child.run_id,
            "outputs": {},
        }
        state["stages"][stage.name] = rec
        _save(storage, state)
        log(f"{head}: running (hash {h}, attempt {rec['attempts']})")
        t0 = time.perf_counter()
        try:
            # `after` only orders/hashes (e.g. the codes run a training stage must follow); not a param
            call = {k: v for k, v in params.items() if k != "after"}
            out = kind.fn(call, StageContext(settings, spec.name, stage.name, date, stage.resources, log))
        except BaseException as exc:
            rec.update(
                status="failed",
                finished=_now(),
                seconds=round(time.perf_counter() - t0, 1),
                error=f"{type(exc).__name__}: {exc}"[:2000],
            )
            _save(storage, state)
            tb = "".join(traceback.format_exception(exc))[-4000:]
            child.set_tags({ERROR_TAG: rec["error"], "detailflow.status": "failed"})
            child.log_dict({"traceback": tb}, "error.json")
            child.finish("FAILED")
            parent.set_tags({f"stage.{stage.name}": "failed", ERROR_TAG: f"{stage.name}: {rec['error']}"})
            parent.finish("FAILED")
            hint = (
                f"logs: the output above; MLflow run {child.run_id} (experiment {EXPERIMENT}, artefact "
                f"error.json) at {settings.mlflow_tracking_uri}; Ray logs: /tmp/ray/session_latest/logs"
            )
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise StageFailed(spec.name, stage.name, exc, hint) from exc
        rec.update(
            status="done",
            finished=_now(),
            seconds=round(time.perf_counter() - t0, 1),
            outputs=out,
            error=None,
        )
        _save(storage, state)
        child.log_dict(out, "outputs.json")
        child.set_tags({"detailflow.status": "done"})
        child.log_metrics({"seconds": rec["seconds"]}, step=0)
        child.finish()
        parent.set_tags({f"stage.{stage.name}": "ran"})
        outputs[stage.name] = out
        summary[stage.name] = {"status": "ran", "outputs": out, "seconds": rec["seconds"]}
        log(f"{head}: done in {rec['seconds']:.0f}s -> {json.dumps(out, default=str)}")
    parent.log_metrics({"seconds": time.perf_counter() - t_pipeline}, step=0)
    parent.log_dict({k: v["outputs"] for k, v in summary.items()}, "outputs.json")
    parent.finish()
    return summary


def status_rows(state: dict, spec: PipelineSpec | None, tracking_uri: str) -> list[dict]:
    """One row per stage (file order when the file is given): status, timing, MLflow link."""
    names = [s.name for s in spec.stages] if spec else list(state["stages"])
    rows = []
    for name in names:
        rec = state["stages"].get(name, {})
        run = rec.get("mlflow_run_id")
        rows.append(
            {
                "stage": name,
                "kind": rec.get("kind") or (spec.stage(name).kind if spec else ""),
                "status": rec.get("status", "pending"),
                "started": rec.get("started", ""),
                "seconds": rec.get("seconds", ""),
                "attempts": rec.get("attempts", 0),
                "error": rec.get("error") or "",
                "mlflow": (
                    f"{tracking_uri.rstrip('/')}/#/experiments/{rec.get('mlflow_experiment_id')}/runs/{run}"
                )
                if run
                else "",
            }
        )
    return rows
