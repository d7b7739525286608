"""Run a pipeline file: stages in order, skipped by content identity, resumable, one run at a time.

Usage:
    from detailflow.pipelines.runner.runner import run_pipeline, read_state
    summary = run_pipeline(load_pipeline("configs/pipelines/tiny.yaml"), settings)
    run_pipeline(spec, settings, force=("tokenizer",))   # a new attempt of it; everything after re-runs
    run_pipeline(spec, settings, from_stage="ar")        # ar and every stage after it: new attempts
    read_state(Storage(settings), "tiny")["stages"]["tokenizer"]["status"]      # done | failed | running

One run at a time: the pipeline's S3 lease (runner.lease) is taken before anything else is read or
written; a second run is refused with the holder's host/pid/start/run id (LeaseHeld). state.json
(s3://<bucket>/pipelines/<name>/state.json) is written with If-Match on the ETag this run last
wrote, so a run that lost its lease cannot overwrite the next one's state.

Identity (runner.identity.stage_identity): kind + resolved params (which carry the upstream outputs:
dataset versions, run names) + resources + config-file CONTENT + code version + the identities of
the stages it references + an attempt counter (bumped by --force / --from). A stage is skipped when
its recorded identity is equal, it finished, its kind is not volatile, and its outputs still exist
(Kind.exists; e.g. the synth folder after `make clean`). Training stages get the identity as their
run name (stage_config.run_name: no date), so the same identity resumes its checkpoint and a new
one is a new run. Volatile kinds (ingest, deploy) always run; ingest returns the same dataset
version when nothing changed, so downstream identities stay equal.

MLflow: every invocation is a parent run in experiment "detailflow-pipelines" with one child run per
stage that ran (params: kind, identity, resolved params; tags: lineage = code version, input
versions, upstream MLflow run ids). A failure (an exception, SIGTERM, SIGINT) ends the child, the
parent and the stage's training runs FAILED with the cause, records the stage `failed` (the next
run resumes it), calls the webhook and raises StageFailed naming where the logs live. Each
invocation leaves a record under pipelines/<name>/history/ (`detailflow pipeline history`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal
import threading
import time
import traceback
import uuid
from pathlib import Path

from detailflow.pipelines.runner.events import log_locations, notify, write_history
from detailflow.pipelines.runner.identity import code_version, code_version_text, stage_identity
from detailflow.pipelines.runner.spec import PipelineSpec, refs, resolve
from detailflow.pipelines.runner.stages import KINDS, StageContext

EXPERIMENT = "detailflow-pipelines"


class StageFailed(RuntimeError):
    """A stage raised; the message names the pipeline, the stage, the cause and where to look."""

    def __init__(self, pipeline: str, stage: str, cause: BaseException, hint: str):
        super().__init__(
            f"pipeline {pipeline!r}: stage {stage!r} failed: {_cause(cause)}\n"
            f"{hint}\nre-run the same command to continue from this stage"
        )
        self.stage = stage


class Terminated(BaseException):
    """SIGTERM arrived (pod eviction, `kill`): unwinds the stage like Ctrl-C does."""


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@contextlib.contextmanager
def _sigterm_raises():
    """In the main thread, SIGTERM raises Terminated (the default would kill us mid-write)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated("SIGTERM")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def state_key(name: str) -> str:
    return f"pipelines/{name}/state.json"


def read_state(storage, name: str) -> dict:
    key = state_key(name)
    return storage.get_json(key) if storage.exists(key) else {"pipeline": name, "stages": {}, "runs": []}


class _StateFile:
    """state.json written with If-Match on the ETag this run last wrote (create: If-None-Match)."""

    def __init__(self, storage, name: str):
        self.storage, self.key = storage, state_key(name)
        state, self.etag = storage.get_json_etag(self.key)
        self.state = state or {"pipeline": name, "stages": {}, "runs": []}

    def save(self) -> None:
        from detailflow.platform.storage import PreconditionFailed

        try:
            self.etag = self.storage.put_json_if(self.key, self.state, self.etag)
        except PreconditionFailed as exc:
            raise RuntimeError(f"{self.storage.uri(self.key)} was changed by another run (this run "
                               "lost its lease); stopping without overwriting it") from exc


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def run_pipeline(
    spec: PipelineSpec, settings, *, force: tuple[str, ...] = (), from_stage: str | None = None,
    log=print, root: Path | None = None, lease_ttl_s: float = 120.0,
) -> dict:
    """Run every stage that needs it; returns {stage: {"status": ran|skipped, "outputs": ...}}.
    LeaseHeld (nothing touched) when another run of this pipeline holds the lease."""
    from detailflow.pipelines.runner.lease import Lease
    from detailflow.platform.storage import Storage

    storage = Storage(settings)
    storage.ensure_bucket()
    now = dt.datetime.now(dt.UTC)  # sortable to the microsecond: history lists by name
    invocation = f"{now:%Y%m%dT%H%M%S}.{now.microsecond:06d}-{uuid.uuid4().hex[:6]}"
    with Lease(storage, spec.name, invocation, ttl_s=lease_ttl_s).hold() as lease, _sigterm_raises():
        return _run(spec, settings, storage, lease, invocation, tuple(force), from_stage, log,
                    Path(root or Path.cwd()))


