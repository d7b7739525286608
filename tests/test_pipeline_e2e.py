"""The whole life of a (smoke-sized) model from ONE pipeline file, through every real component: local
S3 (SeaweedFS), the MLflow server, Ray, DeepSpeed (2 Ray Train workers, ZeRO-2), Ray Serve.

synth -> ingest train/val -> train tokenizer -> extract codes -> train AR -> evaluate tokenizer ->
register + gated promotion -> deploy; then an HTTP generate returns valid PNGs, and a re-run skips
every stage that is not volatile (ingest and deploy always run and change nothing)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from detailflow.platform.serving.testing import generate_png_from_endpoint

pytestmark = pytest.mark.integration


def _free_port() -> int:
    """The serve port of a pipeline's deploy stage (bound minutes later, by HAProxy)."""
    from detailflow.platform.serving.testing import free_port

    return free_port()


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-c", "from detailflow.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def pipeline_file(tmp_path):
    port = _free_port()
    body = f"""
    name: e2e-smoke
    stages:
      - name: data
        kind: synth
        params: {{out: {tmp_path}/shapes, size: 32, per_class: 8, val_per_class: 2, seed: 0}}
      - name: ingest-train
        kind: ingest
        params: {{src: "${{stages.data.path}}", name: e2e-shapes, split: train, local: true}}
      - name: ingest-val
        kind: ingest
        params: {{src: "${{stages.data.path}}", name: e2e-shapes, split: val, local: true}}
      - name: tokenizer
        kind: train-tokenizer
        params:
          config: configs/tokenizer-smoke.yaml
          overrides: {{dataset: "${{stages.ingest-train.name}}", steps: 4, checkpoint_every: 4, name: e2e,
                       dataset_version: "${{stages.ingest-train.version}}"}}
        resources: {{num_workers: 2, cpus_per_worker: 0.5}}
      - name: codes
        kind: extract-codes
        params: {{tokenizer: "${{stages.tokenizer.run_name}}", dataset: "${{stages.ingest-train.name}}"}}
      - name: ar
        kind: train-ar
        params:
          config: configs/ar-smoke.yaml
          overrides: {{tokenizer: "${{stages.codes.tokenizer}}", steps: 4, checkpoint_every: 4, name: e2e}}
          after: ["${{stages.codes.run}}"]
        resources: {{num_workers: 2, cpus_per_worker: 0.5}}
      - name: eval-tokenizer
        kind: evaluate-tokenizer
        params:
          overrides: {{tokenizer: "${{stages.tokenizer.run_name}}", dataset: e2e-shapes, split: val,
                       kid_subset_size: 10, kid_subsets: 5}}
      - name: promote
        kind: promote
        params:
          config: configs/promote-smoke.yaml
          overrides: {{name: e2e, ar: "${{stages.ar.run_name}}", eval_dataset: e2e-shapes, eval_samples: 20}}
      - name: deploy
        kind: deploy
        params: {{config: configs/serve-local.yaml, model: "${{stages.promote.model}}", port: {port},
                  after: ["${{stages.promote.champion}}"]}}
    """
    path = tmp_path / "e2e.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_one_pipeline_file_runs_the_whole_life_and_reruns_skip(services, storage, ray_session, pipeline_file):
    from mlflow.tracking import MlflowClient

    from detailflow.pipelines.runner.runner import read_state, run_pipeline
    from detailflow.pipelines.runner.spec import load_pipeline
    from detailflow.platform.export_store import export_content

    spec = load_pipeline(pipeline_file)
    try:
        summary = run_pipeline(spec, services)
        assert all(v["status"] == "ran" for v in summary.values()), summary
        out = {k: v["outputs"] for k, v in summary.items()}

        # S3: datasets and codes are published versions behind manifests; exports exist
        for split in ("train", "val"):
            m = storage.read_manifest(f"datasets/e2e-shapes/{split}")
            assert m["version"] == out[f"ingest-{split}"]["version"] and m["num_images"] > 0
            prefix = f"datasets/e2e-shapes/{split}/v-{m['version']}/"
            assert all(s["key"].startswith(prefix) for s in m["shards"])
        codes = storage.read_manifest(f"codes/{out['codes']['version']}/train")
        assert codes["num_rows"] == out["codes"]["num_rows"] > 0
        for stage in ("tokenizer", "ar"):
            assert export_content(storage, f"runs/{out[stage]['run_name']}/export")[0].startswith("exports/")

        # MLflow: a parent run with a child per stage; the champion alias on a registered version
        client = MlflowClient(services.mlflow_tracking_uri)
        exp = client.get_experiment_by_name("detailflow-pipelines")
        parent = client.search_runs([exp.experiment_id], "tags.`detailflow.pipeline` = 'e2e-smoke' and "
                                    "attributes.run_name LIKE 'pipeline-%'")[0]
        assert parent.info.status == "FINISHED"
        children = client.search_runs([exp.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        ran = sorted(c.data.tags["detailflow.stage"] for c in children)
        assert ran == sorted(st.name for st in spec.stages)
        assert out["promote"]["decision"] == "promoted"  # the first version: no champion yet
        champion = client.get_model_version_by_alias("e2e-generator", "champion")
        assert champion.version == out["promote"]["champion"]
        assert "metrics" in out["eval-tokenizer"] and out["eval-tokenizer"]["mlflow_run_id"]

        # lineage: the registered version names the dataset version, the code and both training runs
        from detailflow.pipelines.runner.identity import code_version_text

        tags = champion.tags
        assert tags["detailflow.lineage.dataset_version"] == out["ingest-train"]["version"]
        assert tags["detailflow.lineage.code_version"] == code_version_text()
        tok_run = client.get_run(tags["detailflow.lineage.tokenizer_run_id"])
        assert tok_run.info.run_name == out["tokenizer"]["run_name"]
        shown = _cli("registry", "show", f"e2e-generator/{champion.version}", timeout=120)
        assert shown.returncode == 0 and out["ingest-train"]["version"] in shown.stdout, shown.stderr
        print(shown.stdout)  # the closing note's `registry show`

        # HTTP: the deployed endpoint serves the champion as PNGs
        endpoint, img = generate_png_from_endpoint(services.state_dir)
        assert endpoint["url"] == out["deploy"]["url"]
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.std() > 0

        # a re-run skips everything that is not volatile (ingest/deploy run again and change nothing)
        again = run_pipeline(spec, services)
        statuses = {k: v["status"] for k, v in again.items()}
        assert {k for k, v in statuses.items() if v == "ran"} == {"ingest-train", "ingest-val", "deploy"}
        assert again["ingest-train"]["outputs"]["version"] == out["ingest-train"]["version"]
        assert read_state(storage, "e2e-smoke")["stages"]["ar"]["attempts"] == 1
    finally:
        _cli("serve", "down", timeout=120)
