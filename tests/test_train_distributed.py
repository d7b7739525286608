"""Integration tests of the distributed-training glue on the REAL local services (SeaweedFS S3, MLflow,
Ray): 2 CPU workers, DeepSpeed ZeRO-2/3 over gloo, checkpoints in S3, MLflow from rank 0, resume after
a killed worker, consolidated export.

The model here is a deliberately tiny stand-in (the glue is what is under test); the real stage
loops are exercised in tests/test_train_stages.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from dataclasses import dataclass

import pytest
import torch
from mlflow_runs import runs_named
from torch import nn

from detailflow.models.ema import ShardedEMA
from detailflow.pipelines.train.loop_common import (
    StepAdapter,
    WorkerContext,
    resolved_config,
    stage_from_config,
)
from detailflow.pipelines.train.stage_config import run_name
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
    ema_decay: float = 0.0  # > 0: keep a ShardedEMA and an independent reference EMA (rank 0)


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
    rank_losses = {}
    ema = ShardedEMA(dsg.master_fragments(engine), cfg.ema_decay) if cfg.ema_decay else None
    ref = ref_bf16 = _full_masters(engine) if ema else None  # the reference, from DeepSpeed's own gather
    for step in range(start, cfg.steps):
        ctx.maybe_fail(cfg, step)
        x = torch.randn(cfg.micro_batch, 8, generator=gen)
        lr = dsg.tokenizer_lr(step, total_steps=cfg.steps, base_lr=cfg.lr, warmup_steps=2)
        dsg.set_lr(engine.optimizer, lr)
        x = x.to(dsg.engine_dtype(engine))  # a bf16 engine holds bf16 params
        loss = engine(x, x.sum(1, keepdim=True))
        engine.backward(loss)
        engine.step()
        if ema is not None:
            ema.update(dsg.master_fragments(engine))  # local: this rank's fp32 pieces only
            d = cfg.ema_decay  # reference EMAs of the whole fp32 masters and of the (bf16) module params
            ref = {k: d * v + (1 - d) * w for (k, v), w in zip(ref.items(), _full_masters(engine).values(),
                                                                  strict=True)}
            ref_bf16 = {k: d * v + (1 - d) * w for (k, v), w in zip(ref_bf16.items(),
                                                                      _full_params(engine, cfg).values(),
                                                                      strict=True)}
        norm = engine.get_global_grad_norm() or 0.0
        rank_losses[step] = loss.item()  # each rank draws its own data, so the losses differ
        tracker.log_metrics(dsg.mean_over_ranks({"loss": loss.item(), "lr": lr, "grad_norm": norm}),
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
    from detailflow.platform.storage import Storage

    debug = f"runs/{ctx.run_name}/debug"
    if ema is not None:
        sharded = dsg.gather_fragments(ema.fragments_of_shadow(), ctx.device)  # all ranks
        if ctx.rank == 0:
            for tag, state in (("sharded", sharded), ("reference", ref), ("bf16_params", ref_bf16)):
                Storage(ctx.settings).put_bytes(f"{debug}/ema_{tag}.safetensors",
                                                save({k: v.contiguous() for k, v in state.items()}))
    Storage(ctx.settings).put_bytes(f"{debug}/losses-rank{ctx.rank}.json", json.dumps(rank_losses).encode())
    if ctx.rank == 0:
        Storage(ctx.settings).put_bytes(f"{debug}/gathered.safetensors", save(gathered))
    tracker.finish()


def _full_masters(engine) -> dict:
    """Whole fp32 master weights by DeepSpeed's own assembly (all ranks call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name.removeprefix("model.")] = (p.detach() if full is None else full).float().cpu().clone()
    return out


