"""Where the pipeline's own stage work runs on a KubeRay-shaped cluster (platform/cluster_sim.py: a
0-CPU head, two sim_gpu raylets, one CPU raylet): the tokenizer evaluation, the extraction driver and
the generator evaluation (its ADM .npz written there) run through the stage kinds (runner/stages.py)
with resources {cpus: 1, accelerator: {sim_gpu: 1}}, the real functions on tiny models. Each reports
the node it ran on, read inside the process that ran it (platform.placement): a "GPU" worker node,
never the head where the pipeline driver (this process) runs. Before placement these ran in the
driver: the head's node id. Consolidation and node loss: tests/test_node_loss.py."""

from __future__ import annotations

import dataclasses

import pytest
from sim_cluster import module_cluster, placed_nodes

from detailflow.platform.cluster_sim import SIM_GPU

pytestmark = pytest.mark.integration
DATASET = "placed-shapes"
RESOURCES = {"cpus": 1, "accelerator": {SIM_GPU: 1}}  # what a stage yaml declares


@pytest.fixture(scope="module")
def sim(services):
    with module_cluster(__name__) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def exports(sim, storage, tmp_path_factory):
    """A tiny train/val dataset and untrained smoke tokenizer + AR exports (the AR names the tokenizer)."""
    import torch

    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import get_model_config
    from detailflow.models.tokenizer import DetailFlowTokenizer
    from detailflow.pipelines.data import synth
    from detailflow.pipelines.data.ingest import IngestConfig, ingest
    from detailflow.pipelines.train.exports import export_prefix
    from detailflow.platform.checkpoints import uploaded_export

    root = tmp_path_factory.mktemp("placed-shapes")
    synth.write_folder(root, size=32, per_class=1, val_per_class=1, seed=0)  # 10 + 10 images
    for split in ("train", "val"):
        ingest(storage, str(root), IngestConfig(name=DATASET, split=split, shard_mb=0.05, use_ray=False))
    cfg = get_model_config("smoke")
    torch.manual_seed(0)
    tok, ar = "tokenizer-placed", "ar-placed"
    with uploaded_export(storage, DetailFlowTokenizer(cfg.tokenizer).eval(), {
            "kind": "tokenizer", "model": "smoke", "tokenizer": dataclasses.asdict(cfg.tokenizer)},
            export_prefix(tok)):
        pass
    with uploaded_export(storage, DetailFlowGPT(cfg.ar).eval(), {
            "kind": "ar", "model": "smoke", "tokenizer": storage.uri(export_prefix(tok)),
            "ar": dataclasses.asdict(cfg.ar)}, export_prefix(ar)):
        pass
    return {"tokenizer": tok, "ar": ar}


def _run_stage(services, kind: str, params: dict) -> tuple[dict, str]:
    """Run one stage kind as the pipeline runner does; returns its outputs and the node it ran on."""
    from detailflow.pipelines.runner.stages import KINDS, StageContext

    lines: list[str] = []
    ctx = StageContext(services, "placement-test", kind, f"id-{kind}", dict(RESOURCES), lines.append)
    out = KINDS[kind].fn(params, ctx)
    nodes = placed_nodes(lines)
    assert len(nodes) == 1, lines  # one placed piece of work per stage
    return out, next(iter(nodes.values()))


def test_evaluation_and_extraction_run_on_gpu_workers_never_the_head(sim, services, storage, exports):
    import ray

    from detailflow.pipelines.data.codes import codes_prefix

    driver = ray.get_runtime_context().get_node_id()
    assert driver == sim.head  # the pipeline driver runs on the head (0 CPUs, no "GPU")
    ev, ev_node = _run_stage(services, "evaluate-tokenizer", {"overrides": {
        "tokenizer": exports["tokenizer"], "dataset": DATASET, "split": "val", "rfid": False,
        "micro_batch": 8}})
    codes, ex_node = _run_stage(services, "extract-codes", {
        "tokenizer": exports["tokenizer"], "dataset": DATASET, "split": "train", "batch_size": 8,
        "cpus_per_actor": 0.5, "cpus_per_task": 0.25, "version": "placed-codes"})
    gen, gen_node = _run_stage(services, "evaluate-generator", {"overrides": {
        "ar": exports["ar"], "dataset": DATASET, "split": "val", "n": 4, "chunk_size": 2, "num_actors": 1,
        "cpus_per_actor": 0.5, "kid_subsets": 2, "kid_subset_size": 2, "nll_split": "",
        "micro_batch": 8, "write_npz": True}})
    alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    for what, node in (("evaluate-tokenizer", ev_node), ("extract-codes", ex_node),
                       ("evaluate-generator", gen_node)):
        assert node != sim.head, f"{what} ran on the head"
        assert node in sim.gpu_nodes and alive[node]["Resources"].get(SIM_GPU) == 1, (what, node)
    # the work really happened there: results, codes and the ADM .npz the generator evaluation wrote
    assert ev["metrics"]["n_images"] == 10 and 0 < ev["metrics"]["codebook_usage"] <= 1
    assert codes["num_rows"] == 10 * 4  # tiny views: 4 per image
    assert storage.read_manifest(codes_prefix("placed-codes", "train"))["num_rows"] == 40
    from mlflow.tracking import MlflowClient

    client = MlflowClient(services.mlflow_tracking_uri)
    assert gen["metrics"]["n"] == 4
    assert "samples/samples.npz" in {a.path for a in client.list_artifacts(gen["mlflow_run_id"], "samples")}
