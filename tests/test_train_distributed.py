"""Integration tests of the distributed-training glue on the REAL local services (SeaweedFS S3, MLflow,
Ray): 2 CPU workers, DeepSpeed ZeRO-2/3 over gloo, checkpoints in S3, MLflow from rank 0, resume after
a killed worker, consolidated export.

The model here is a deliberately tiny stand-in (the glue is what is under test); the real stage
loops are exercised in tests/test_train_stages.py.
"""

from __future__ import annotations

import dataclasses
import io
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from detailflow.pipelines.loop_common import StepAdapter, WorkerContext, resolved_config, stage_from_config
from detailflow.pipelines.stage_config import run_name
from detailflow.platform import checkpoints, raytrain
from detailflow.platform import deepspeed_glue as dsg

pytestmark = pytest.mark.integration


@dataclass
class ToyStageConfig:
    name: str = "toy"  # config name
    steps: int = 6  # optimiser steps
    lr: float = 1e-2  # peak lr
    micro_batch: int = 4  # per worker
    grad_accum: int = 1  # accumulation steps
    grad_clip: float = 1.0  # clipping norm
    zero_stage: int = 2  # ZeRO stage
    precision: str = "auto"  # auto | fp32 | bf16
    device: str = "cpu"  # cpu | cuda | auto
    checkpoint_every: int = 2  # steps between checkpoints
    seed: int = 0  # init seed (same on all ranks)
    fail_at_step: int = -1  # fault injection step (rank 1, first attempt)
    fail_marker: str = ""  # marker file making the failure one-shot
    tag: str = ""  # distinguishes test runs


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.out = nn.Linear(16, 1)

    def loss(self, x, y):
        return nn.functional.mse_loss(self.out(torch.tanh(self.inp(x))), y)


def toy_loop(config: dict) -> None:
    import deepspeed
    from PIL import Image
    from safetensors.torch import save

    cfg = stage_from_config(ToyStageConfig, config)
    ctx = WorkerContext.from_ray(config, cfg)
    torch.manual_seed(cfg.seed)
    model = Toy()
    engine = ctx.engine(StepAdapter(model, "loss"), dsg.make_optimizer(model.parameters(), lr=cfg.lr), cfg)
    state = ctx.restore({"ds": engine}, config)
    resolved = resolved_config(config)
    tracker = ctx.tracker("toy", resolved, state)
    start = state.get("step", 0)
    if start:
        tracker.log_metrics({"resumed_from_step": start}, step=start)
    gen = torch.Generator().manual_seed(1000 * ctx.rank + start)
    for step in range(start, cfg.steps):
        ctx.maybe_fail(cfg, step)
        x = torch.randn(cfg.micro_batch, 8, generator=gen)
        lr = dsg.tokenizer_lr(step, total_steps=cfg.steps, base_lr=cfg.lr, warmup_steps=2)
        dsg.set_lr(engine.optimizer, lr)
        loss = engine(x, x.sum(1, keepdim=True))
        engine.backward(loss)
        engine.step()
        norm = engine.get_global_grad_norm() or 0.0
        tracker.log_metrics({"loss": loss.item(), "lr": lr, "grad_norm": norm},
                            step=step)
        if ctx.due(step, cfg.checkpoint_every, cfg.steps):
            ctx.checkpoint({"ds": engine}, {"loss": loss.item()}, step=step + 1, tracker=tracker,
                           resolved=resolved)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    tracker.log_png(buf.getvalue(), "samples/toy.png")
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.zero_stage == 3):
        gathered = {k: v.detach().float().clone() for k, v in engine.module.model.state_dict().items()}
    if ctx.rank == 0:
        from detailflow.platform.storage import Storage

        Storage(ctx.settings).put_bytes(f"runs/{ctx.run_name}/debug/gathered.safetensors", save(gathered))
    tracker.finish()


