"""The DetailFlow-16 recipe rehearsed in miniature (issue 18): configs/pipelines/rehearsal.yaml end to end on
the real local stack (SeaweedFS S3, MLflow, Ray, DeepSpeed, Ray Serve).

The weight files are written here as users have them: a SigLIP2 stand-in teacher as a torch.export
archive (.pt2, dynamic batch), perceptual and DINO stand-ins as TorchScript, and a vision tower in
SigLIP2's own key layout converted by `detailflow weights convert siglip2`, all on S3, named to the
pipeline by s3:// URI + sha256 through its variables (--set). The run trains the tokenizer in bf16
DeepSpeed engines on 2 Ray workers with grad accumulation 2, the GAN (hinge + LeCAM + CR, spectral-norm
heads) on from step 2; ten-crop codes; AR in bf16; both evaluations; registration, promotion and an
HTTP generate of the served champion returning PNGs.

Where it runs (issue 19): on the simulated KubeRay-shaped cluster (platform/cluster_sim.py: a 0-CPU
head running only this driver, two sim_gpu raylets, one CPU raylet), every stage with the resources a
cluster file declares (CLUSTER_RESOURCES): the training ranks, consolidation, extraction and both
evaluations must run on the "GPU" nodes, never the head. Serving is a local `detailflow serve up` (its
own Ray head), so the deploy stage runs after the cluster is left: the same pipeline again on the
local Ray, every stage skipped by identity, deploy serving the champion the cluster promoted."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from sim_cluster import module_cluster, placed_nodes
from test_pipeline_e2e import _cli, _free_port

from detailflow.platform.cluster_sim import SIM_GPU
from detailflow.platform.serving.testing import generate_png_from_endpoint

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "configs/pipelines/rehearsal.yaml"
RANKS = {"num_workers": 2, "cpus_per_worker": 0.5, "accelerator": {SIM_GPU: 1}}  # one rank per "GPU node"
PLACED = {"cpus": 1, "accelerator": {SIM_GPU: 1}}  # the stage's own task on a "GPU node"
CLUSTER_RESOURCES = {"tokenizer": RANKS, "ar": RANKS, "eval-tokenizer": PLACED, "codes": PLACED,
                     "promote": PLACED}  # as on a cluster (configs/pipelines/rehearsal.yaml's header)


class Teacher(nn.Module):
    """SigLIP2 stand-in: patch tokens B x C x L through two layers (mean-pooled by the align loss)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, stride=8)
        self.mix = nn.Conv1d(16, 24, 1)

    def forward(self, x):
        tok = self.embed(x).flatten(2)
        return [tok, self.mix(torch.tanh(tok))]


class Perceptual(nn.Module):
    """VGG16 stand-in: feature maps of a small conv stack."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        return [a, torch.relu(self.c2(a))]


class Dino(nn.Module):
    """DINO ViT-S/16 stand-in: patch-embedding tokens and one mixed layer, B x C x L."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 12, 4, stride=4)
        self.mix = nn.Conv1d(12, 12, 1)

    def forward(self, x):
        tok = self.embed(x).flatten(2)
        return [tok, tok + self.mix(torch.nn.functional.gelu(tok))]