def _full_params(engine, cfg) -> dict:
    """The module's own (bf16 under bf16) parameters, gathered under ZeRO-3, as float."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.zero_stage == 3):
        return {k.removeprefix("model."): p.detach().float().cpu().clone()
                for k, p in engine.module.named_parameters()}


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
    return runs_named(services.mlflow_tracking_uri, "toy", name)


def test_zero3_export_equals_gathered_weights(services, storage, ray_session):
    from safetensors.torch import load, load_file

    from detailflow.pipelines.train.exports import download_export

    cfg = ToyStageConfig(zero_stage=3, tag="z3", steps=4)
    name, result = _run(services, cfg)
    keys = storage.list_keys(f"runs/{name}/checkpoint_")
    assert any("zero_pp_rank_1_mp_rank_00_model_states.pt" in k for k in keys)  # params really partitioned
    uri = checkpoints.export_consolidated(result.checkpoint, Toy, {"kind": "toy"}, storage,
                                          f"runs/{name}/export")
    assert uri == storage.uri(f"runs/{name}/export")
    gathered = load(storage.get_bytes(f"runs/{name}/debug/gathered.safetensors"))
    local = download_export(storage, f"runs/{name}/export", services.state_dir / "toy-export")
    exported = load_file(local / "model.safetensors")
    assert set(exported) == set(gathered) and len(exported) == 4
    for k in gathered:
        torch.testing.assert_close(exported[k], gathered[k], rtol=0, atol=0)
    assert (local / "config.json").is_file()
    # Each rank wrote its completion marker into the final checkpoint, listing its own shard.
    final = result.checkpoint.path.split("/", 1)[1]  # bucket/key -> key
    for rank in (0, 1):
        marker = json.loads(storage.get_bytes(f"{final}/{checkpoints.marker_name(rank)}"))
        assert marker["world_size"] == 2 and marker["step"] == cfg.steps
        assert f"ds/zero_pp_rank_{rank}_mp_rank_00_model_states.pt" in marker["files"]
    # MLflow: the logged loss is the mean of the two ranks' losses, not rank 0's.
    client, runs = _mlflow_run(services, name)
    run_id = runs[0].info.run_id
    per_rank = [json.loads(storage.get_bytes(f"runs/{name}/debug/losses-rank{r}.json")) for r in (0, 1)]
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert sorted(logged) == list(range(cfg.steps))
    for step in range(cfg.steps):
        a, b = per_rank[0][str(step)], per_rank[1][str(step)]
        assert a != pytest.approx(b)  # the ranks really differ, so rank 0's alone would fail below
        assert logged[step] == pytest.approx((a + b) / 2, rel=1e-6)
    # Every reported checkpoint is on the run as an MLflow logged model: URI, step, metrics.
    from detailflow.platform.tracking import list_checkpoints

    recorded = list_checkpoints(client, run_id)
    assert [c["step"] for c in recorded] == [2, 4]
    assert recorded[-1]["uri"] == f"s3://{result.checkpoint.path}"
    assert recorded[-1]["metrics"]["loss"] == pytest.approx(logged[cfg.steps - 1], rel=1e-6)
    tags = client.get_run(run_id).data.tags
    assert tags["detailflow.checkpoint.latest_uri"] == recorded[-1]["uri"]
    assert tags["detailflow.checkpoint.latest_step"] == str(cfg.steps)


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


def test_crashed_run_ends_failed_and_resubmission_through_ray_resumes(services, storage, ray_session,
                                                                      tmp_path):
    from detailflow.platform.tracking import ERROR_TAG, PREVIOUS_ERROR_TAG, list_checkpoints

    marker = tmp_path / "crash-once"
    cfg = ToyStageConfig(zero_stage=2, tag="resubmit", steps=6, checkpoint_every=2, fail_at_step=3,
                         fail_marker=str(marker))
    from ray.train.v2.api.exceptions import TrainingFailedError

    with pytest.raises(TrainingFailedError):  # no retries left: rank 1's exit at step 3 fails the fit
        _run(services, cfg, max_failures=0)
    assert marker.exists()
    name = run_name("toy", cfg.name, None, dataclasses.asdict(cfg))
    client, runs = _mlflow_run(services, name)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].data.tags[ERROR_TAG]  # the error text is on the run
    run_id = runs[0].info.run_id
    shown = _cli_checkpoints(name)  # what a user sees: FAILED, the error, the checkpoint it resumes from
    assert shown["status"] == "FAILED" and shown["run_id"] == run_id
    assert shown["error"] == runs[0].data.tags[ERROR_TAG]
    assert [c["step"] for c in shown["checkpoints"]] == [2]

    # Resubmitting the same job through Ray (the marker file stops the crash) resumes from step 2.
    name2, result = _run(services, cfg, max_failures=0)
    assert name2 == name
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert ERROR_TAG not in run.data.tags and run.data.tags[PREVIOUS_ERROR_TAG]
    assert [m.value for m in client.get_metric_history(run_id, "resumed_from_step")] == [2.0]
    assert checkpoints.read_client_state(result.checkpoint)["step"] == cfg.steps

    # Resubmitting the finished run resumes at its end: the same MLflow run, nothing trained again.
    losses_before = len(client.get_metric_history(run_id, "loss"))
    _run(services, cfg, max_failures=0)
    assert len(_mlflow_run(services, name)[1]) == 1
    assert [m.value for m in client.get_metric_history(run_id, "resumed_from_step")] == [2.0, 6.0]
    assert len(client.get_metric_history(run_id, "loss")) == losses_before
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [c["step"] for c in list_checkpoints(client, run_id)] == [2, 4, 6]
    shown = _cli_checkpoints(name)
    assert shown["status"] == "FINISHED" and shown["error"] is None
    assert [c["step"] for c in shown["checkpoints"]] == [2, 4, 6]
    assert shown["checkpoints"][-1]["uri"] == f"s3://{result.checkpoint.path}"
    assert shown["url"].endswith(f"/runs/{run_id}")


def _cli_checkpoints(name: str) -> dict:
    """`detailflow train checkpoints NAME --json` (settings from the env the services fixture exports)."""
    from click.testing import CliRunner

    from detailflow.cli import main

    r = CliRunner().invoke(main, ["train", "checkpoints", name, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def _write_checkpoint(storage, fs, dest: str, step: int, world: int = 2) -> None:
    """A checkpoint as the ranks upload it: each rank's own files, then its marker."""
    for rank in range(world):
        local = storage.settings.state_dir / f"ckpt-src-{dest.replace('/', '_')}-{rank}"
        (local / "ds").mkdir(parents=True, exist_ok=True)
        (local / "ds" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes(1000 + rank))
        if rank == 0:
            (local / checkpoints.CLIENT_STATE_FILE).write_text(json.dumps({"step": step, "run": "x"}))
            (local / "ds" / "mp_rank_00_model_states.pt").write_bytes(bytes(5 * 2**20))  # the big one
        checkpoints.upload_with_marker(str(local), dest, fs, rank=rank, world=world, step=step)


