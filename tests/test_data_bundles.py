"""The production pipelines' training ranks: each rank's placement-group bundle carries its reader
CPUs (issue 19 item 2), its decode processes have a reserved CPU each, and a GPU node's ranks fit
the GPU worker pod the KubeRay manifests request on the documented node type (platform/kuberay.py).

The bundle is resolved the way the pipeline runner resolves it (the stage's config file, the
pipeline's overrides and resources: runner/stages.py) and built by the function launch uses
(raytrain.worker_resources)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from detailflow.models.configs import WEIGHT_FILES
from detailflow.pipelines.runner import stages
from detailflow.platform import kuberay, raytrain

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ["detailflow-16", "detailflow-32", "detailflow-64"]


def _training_stages(pipeline: str) -> list[dict]:
    spec = yaml.safe_load((ROOT / "configs" / "pipelines" / f"{pipeline}.yaml").read_text())
    return [s for s in spec["stages"] if s["kind"] in ("train-tokenizer", "train-ar")]


def _resolved(stage: dict):
    """The stage config the runner builds for this stage (weights named by s3:// URIs, which load
    without being read, so the recipe's validation passes)."""
    from detailflow.pipelines.train.ar import ARStageConfig
    from detailflow.pipelines.train.tokenizer import TokenizerStageConfig

    cls = TokenizerStageConfig if stage["kind"] == "train-tokenizer" else ARStageConfig
    params = dict(stage["params"])
    if cls is TokenizerStageConfig:
        params["overrides"] = {**params.get("overrides", {}),
                               "model_overrides": {f: f"s3://w/{f}.pt2" for f in WEIGHT_FILES}}
    ctx = stages.StageContext(settings=None, pipeline="p", stage=stage["name"], identity="i",
                              resources=stage.get("resources") or {})
    cwd = Path.cwd()
    try:  # the pipeline names its config files relative to the repository root
        os.chdir(ROOT)
        return stages._stage_config(cls, params, ctx, stages._training_resources(ctx))
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_rank_bundles_carry_reader_cpus_and_fit_the_gpu_pod(pipeline):
    spec = kuberay.ClusterSpec()
    node = kuberay.NODE_TYPES[spec.gpu_node_type]
    pod_cpu, pod_gpus = float(spec.worker_cpu), spec.gpus_per_worker
    assert pod_cpu <= node.cpu - node.reserved_cpu and pod_gpus <= node.gpus
    found = set()
    for stage in _training_stages(pipeline):
        cfg = _resolved(stage)
        found.add(stage["kind"])
        bundle = raytrain.worker_resources(use_gpu=cfg.device == "cuda", cpus_per_worker=cfg.cpus_per_worker,
                                           reader_cpus=cfg.reader_cpus)
        where = f"{pipeline}/{stage['name']}"
        assert cfg.reader_cpus > 0, f"{where}: no reader CPUs reserved in the rank's bundle"
        assert bundle == {"CPU": cfg.cpus_per_worker + cfg.reader_cpus, "GPU": 1}, where
        ranks_per_pod = pod_gpus // bundle["GPU"]
        # every GPU of the pod is a rank: their bundles must all fit its CPUs, with room for Ray
        # Train's controller (1 CPU) beside them
        assert ranks_per_pod * bundle["CPU"] + 1 <= pod_cpu, (
            f"{where}: {ranks_per_pod} ranks x {bundle['CPU']} CPUs do not fit the {pod_cpu:g}-CPU GPU pod "
            f"on {spec.gpu_node_type}")
        if stage["kind"] == "train-tokenizer":  # one decode process per reserved reader CPU
            assert cfg.reader_tasks == cfg.reader_cpus, (where, cfg.reader_tasks, cfg.reader_cpus)
    assert found == {"train-tokenizer", "train-ar"}


STAGE_CONFIGS = [f"{kind}-detailflow-{n}" for kind in ("tokenizer", "ar") for n in (16, 32, 64)]


@pytest.mark.parametrize("name", STAGE_CONFIGS)
def test_production_stage_configs_reserve_reader_cpus(name):
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    assert cfg.get("reader_cpus", 0) > 0, f"configs/{name}.yaml reserves no reader CPUs"
    spec = kuberay.ClusterSpec()
    assert spec.gpus_per_worker * (cfg["cpus_per_worker"] + cfg["reader_cpus"]) + 1 <= float(spec.worker_cpu)