def write_weight_files(storage, tmp_path: Path, prefix: str) -> dict[str, str]:
    """The four files on S3; returns the pipeline variables naming them (URI + sha256)."""
    from safetensors.torch import save_file
    from test_weights_siglip2 import synthetic_tower

    from detailflow.models.configs import get_model_config
    from detailflow.platform.weights import sha256_file

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    files = {}
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(Teacher().eval(), (x,), dynamic_shapes=({0: batch},)),
                      str(tmp_path / "siglip2-teacher.pt2"))
    files["teacher"] = tmp_path / "siglip2-teacher.pt2"
    for name, net in (("perceptual", Perceptual()), ("disc", Dino())):
        path = tmp_path / f"{name}.pt"
        torch.jit.save(torch.jit.trace(net.eval(), x), str(path))
        files[name] = path
    values = {}
    for name, path in files.items():
        key = f"{prefix}/{path.name}"
        storage.upload_file(path, key)
        values[f"{name}_uri"] = f"s3://{storage.bucket}/{key}"
        values[f"{name}_sha256"] = sha256_file(path)
    # the encoder init as users get it: SigLIP2's published key layout, converted by the CLI straight to S3
    tok = get_model_config("smoke").tokenizer
    tower = tmp_path / "siglip2-vision-tower.safetensors"
    save_file(synthetic_tower(tok, tok.enc_depth + 2), str(tower))
    uri = f"s3://{storage.bucket}/{prefix}/encoder-init.safetensors"
    res = _cli("weights", "convert", "siglip2", str(tower), uri, "--model", "smoke", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    values["encoder_init_uri"] = uri
    values["encoder_init_sha256"] = res.stdout.split("sha256 ")[1].split()[0]
    return values


def test_weight_files_fetched_from_s3_load_in_their_own_format(storage, tmp_path):
    """resolve_weights caches an s3:// file under its sha256: the cached name must keep the key's
    suffix, or the loaders (which tell .pt2 / .safetensors / TorchScript apart by it) read a .pt2
    teacher as TorchScript and a .safetensors encoder init with torch.load, and both fail."""
    import dataclasses

    from detailflow.models.configs import get_model_config
    from detailflow.models.tokenizer import DetailFlowTokenizer
    from detailflow.platform.weights import resolve_weights

    values = write_weight_files(storage, tmp_path, "tests/weights-format")
    cfg = dataclasses.replace(
        get_model_config("smoke").tokenizer, align_teacher="siglip2",
        **{f: values[v] for f, v in (("align_teacher_path", "teacher_uri"), ("disc_net_path", "disc_uri"),
                                     ("encoder_init_path", "encoder_init_uri"),
                                     ("align_teacher_sha256", "teacher_sha256"),
                                     ("disc_net_sha256", "disc_sha256"),
                                     ("encoder_init_sha256", "encoder_init_sha256"))})
    local = resolve_weights(cfg, storage, cache_dir=tmp_path / "cache")
    assert local.align_teacher_path.endswith(".pt2") and local.encoder_init_path.endswith(".safetensors")
    tok = DetailFlowTokenizer(local)  # loads the .pt2 teacher and the converted SigLIP2 encoder init
    assert tok.teacher.dim == 24  # Teacher's last feature width
    from safetensors.torch import load_file

    table = load_file(str(tmp_path / "siglip2-vision-tower.safetensors"))[
        "vision_model.embeddings.position_embedding.weight"]
    assert torch.equal(tok.encoder.pos_2d.detach().reshape(table.shape), table)


def _metric_history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _actor_nodes() -> list[tuple[str, str]]:
    """(actor class, node id) of every actor the cluster ran (the GCS actor table: this cluster has no
    dashboard, hence no task-event / state API)."""
    import ray

    return [(a["ActorClassName"], a["Address"]["NodeID"]) for a in ray._private.state.actors().values()]


def _assert_ran_on_gpu_nodes(sim, placed: dict[str, str], actors: list[tuple[str, str]]) -> None:
    """The stages' own work (consolidation, extraction, both evaluations) and the training ranks ran on
    the "GPU" nodes, never the head; the ranks of each training run one per "GPU" node."""
    print("[placement] stage work:", placed, "actors:", sorted(set(actors)), flush=True)
    wanted = {"consolidate": 1, "codes: extract-codes": 1, "eval-tokenizer: evaluate-tokenizer": 1,
              "promote: generator evaluation": 1}
    for what in wanted:
        nodes = [node for name, node in placed.items() if name.startswith(what)]
        assert nodes, (what, placed)
        assert all(n in sim.gpu_nodes for n in nodes), (what, nodes, sim.gpu_nodes)
    ranks = [node for cls, node in actors if cls == "RayTrainWorker"]
    assert len(ranks) == 4 and sorted(ranks) == sorted(2 * sim.gpu_nodes), ranks  # tokenizer + AR
    on_head = [cls for cls, node in actors if node == sim.head]
    assert "RayTrainWorker" not in on_head and not {"SamplingWorker", "MapWorker"} & set(on_head), on_head


def test_rehearsal_pipeline_runs_every_recipe_feature_end_to_end(services, storage, ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    from detailflow.pipelines.runner.runner import run_pipeline
    from detailflow.pipelines.runner.spec import load_pipeline

    variables = write_weight_files(storage, tmp_path, "tests/rehearsal/weights")
    variables.update(out=str(tmp_path / "data"), port=str(_free_port()))
    spec = load_pipeline(PIPELINE, variables=variables)
    spec = dataclasses.replace(spec, stages=[dataclasses.replace(s, resources=CLUSTER_RESOURCES.get(
        s.name, s.resources)) for s in spec.stages])
    assert spec.stages[-1].kind == "deploy"
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    try:
        with module_cluster(__name__) as sim:
            summary = run_pipeline(dataclasses.replace(spec, stages=spec.stages[:-1]), services, log=log)
            actors = _actor_nodes()
        assert all(v["status"] == "ran" for v in summary.values()), summary
        _assert_ran_on_gpu_nodes(sim, placed_nodes(lines), actors)
        out = {k: v["outputs"] for k, v in summary.items()}
        client = MlflowClient(services.mlflow_tracking_uri)

        # tokenizer: 2 ranks x micro-batch 2 x grad accumulation 2, bf16 engines, GAN on from step 2
        tok_run = client.search_runs([client.get_experiment_by_name("detailflow-tokenizer").experiment_id],
                                     f"attributes.run_name = '{out['tokenizer']['run_name']}'")[0]
        params = tok_run.data.params
        assert (params["world_size"], params["grad_accum"], params["global_batch"]) == ("2", "2", "8")
        assert params["precision"] == "bf16"
        logged = {key: _metric_history(client, tok_run.info.run_id, key)
                  for key in ("d_loss", "d_hinge", "d_lecam", "d_cr", "gan_g", "align", "perceptual")}
        for key, history in logged.items():
            assert all(math.isfinite(v) for v in history.values()), (key, history)
        steps = list(range(6))
        assert sorted(logged["align"]) == sorted(logged["d_loss"]) == steps, logged
        for key in ("d_hinge", "d_lecam", "d_cr", "gan_g"):  # the GAN's terms from disc_start = 2 on
            assert sorted(logged[key]) == steps[2:], (key, logged[key])
        assert all(logged["d_loss"][s] == 0 for s in (0, 1)), logged["d_loss"]
        assert all(logged["d_loss"][s] > 0 for s in steps[2:]), logged["d_loss"]
        assert sorted(logged["perceptual"]) == steps[1:], logged["perceptual"]  # warm-up weight 0 at step 0
        # the spectral-norm discriminator trained in its bf16 engine: bf16 weights, fp32 power-iteration
        # vectors and LeCAM EMAs (moved off their zero init) in the last checkpoint DeepSpeed wrote
        run = out["tokenizer"]["run_name"]
        key = max(k for k in storage.list_keys(f"runs/{run}/")
                  if k.endswith("disc/mp_rank_00_model_states.pt"))
        disc = torch.load(io.BytesIO(storage.get_bytes(key)), weights_only=True)["module"]
        heads = [k for k in disc if k.endswith("parametrizations.weight.original")]
        assert heads and all(disc[k].dtype == torch.bfloat16 for k in heads), heads
        vectors = [k for k in disc if k.endswith(("._u", "._v"))]
        assert len(vectors) == 2 * len(heads) and all(disc[k].dtype == torch.float32 for k in vectors)
        for k in ("disc.ema_real", "disc.ema_fake"):
            assert disc[k].dtype == torch.float32 and disc[k] != 0 and torch.isfinite(disc[k]), k

        # AR: the same recipe contract (bf16 engines, 2 ranks x micro-batch 4 x grad accumulation 2)
        ar_run = client.search_runs([client.get_experiment_by_name("detailflow-ar").experiment_id],
                                    f"attributes.run_name = '{out['ar']['run_name']}'")[0]
        ar = ar_run.data.params
        want = {"world_size": "2", "grad_accum": "2", "global_batch": "16", "precision": "bf16"}
        assert {k: ar[k] for k in want} == want
        # codes: ten crops of every training image
        assert out["codes"]["num_rows"] == 10 * out["ingest-train"]["num_images"]
        # both evaluations ran and the generator evaluation gated the registration
        assert math.isfinite(out["eval-tokenizer"]["metrics"]["rfid"])
        assert out["promote"]["decision"] == "promoted"
        champion = client.get_model_version_by_alias("rehearsal-generator", "champion")
        assert champion.version == out["promote"]["champion"]

        # serving, on the local Ray: the same pipeline again; only the volatile kinds (ingest, deploy) run
        served = run_pipeline(spec, services)
        assert {k for k, v in served.items() if v["status"] == "ran"} == {
            "ingest-train", "ingest-val", "deploy"}, served
        assert served["deploy"]["outputs"]["model"] == out["promote"]["model"]
        # the champion answers an HTTP generate with PNGs
        endpoint, img = generate_png_from_endpoint(services.state_dir)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.std() > 0
    finally:
        _cli("serve", "down", timeout=120)


def test_resume_at_another_world_size_refuses_before_step_0_in_the_real_loop(services, storage, ray_session):
    """Issue 18 item 4 in the real Ray Train loop: a run resubmitted (same run name: num_workers is an
    execution field) on 1 worker after 2 wrote its checkpoint stops before any step or shard load,
    naming both worker counts, and its MLflow run gains no step."""
    import ray.cloudpickle
    import test_train_distributed as td
    from ray.train.v2.api.exceptions import TrainingFailedError

    from detailflow.platform.tracking import ERROR_TAG

    ray.cloudpickle.register_pickle_by_value(td)  # the workers cannot import tests/
    cfg = td.ToyStageConfig(tag="world-change", steps=2, checkpoint_every=2)
    name, _ = td._run(services, cfg, num_workers=2)
    client, runs = td._mlflow_run(services, name)
    run_id = runs[0].info.run_id
    losses = lambda: [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]  # noqa: E731
    before = losses()
    with pytest.raises(TrainingFailedError) as failed:
        td._run(services, cfg, num_workers=1)
    _, runs_1 = td._mlflow_run(services, name)
    assert [r.info.run_id for r in runs_1] == [run_id]
    said = str(failed.value) + runs_1[0].data.tags.get(ERROR_TAG, "")
    assert "saved by 2 workers but this run has 1" in said, said[-2000:]
    assert losses() == before and before
    assert not client.get_metric_history(run_id, "resumed_from_step")
