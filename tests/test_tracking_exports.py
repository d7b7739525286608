"""The AR export logged on a real MLflow run as a pyfunc model: signature, link to the run, and a
prediction equal to sampling the same weights directly (tracking.Tracker.log_export); the weights
go to S3 directly (immutable content-addressed prefix, manifest last) and the tracking server's
artefact store holds only small files (tracking_links.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration


def server_held_bytes(storage, settings, ids: list[str]) -> dict[str, int]:
    """{key: size} of every object the tracking server stored (under its --artifacts-destination
    s3://<bucket>/<mlflow prefix>/) whose key names one of `ids` (a run id, a logged model id),
    listed on S3 directly."""
    prefix = f"{settings.mlflow_artifact_prefix.strip('/')}/"
    pages = storage.client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])
            if any(i in o["Key"] for i in ids)}


def test_ar_export_logged_as_model_samples_like_the_weights(services, storage, tmp_path):
    import hashlib
    import uuid

    import mlflow

    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import get_model_config
    from detailflow.models.export import save_pretrained
    from detailflow.models.sampler import sample
    from detailflow.platform.tracking import Tracker, list_exports

    # ~6 MB of weights: well above what the server may hold for this run (64 KB)
    cfg = dataclasses.replace(get_model_config("smoke").ar, dim=256, depth=2, heads=4)
    torch.manual_seed(0)
    net = DetailFlowGPT(cfg).eval()
    export_cfg = {"kind": "ar", "model": "smoke", "run_name": "ar-export-test", "ar": dataclasses.asdict(cfg)}
    save_pretrained(net, export_cfg, tmp_path)
    weights = (tmp_path / "model.safetensors").read_bytes()
    assert len(weights) > 4 * 1024 * 1024
    experiment = f"export-test-{uuid.uuid4().hex[:8]}"
    tracker = Tracker.start(services.mlflow_tracking_uri, experiment=experiment, run_name="ar-export-test")
    model_id = tracker.log_export(str(tmp_path), export_cfg, uri="s3://bucket/runs/ar-export-test/export",
                                  step=7)
    held = server_held_bytes(storage, services, [tracker.run_id, model_id])
    assert any(k.endswith("MLmodel") for k in held)  # the logged model is there ...
    assert sum(held.values()) < 64 * 1024, held  # ... but no weight byte went through the server
    assert not any(k.endswith("model.safetensors") for k in held)
    tags = tracker.client.get_run(tracker.run_id).data.tags
    key = tags["detailflow.export.weights_uri"].removeprefix(f"s3://{storage.bucket}/")
    assert key.startswith("exports/") and key.endswith("/model.safetensors")
    assert tags["detailflow.export.weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert storage.get_bytes(key) == weights
    prefix = key.rsplit("/", 1)[0]
    assert set(storage.read_manifest(prefix)["files"]) == {"model.safetensors", "config.json"}
    assert tracker.client.get_run(tracker.run_id).info.status == "RUNNING"  # left as it was
    (export,) = list_exports(tracker.client, tracker.run_id)
    assert export["uri"] == "s3://bucket/runs/ar-export-test/export" and export["kind"] == "detailflow-ar"
    model = tracker.client.get_logged_model(export["model_id"])
    assert model.source_run_id == tracker.run_id
    mlflow.set_tracking_uri(services.mlflow_tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(export["model_uri"])
    assert pyfunc.metadata.get_output_schema().inputs[0].shape == (-1, cfg.num_tokens)
    labels = np.array([0, 3, 5], dtype=np.int64)
    got = pyfunc.predict(labels, params={"cfg_scale": 2.0, "seed": 4})
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        want = sample(net, torch.from_numpy(labels), cfg_scale=2.0, generator=gen)
    assert np.array_equal(got, want.numpy())
    # immutable keys: other weights -> another prefix; the first export's files are untouched
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    save_pretrained(net, export_cfg, tmp_path)
    tracker.log_export(str(tmp_path), export_cfg, uri="s3://bucket/runs/ar-export-test/export", step=8)
    new_key = tracker.client.get_run(tracker.run_id).data.tags["detailflow.export.weights_uri"]
    assert new_key != tags["detailflow.export.weights_uri"] and storage.get_bytes(key) == weights
    tracker.finish()