def _lineage(stage, outputs: dict, recs: dict, cv: dict) -> dict:
    """MLflow tags: code version, the versions of the inputs, the upstream stages' MLflow runs."""
    tags = {"detailflow.code_version": code_version_text(cv)}
    upstream = sorted({s for s, _ in refs(stage.params)})
    versions = {s: outputs[s]["version"] for s in upstream if "version" in outputs.get(s, {})}
    for s, v in versions.items():
        tags[f"detailflow.input.{s}.version"] = v
    runs = {s: recs[s]["mlflow_run_id"] for s in upstream if recs.get(s, {}).get("mlflow_run_id")}
    tags["detailflow.upstream_runs"] = json.dumps(runs, sort_keys=True)
    return tags


def _fail_training_runs(client, identity: str, cause: str) -> None:
    """End the stage's own training runs (params.identity = this stage's) FAILED with the cause."""
    try:
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, f"params.identity = '{identity}' and attributes.status = 'RUNNING'")
        for r in runs:
            client.set_tag(r.info.run_id, "detailflow.error", cause[:5000])
            client.set_terminated(r.info.run_id, "FAILED")
    except Exception:  # best effort: the tracking server may be what failed
        pass


def _run(spec, settings, storage, lease, invocation, force, from_stage, log, root) -> dict:
    from detailflow.platform.tracking import ERROR_TAG, Tracker

    sf = _StateFile(storage, spec.name)
    state = sf.state
    state["file"] = spec.path
    cv = code_version()
    parent = Tracker.start(
        settings.mlflow_tracking_uri,
        experiment=EXPERIMENT,
        run_name=f"pipeline-{spec.name}-{invocation}",
        params={"file": spec.path, "stages": ",".join(s.name for s in spec.stages)},
        tags={"detailflow.pipeline": spec.name, "detailflow.code_version": code_version_text(cv)},
    )
    history = {"invocation": invocation, "started": _now(), **{k: lease.record[k] for k in ("host", "pid")},
               "file": spec.path, "code_version": code_version_text(cv), "force": list(force),
               "from": from_stage, "mlflow_run_id": parent.run_id, "status": "running", "stages": {}}
    write_history(storage, spec.name, history)
    state["runs"] = (state.get("runs", []) + [{"mlflow_run_id": parent.run_id, "started": _now(),
                                               "invocation": invocation}])[-20:]
    names = [s.name for s in spec.stages]
    from_idx = names.index(from_stage) if from_stage else len(names)
    outputs: dict[str, dict] = {}
    identities: dict[str, str] = {}
    summary: dict[str, dict] = {}
    t_pipeline = time.perf_counter()
    for i, stage in enumerate(spec.stages, 1):
        if lease.lost.is_set():
            raise RuntimeError(f"pipeline {spec.name!r}: lease lost (another run took it over); stopping")
        kind = KINDS[stage.kind]
        params = resolve(stage.params, outputs)
        rec = state["stages"].get(stage.name) or {}
        forced = stage.name in force or i - 1 >= from_idx
        attempt = int(rec.get("attempt", 0)) + (1 if forced else 0)
        upstream = {s: identities[s] for s, _ in refs(stage.params)}
        ident = stage_identity(stage.kind, {**params, "_upstream": upstream}, stage.resources, root,
                               attempt=attempt, code=cv, config_keys=kind.config_keys)
        identities[stage.name] = ident
        head = f"[pipeline {spec.name}] stage {i}/{len(spec.stages)} {stage.name} ({stage.kind})"
        ctx = StageContext(settings, spec.name, stage.name, ident, stage.resources, log,
                           code_version_text(cv))
        same = rec.get("identity") == ident and rec.get("status") == "done" and not kind.volatile
        if same and not forced:
            if kind.exists is None or kind.exists(rec["outputs"], ctx):
                outputs[stage.name] = rec["outputs"]
                summary[stage.name] = {"status": "skipped", "outputs": rec["outputs"]}
                history["stages"][stage.name] = "skipped"
                parent.set_tags({f"stage.{stage.name}": "skipped"})
                log(f"{head}: skipped (done, same identity {ident}, outputs present)")
                continue
            log(f"{head}: done before, but its outputs are gone: running it again")
        child = Tracker.start(
            settings.mlflow_tracking_uri,
            experiment=EXPERIMENT,
            run_name=f"{spec.name}-{stage.name}-{invocation}",
            params={"kind": stage.kind, "identity": ident, "params": params, "resources": stage.resources},
            tags={"mlflow.parentRunId": parent.run_id, "detailflow.pipeline": spec.name,
                  "detailflow.stage": stage.name, "detailflow.identity": ident,
                  **_lineage(stage, outputs, state["stages"], cv)},
        )
        experiment_id = child.client.get_run(child.run_id).info.experiment_id
        rec = {
            "identity": ident,
            "attempt": attempt,
            "kind": stage.kind,
            "status": "running",
            "started": _now(),
            "invocation": invocation,
            "mlflow_experiment_id": experiment_id,
            "attempts": int(rec.get("attempts", 0)) + 1 if rec.get("identity") == ident else 1,
            "mlflow_run_id": child.run_id,
            "outputs": {},
        }
        state["stages"][stage.name] = rec
        sf.save()
        log(f"{head}: running (identity {ident}, attempt {rec['attempts']})")
        t0 = time.perf_counter()
        try:
            # `after` only orders/identifies (e.g. the codes run a training stage must follow); not a param
            out = kind.fn({k: v for k, v in params.items() if k != "after"}, ctx)
        except BaseException as exc:
            _fail(spec, settings, sf, rec, stage, exc, t0, child, parent, history, storage, log, ERROR_TAG)
            if isinstance(exc, KeyboardInterrupt | Terminated):
                raise
            raise StageFailed(spec.name, stage.name, exc, f"{log_locations(settings)}; MLflow run "
                              f"{child.run_id} (experiment {EXPERIMENT}, artefact error.json) at "
                              f"{settings.mlflow_tracking_uri}") from exc
        rec.update(status="done", finished=_now(), seconds=round(time.perf_counter() - t0, 1), outputs=out,
                   error=None)
        sf.save()
        child.log_dict(out, "outputs.json")
        child.set_tags({"detailflow.status": "done"})
        child.log_metrics({"seconds": rec["seconds"]}, step=0)
        child.finish()
        parent.set_tags({f"stage.{stage.name}": "ran"})
        outputs[stage.name] = out
        summary[stage.name] = {"status": "ran", "outputs": out, "seconds": rec["seconds"]}
        history["stages"][stage.name] = "ran"
        log(f"{head}: done in {rec['seconds']:.0f}s -> {json.dumps(out, default=str)}")
        if out.get("decision") in ("promoted", "rejected"):
            notify(settings, out["decision"], {"pipeline": spec.name, "stage": stage.name, **out}, log)
    parent.log_metrics({"seconds": time.perf_counter() - t_pipeline}, step=0)
    parent.log_dict({k: v["outputs"] for k, v in summary.items()}, "outputs.json")
    parent.finish()
    write_history(storage, spec.name, {**history, "status": "done", "finished": _now()})
    return summary