def test_storage_scan_accepts_only_checkpoints_every_rank_completed(services, storage):
    fs = storage.filesystem()
    base, run = f"{services.s3_bucket}/runs", "scan-test-run"
    key = lambda folder: f"runs/{run}/{folder}"  # noqa: E731
    for folder, step in [("a", 2), ("b", 4), ("c", 6), ("d", 8)]:
        _write_checkpoint(storage, fs, f"{base}/{run}/{folder}", step)
    storage.delete_prefix(f"{key('b')}/{checkpoints.marker_name(1)}")  # rank 1 died before its marker
    storage.delete_prefix(f"{key('c')}/ds/zero_pp_rank_1_optim_states.pt")  # marker kept, shard gone
    storage.put_bytes(f"{key('d')}/ds/zero_pp_rank_0_optim_states.pt", b"short")  # size != the marker's
    assert [s for s, _ in checkpoints.complete_checkpoints(fs, base, run)] == [2]
    assert checkpoints.find_latest(fs, base, run).path == f"{base}/{run}/a"
    _write_checkpoint(storage, fs, f"{base}/{run}/e", 10, world=3)
    storage.delete_prefix(f"{key('e')}/{checkpoints.marker_name(2)}")  # 2 of 3 ranks is not enough
    assert checkpoints.find_latest(fs, base, run).path == f"{base}/{run}/a"
    _write_checkpoint(storage, fs, f"{base}/{run}/f", 12)
    assert checkpoints.find_latest(fs, base, run).path == f"{base}/{run}/f"
    assert checkpoints.find_latest(fs, base, "no-such-run") is None