@pytest.fixture(scope="module", autouse=True)
def _pickle_by_value():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _run(services, cfg: ToyStageConfig, num_workers: int = 2, max_failures: int = 0):
    resolved = dataclasses.asdict(cfg)
    name = run_name("toy", cfg.name, None, resolved)
    result = raytrain.launch(toy_loop, resolved, services, run_name=name, num_workers=num_workers,
                             cpus_per_worker=0.5, max_failures=max_failures, num_to_keep=2)
    return name, result


def _mlflow_run(services, name):
    from mlflow.tracking import MlflowClient

    from detailflow.platform.tracking import RUN_NAME_TAG

    client = MlflowClient(services.mlflow_tracking_uri)
    exp = client.get_experiment_by_name("toy")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    return client, runs


def test_zero3_export_equals_gathered_weights(services, storage, ray_session):
    from safetensors.torch import load, load_file

    cfg = ToyStageConfig(zero_stage=3, tag="z3", steps=4)
    name, result = _run(services, cfg)
    keys = storage.list_keys(f"runs/{name}/checkpoint_")
    assert any("zero_pp_rank_1_mp_rank_00_model_states.pt" in k for k in keys)  # params really partitioned
    uri = checkpoints.export_consolidated(result.checkpoint, Toy, {"kind": "toy"}, storage,
                                          f"runs/{name}/export")
    assert uri == storage.uri(f"runs/{name}/export")
    gathered = load(storage.get_bytes(f"runs/{name}/debug/gathered.safetensors"))
    local = services.state_dir / "toy-export.safetensors"
    storage.download_file(f"runs/{name}/export/model.safetensors", local)
    exported = load_file(local)
    assert set(exported) == set(gathered) and len(exported) == 4
    for k in gathered:
        torch.testing.assert_close(exported[k], gathered[k], rtol=0, atol=0)
    assert storage.exists(f"runs/{name}/export/config.json")


def test_zero2_worker_killed_resumes_from_s3_same_mlflow_run(services, storage, ray_session, tmp_path):
    marker = tmp_path / "failed-once"
    cfg = ToyStageConfig(zero_stage=2, tag="fault", steps=6, checkpoint_every=2, fail_at_step=3,
                         fail_marker=str(marker))
    name, result = _run(services, cfg, max_failures=2)
    assert marker.exists()  # rank 1 really exited at step 3 on the first attempt
    keys = storage.list_keys(f"runs/{name}/checkpoint_")
    assert any(k.endswith("ds/zero_pp_rank_1_mp_rank_00_optim_states.pt") for k in keys), keys
    state = checkpoints.read_client_state(result.checkpoint)
    assert state["step"] == cfg.steps and state["config"]["zero_stage"] == 2
    client, runs = _mlflow_run(services, name)
    assert len(runs) == 1  # the retry logged to the same run
    run = runs[0]
    assert run.info.run_id == state["mlflow_run_id"]
    assert run.data.params["zero_stage"] == "2" and run.data.params["tag"] == "fault"
    resumed = client.get_metric_history(run.info.run_id, "resumed_from_step")
    assert [m.value for m in resumed] == [2.0]  # last checkpoint before the crash was after step 2
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps[-1] == cfg.steps - 1 and set(range(cfg.steps)) <= set(steps)
    assert run.info.status == "FINISHED"
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert "samples/toy.png" in arts


def test_in_process_mode_checkpoints_and_resubmission_resumes(services, storage, ray_session):
    cfg = ToyStageConfig(zero_stage=0, tag="local", steps=3, checkpoint_every=1)
    name, _ = _run(services, cfg, num_workers=0)
    first = raytrain.latest_checkpoint(services, name)
    assert checkpoints.read_client_state(first)["step"] == 3
    # Resubmitting the identical (deterministically named) job finds step 3 and has nothing to redo.
    name2, _ = _run(services, cfg, num_workers=0)
    assert name2 == name
    client, runs = _mlflow_run(services, name)
    assert len(runs) == 1
    assert [m.value for m in client.get_metric_history(runs[0].info.run_id, "resumed_from_step")] == [3.0]
