"""MLflow tracking from rank 0 only (Ray Train V2 rejects the MLflow logger callback).

Usage (inside a train loop):
    tracker = Tracker.start(tracking_uri, experiment="tokenizer", run_name=name,
                            run_id=client_state.get("mlflow_run_id"), params=resolved_config,
                            enabled=(rank == 0))
    tracker.log_metrics({"loss": 0.3, "lr": 1e-4}, step=10)
    tracker.log_png(png_bytes, "samples/step_000010.png")
    tracker.finish()

A restarted attempt resumes the SAME run (status back to RUNNING): first by the run id stored in
the checkpoint, else by the deterministic run name (tag `detailflow.run_name`), so a crash before
the first checkpoint does not create a duplicate run (the legacy integration's bug ray-project/ray#48664).
On ranks != 0 every method is a no-op.

What MLflow records for a run (read back with `list_checkpoints` / `list_exports`):
  * every checkpoint as an MLflow 3 logged model of type "detailflow-checkpoint" linked to the run
    at its step, tags detailflow.checkpoint_uri / detailflow.step, the checkpoint's metrics on it;
    the run's tags detailflow.checkpoint.latest_uri / .latest_step point at the newest;
  * the consolidated export as a pyfunc logged model (models-from-code, export_model.py; artefact
    "export" = config.json + model.safetensors.link.json, the weights on S3 at an immutable
    exports/<digest>/ prefix, tracking_links.py; with a signature), ready for `mlflow.register_model(
    "models:/<model_id>", name)`; run tags detailflow.export.uri / .model_uri / .weights_uri;
  * a failure: status FAILED and tag detailflow.error (mark_failed, called by the driver).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from detailflow.platform.tracking_buffer import TrackingBuffer
from detailflow.platform.tracking_records import (  # noqa: F401  (re-exported: callers import them here)
    CHECKPOINT_METRIC_PREFIX,
    CHECKPOINT_MODEL_TYPE,
    ERROR_TAG,
    KIND_TAG,
    PREVIOUS_ERROR_TAG,
    _logged_models,
    apply_records,
)

RUN_NAME_TAG = "detailflow.run_name"
MAX_TAG_LEN = 5000  # tag values are capped (MLflow's limit is 8000 characters)
LINK_TAG_PREFIX = "detailflow.artifact."  # <artifact path>.uri/.sha256/.bytes of a file stored on S3
LINK_BYTES = 4 * 1024 * 1024  # files above this go to S3 directly, not through the tracking server
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
    """One MLflow run, written by rank 0; a disabled tracker ignores every call.

    A started tracker is write-behind (tracking_buffer.py): log_metrics / log_params / set_tags /
    log_png / log_dict / log_checkpoint / finish append to a local spool and return at once, a
    thread sends them; finish() flushes with a deadline (`flush_deadline_s`) and then writes the
    end status; whatever stays unsent is backfilled by the next tracker on the same run. An
    attached tracker (the driver's) writes synchronously."""

    flush_deadline_s = float(os.environ.get("DETAILFLOW_TRACKING_FLUSH_DEADLINE_S", "60"))

    def __init__(self, client=None, run_id: str | None = None, tracking_uri: str | None = None,
                 buffer: TrackingBuffer | None = None):
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.buffer = buffer
        self.last_checkpoint: tuple[int, str] | None = None  # (step, uri) of the newest one logged

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str | None) -> Tracker:
        """The driver's handle on an existing run (e.g. to log the export after fit())."""
        if not run_id:
            return cls()
        from mlflow.tracking import MlflowClient

        return cls(MlflowClient(tracking_uri=tracking_uri), run_id, tracking_uri)

    @classmethod
    def start(cls, tracking_uri: str, *, experiment: str, run_name: str, run_id: str | None = None,
              params: dict | None = None, tags: dict | None = None, enabled: bool = True) -> Tracker:
        """A new run, or the run `run_id` / named `run_name` resumed (back to RUNNING, the old error
        kept as history). Nothing waits on a server that is away: with a known run_id the resume is
        spooled; without one, when the server does not answer /health (2 s), the run's creation is
        spooled too ("open", opened_run): `run_id` stays None until the flusher has created (or
        found, by run name) the run; a later tracker of the same run name backfills what is left."""
        if not enabled:
            return cls()
        from mlflow.tracking import MlflowClient

        from detailflow.platform.tracking_buffer import server_healthy, spool_root

        client = MlflowClient(tracking_uri=tracking_uri)
        key = pending_key(experiment, run_name)
        if run_id is None and not server_healthy(tracking_uri):
            tracker = cls(client, None, tracking_uri)
            tracker.buffer = TrackingBuffer(tracking_uri, key, apply_records,
                                            opener=lambda c, rec: tracker._opened(opened_run(c, rec)))
            tracker._record({"op": "open", "experiment": experiment, "run_name": run_name,
                             "tags": {RUN_NAME_TAG: run_name, **{k: str(v) for k, v in (tags or {}).items()}},
                             "params": flatten(params or {})})
            return tracker
        if run_id is None and (spool_root() / key).is_dir():  # an earlier start found the server away
            pending = TrackingBuffer(tracking_uri, key, apply_records, opener=opened_run)
            pending.drain()
            pending.close(0)
            with contextlib.suppress(OSError):
                pending.dir.rmdir()  # only when empty: what was not sent stays for the next start
        fresh = False
        if run_id is None:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
            run_id = find_run_id(client, run_name, [exp_id])
            fresh = run_id is None
            if fresh:
                run_id = client.create_run(exp_id, run_name=run_name,
                                           tags={RUN_NAME_TAG: run_name,
                                                 **{k: str(v) for k, v in (tags or {}).items()}}).info.run_id
        tracker = cls(client, run_id, tracking_uri, TrackingBuffer(tracking_uri, run_id, apply_records))
        if not fresh:
            tracker._record({"op": "resume"})
        elif params:
            tracker.log_params(params)
        return tracker

    def _opened(self, run_id: str) -> str:
        self.run_id = run_id  # the flusher created (or found) the run this tracker's records go to
        return run_id

    def _record(self, record: dict) -> None:
        """Spool the record (buffered) or send it now (attached)."""
        if self.buffer is not None:
            self.buffer.append(record)
        else:
            apply_records(self.client, self.run_id, record["op"], [record])

    def flush(self, deadline_s: float | None = None) -> bool:
        """Wait (up to the deadline) until every record so far is in MLflow; True when it is."""
        if self.buffer is None:
            return True
        return self.buffer.flush(self.flush_deadline_s if deadline_s is None else deadline_s)

    def log_params(self, params: dict) -> None:
        if self.enabled:
            self._record({"op": "params", "params": flatten(params)})

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        now = int(time.time() * 1000)  # stamped here: a replayed record is the same MLflow row
        rows = [[k, float(v), now, int(step)] for k, v in metrics.items()
                if isinstance(v, int | float) and math.isfinite(float(v))]
        if rows:
            self._record({"op": "metrics", "rows": rows})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled and tags:
            self._record({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_png(self, png: bytes, artifact_file: str) -> None:
        """Log PNG bytes (or a PIL image) as an artefact at artifact_file ("dir/name.png")."""
        if not self.enabled:
            return
        if hasattr(png, "save"):
            out = io.BytesIO()
            png.save(out, format="PNG")
            png = out.getvalue()
        self._log_blob(png, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        if self.enabled:
            self._log_blob(json.dumps(data, indent=2, default=str).encode(), artifact_file)

    def log_file(self, path: str | os.PathLike, artifact_dir: str | None = None) -> str | None:
        """A local file as a run artefact. Up to LINK_BYTES it goes through the server (spooled);
        a larger one (an .npz sample batch, an export) is uploaded to S3 directly and the run gets
        the link: tags detailflow.artifact.<artifact path>.uri / .sha256 / .bytes. Returns the
        s3:// URI of a linked file, else None."""
        if not self.enabled:
            return None
        path = Path(path)
        rel = f"{artifact_dir}/{path.name}" if artifact_dir else path.name
        size = path.stat().st_size
        if size <= LINK_BYTES:
            self._log_blob(path.read_bytes(), rel)
            return None
        from detailflow.platform.storage import configured_storage

        storage = configured_storage()
        key = f"tracking-artifacts/{self.run_id or self.buffer.run_id}/{rel}"
        digest = storage.upload_file(path, key)
        uri = storage.uri(key)
        self.set_tags({f"{LINK_TAG_PREFIX}{rel}.uri": uri, f"{LINK_TAG_PREFIX}{rel}.sha256": digest,
                       f"{LINK_TAG_PREFIX}{rel}.bytes": size})
        return uri

    def _log_blob(self, data: bytes, artifact_file: str) -> None:
        """Small artefact bytes: kept beside the spool until sent (attached: a temp file)."""
        if self.buffer is not None:
            blob = self.buffer.dir / "blobs" / uuid.uuid4().hex / Path(artifact_file).name
        else:
            blob = Path(tempfile.mkdtemp(prefix="df-artifact-")) / Path(artifact_file).name
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        self._record({"op": "artifact", "path": str(blob), "dir": str(Path(artifact_file).parent)})

    def finish(self, status: str = "FINISHED") -> bool:
        """End status written after everything before it; returns False when the flush missed its
        deadline (the rest, status included, stays spooled for the next tracker on this run)."""
        if not self.enabled:
            return True
        self._record({"op": "status", "status": status})
        if self.buffer is None:
            return True
        done = self.buffer.close(self.flush_deadline_s)
        if not done:
            print(f"[tracking] MLflow unreachable ({self.buffer.last_error}); run {self.run_id}: "
                  f"unsent records kept in {self.buffer.dir} for backfill", flush=True)
        return done

    def log_checkpoint(self, uri: str, *, step: int, metrics: dict[str, Any] | None = None) -> None:
        """Record a checkpoint: an MLflow 3 logged model linked to the run at `step` (no files are
        copied: the multi-GB shards stay in the Ray storage path, the model carries their URI), its
        metrics on the model, and the run's latest-checkpoint tags (apply_records: "checkpoint")."""
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        rows = [[k, float(v), now, int(step)] for k, v in (metrics or {}).items()
                if k != "step" and isinstance(v, int | float) and math.isfinite(float(v))]
        self._record({"op": "checkpoint", "uri": uri, "step": int(step), "rows": rows})
        self.last_checkpoint = (step, uri)

    def log_export(self, directory: str, export_config: dict, *, uri: str, step: int | None = None,
                   checkpoint_uri: str | None = None, storage=None) -> str | None:
        """Log an export folder (model.safetensors + config.json) as a pyfunc model on the run, with
        a signature, so the registry can register `models:/<model_id>` later. Returns the model id.

        The weights never pass through the tracking server: the folder is published to S3 at an
        immutable content-addressed prefix (tracking_links.link_export) and the logged model holds
        config.json + model.safetensors.link.json (URI, sha256); loading it reads the weights from
        S3. Run tags detailflow.export.weights_uri / .weights_sha256 name them. The run's status is
        put back as it was (the fluent API resumes and ends the run)."""
        if not self.enabled:
            return None
        import mlflow

        from detailflow.platform import export_model
        from detailflow.platform.storage import configured_storage
        from detailflow.platform.tracking_links import LINK_SUFFIX, link_export, read_link

        storage = configured_storage(storage)

        self.flush()  # the run's status and tags as the loop left them
        if self.run_id is None:
            raise RuntimeError(f"cannot log the export {uri}: the MLflow run was never created "
                               f"({self.tracking_uri} unreachable: {self.buffer.last_error})")
        status = self.client.get_run(self.run_id).info.status
        kind = export_config.get("kind", "model")
        tags = {KIND_TAG: "export", "detailflow.export_uri": uri,
                **({"detailflow.checkpoint_uri": checkpoint_uri} if checkpoint_uri else {})}
        with tempfile.TemporaryDirectory(prefix="df-export-link-") as staging:
            linked = link_export(storage, directory, Path(staging) / "export")
            link = read_link(next(linked.glob(f"*{LINK_SUFFIX}")))
            tags["detailflow.export.weights_uri"] = link["uri"]
            with fluent_run(self.tracking_uri, self.run_id):
                info = mlflow.pyfunc.log_model(
                    name=f"{kind}-export", python_model=export_model.__file__,
                    artifacts={"export": str(linked)},
                    signature=export_model.export_signature(export_config),
                    pip_requirements=export_model.export_requirements(), tags=tags,
                    model_type=f"detailflow-{kind}", step=int(step or 0))
        if status == "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.client.set_terminated(self.run_id, status=status)
        tags = {"detailflow.export.uri": uri, "detailflow.export.model_uri": f"models:/{info.model_id}",
                "detailflow.export.weights_uri": link["uri"],
                "detailflow.export.weights_sha256": link["sha256"]}
        apply_records(self.client, self.run_id, "tags", [{"tags": tags}])  # at once: callers read it
        return info.model_id


@contextlib.contextmanager
def fluent_run(tracking_uri: str, run_id: str):
    """`mlflow.start_run(run_id=...)` for APIs that only exist in fluent form (log_model), safe against
    whatever fluent state the process already has: MLflow refuses to resume a run whose experiment
    differs from an earlier `mlflow.set_experiment(...)` in the process (its global active
    experiment), so the run's own experiment is made active for the block and the previous one (and
    its MLFLOW_EXPERIMENT_ID env var, which subprocesses inherit) restored after."""
    import os

    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    exp_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    env_before = os.environ.get("MLFLOW_EXPERIMENT_ID")
    active_before = mlflow.tracking.fluent._active_experiment_id  # no public getter exists
    mlflow.set_experiment(experiment_id=exp_id)
    try:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
    finally:
        mlflow.tracking.fluent._active_experiment_id = active_before
        if env_before is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = env_before


def pending_key(experiment: str, run_name: str) -> str:
    """The spool folder of a run whose creation waits for the server (Tracker.start)."""
    import hashlib

    return "pending-" + hashlib.sha256(f"{experiment}\0{run_name}".encode()).hexdigest()[:16]


def opened_run(client, rec: dict) -> str:
    """Send an "open" record: the run named rec["run_name"] in rec["experiment"] resumed (back to
    RUNNING) if it exists, else created with its tags and params. Returns its id; replay-safe."""
    exp = client.get_experiment_by_name(rec["experiment"])
    exp_id = exp.experiment_id if exp else client.create_experiment(rec["experiment"])
    run_id = find_run_id(client, rec["run_name"], [exp_id])
    if run_id is not None:
        apply_records(client, run_id, "resume", [{}])
        return run_id
    run_id = client.create_run(exp_id, run_name=rec["run_name"], tags=rec.get("tags") or {}).info.run_id
    if rec.get("params"):
        apply_records(client, run_id, "params", [{"params": rec["params"]}])
    return run_id


def find_run_id(client, run_name: str, experiment_ids: list[str] | None = None) -> str | None:
    """The newest run tagged with this deterministic run name (all experiments when None)."""
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return None
    found = client.search_runs(experiment_ids, filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def mark_failed(tracking_uri: str, run_name: str, error: BaseException | str,
                experiment: str | None = None) -> str | None:
    """Driver: the run gave up (fit() raised, e.g. max_failures exhausted): status FAILED, the error
    as the tag detailflow.error. Returns the run id (None when no run was ever created)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment) if experiment else None
    run_id = find_run_id(client, run_name, [exp.experiment_id] if exp else None)
    if run_id is None:
        return None
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    client.set_tag(run_id, ERROR_TAG, text[-MAX_TAG_LEN:])  # the tail holds the root cause
    client.set_terminated(run_id, status="FAILED")
    return run_id


def list_checkpoints(client, run_id: str) -> list[dict]:
    """The run's recorded checkpoints, by step: {step, uri, model_id, metrics (prefix removed)}."""
    out = []
    for m in _logged_models(client, run_id, "checkpoint"):
        metrics = {x.key.removeprefix(CHECKPOINT_METRIC_PREFIX): x.value for x in (m.metrics or [])}
        out.append({"step": int(m.tags["detailflow.step"]), "uri": m.tags["detailflow.checkpoint_uri"],
                    "model_id": m.model_id, "metrics": metrics})
    return sorted(out, key=lambda c: c["step"])


def list_exports(client, run_id: str) -> list[dict]:
    """The run's logged exports: {model_id, uri, model_uri, kind}."""
    return [{"model_id": m.model_id, "uri": m.tags.get("detailflow.export_uri"),
             "model_uri": f"models:/{m.model_id}", "kind": m.model_type}
            for m in _logged_models(client, run_id, "export")]
