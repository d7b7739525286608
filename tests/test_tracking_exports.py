"""The AR export logged on a real MLflow run as a pyfunc model: signature, link to the run, and a
prediction equal to sampling the same weights directly (tracking.Tracker.log_export)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration


def test_ar_export_logged_as_model_samples_like_the_weights(services, tmp_path):
    import mlflow

    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import get_model_config
    from detailflow.models.export import save_pretrained
    from detailflow.models.sampler import sample
    from detailflow.platform.tracking import Tracker, list_exports

    cfg = get_model_config("smoke").ar
    torch.manual_seed(0)
    net = DetailFlowGPT(cfg).eval()
    export_cfg = {"kind": "ar", "model": "smoke", "run_name": "ar-export-test", "ar": dataclasses.asdict(cfg)}
    save_pretrained(net, export_cfg, tmp_path)
    tracker = Tracker.start(services.mlflow_tracking_uri, experiment="export-test", run_name="ar-export-test")
    tracker.log_export(str(tmp_path), export_cfg, uri="s3://bucket/runs/ar-export-test/export", step=7)
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
    tracker.finish()
