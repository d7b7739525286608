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