def _fail(spec, settings, sf, rec, stage, exc, t0, child, parent, history, storage, log, error_tag):
    """Record a failed stage everywhere (state, MLflow runs, history, webhook); never raises."""
    cause = _cause(exc)
    rec.update(status="failed", finished=_now(), seconds=round(time.perf_counter() - t0, 1),
               error=cause[:2000])
    steps = [
        sf.save,
        lambda: child.set_tags({error_tag: rec["error"], "detailflow.status": "failed"}),
        lambda: child.log_dict({"traceback": "".join(traceback.format_exception(exc))[-4000:]},
                               "error.json"),
        lambda: child.finish("FAILED"),
        lambda: _fail_training_runs(child.client, rec["identity"], cause),
        lambda: parent.set_tags({f"stage.{stage.name}": "failed", error_tag: f"{stage.name}: {cause}"}),
        lambda: parent.finish("FAILED"),
        lambda: write_history(storage, spec.name, {**history, "status": "failed", "finished": _now(),
                                                   "stages": {**history["stages"], stage.name: "failed"},
                                                   "error": f"{stage.name}: {cause}"[:2000]}),
        lambda: notify(settings, "stage_failed", {"pipeline": spec.name, "stage": stage.name,
                                                  "error": cause[:2000], "mlflow_run_id": child.run_id,
                                                  "logs": log_locations(settings)}, log),
    ]
    for step in steps:  # a second signal or a down service must not leave the rest undone
        try:
            step()
        except BaseException as e:  # noqa: BLE001
            log(f"[pipeline {spec.name}] while recording the failure: {_cause(e)}")


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