class _RecordingFS:
    """A pyarrow FileSystemHandler over the real S3 filesystem that records what is opened for reading."""

    def __new__(cls, inner):
        import pyarrow.fs as pafs

        class Handler(pafs.FileSystemHandler):
            def __init__(self):
                self.opened: list[str] = []

            def get_type_name(self):
                return "recording"

            def normalize_path(self, path):
                return inner.normalize_path(path)

            def get_file_info(self, paths):
                return inner.get_file_info(paths)

            def get_file_info_selector(self, selector):
                return inner.get_file_info(selector)

            def create_dir(self, path, recursive):
                inner.create_dir(path, recursive=recursive)

            def delete_dir(self, path):
                inner.delete_dir(path)

            def delete_dir_contents(self, path, missing_dir_ok=False):
                inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

            def delete_root_dir_contents(self):
                raise NotImplementedError

            def delete_file(self, path):
                inner.delete_file(path)

            def move(self, src, dest):
                inner.move(src, dest)

            def copy_file(self, src, dest):
                inner.copy_file(src, dest)

            def open_input_stream(self, path):
                self.opened.append(path)
                return inner.open_input_stream(path)

            def open_input_file(self, path):
                self.opened.append(path)
                return inner.open_input_file(path)

            def open_output_stream(self, path, metadata):
                return inner.open_output_stream(path, metadata=metadata)

            def open_append_stream(self, path, metadata):
                raise NotImplementedError

            def equals(self, other):
                return self is other

        return Handler()


def test_driver_reads_run_state_without_downloading_shards(services, storage):
    import pyarrow.fs as pafs

    base, run = f"{services.s3_bucket}/runs", "state-read-run"
    _write_checkpoint(storage, storage.filesystem(), f"{base}/{run}/only", 7)
    handler = _RecordingFS(storage.filesystem())
    fs = pafs.PyFileSystem(handler)
    ckpt = checkpoints.find_latest(fs, base, run)  # the driver's scan at submit time
    assert checkpoints.read_client_state(ckpt) == {"step": 7, "run": "x"}
    folder = f"{base}/{run}/only"
    assert sorted(handler.opened) == sorted([f"{folder}/{checkpoints.marker_name(0)}",
                                             f"{folder}/{checkpoints.marker_name(1)}",
                                             f"{folder}/{checkpoints.CLIENT_STATE_FILE}"])


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_sharded_ema_follows_the_fp32_masters(services, storage, ray_session, zero_stage):
    """bf16 engines: the EMA kept on each rank's fp32 partition (no gather per step) equals an EMA of
    the whole fp32 masters that DeepSpeed assembles itself, and is not the EMA of the bf16 params."""
    from safetensors.torch import load

    cfg = ToyStageConfig(zero_stage=zero_stage, precision="bf16", tag=f"ema{zero_stage}", steps=5,
                         checkpoint_every=5, ema_decay=0.6)
    name, _ = _run(services, cfg)
    got, ref, bf16 = (load(storage.get_bytes(f"runs/{name}/debug/ema_{t}.safetensors"))
                      for t in ("sharded", "reference", "bf16_params"))
    assert set(got) == set(ref) == {"inp.weight", "inp.bias", "out.weight", "out.bias"}
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)
    assert max(float((got[k] - bf16[k]).abs().max()) for k in ref) > 1e-4  # bf16 rounding is visible


def test_cli_runtime_failure_exits_1_with_stage_and_logs(services, ray_session):
    from click.testing import CliRunner

    from detailflow.cli import main

    r = CliRunner().invoke(main, ["train", "tokenizer", "--config", "configs/tokenizer-smoke.yaml",
                                  "dataset=no-such-dataset"])
    assert r.exit_code == 1, r.output
    assert "stage 'train tokenizer' failed (run tokenizer-smoke-" in r.output
    assert "no-such-dataset" in r.output and "worker logs: " in r.output and "/logs" in r.output
