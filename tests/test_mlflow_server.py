"""The local MLflow server (session `services` fixture): params, metrics and an artefact that
lands in the S3 bucket through the server's proxied artefact store."""

from __future__ import annotations

import json
import uuid

import pytest

pytestmark = pytest.mark.integration


def test_run_logs_param_metric_and_artifact_to_s3(services, storage, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(services.mlflow_tracking_uri)
    experiment = f"test-foundation-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(experiment)
    payload = {"hello": "s3", "n": 3}
    with mlflow.start_run() as run:
        mlflow.log_param("lr", 0.001)
        for step in range(3):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        (tmp_path / "note.json").write_text(json.dumps(payload))
        mlflow.log_artifact(str(tmp_path / "note.json"), artifact_path="notes")

    client = MlflowClient(services.mlflow_tracking_uri)
    got = client.get_run(run.info.run_id)
    assert got.data.params["lr"] == "0.001"
    assert got.data.metrics["loss"] == pytest.approx(1 / 3)
    history = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert history == pytest.approx([1, 1 / 2, 1 / 3])
    assert got.info.artifact_uri.startswith("mlflow-artifacts:"), "artefacts must be proxied by the server"

    # The bytes really are in the bucket, under the server's --artifacts-destination prefix.
    keys = [k for k in storage.list_keys(services.mlflow_artifact_prefix + "/")
            if run.info.run_id in k and k.endswith("notes/note.json")]
    assert len(keys) == 1, storage.list_keys(services.mlflow_artifact_prefix + "/")
    raw = storage.client.get_object(Bucket=storage.bucket, Key=keys[0])["Body"].read()
    assert json.loads(raw) == payload

    # ...and come back through the server.
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="notes/note.json",
                                                dst_path=str(tmp_path / "dl"))
    assert json.loads(open(local).read()) == payload


def test_fluent_run_resumes_a_run_of_another_experiment_after_set_experiment(services):
    """A process (a notebook, an earlier test) that called mlflow.set_experiment(A) must not break
    logging a model on a run of experiment B: plain start_run(run_id=...) raises there."""
    import os

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from detailflow.platform.tracking import fluent_run

    uri = services.mlflow_tracking_uri
    mlflow.set_tracking_uri(uri)
    a = mlflow.set_experiment(f"fluent-a-{uuid.uuid4().hex[:6]}").experiment_id
    client = MlflowClient(uri)
    b = client.create_experiment(f"fluent-b-{uuid.uuid4().hex[:6]}")
    run_b = client.create_run(b).info.run_id
    with pytest.raises(MlflowException, match="active experiment ID does not match"):
        with mlflow.start_run(run_id=run_b):
            pass
    with fluent_run(uri, run_b) as run:
        assert run.info.experiment_id == b
        mlflow.log_param("ok", 1)
    assert client.get_run(run_b).data.params["ok"] == "1"
    assert os.environ.get("MLFLOW_EXPERIMENT_ID") == a  # the caller's fluent state is restored
    assert mlflow.tracking.fluent._active_experiment_id == a
