"""Step semantics with gradient accumulation: `steps`, the LR schedule, logging and checkpoints count
OPTIMISER steps; each takes grad_accum micro-batches. One in-process smoke tokenizer run (real
DeepSpeed engine, S3 stream, MLflow) checked against closed forms."""

from __future__ import annotations

import pytest
from mlflow_runs import runs_named

from detailflow.pipelines.train.stage_config import load_stage_config
from detailflow.pipelines.train.tokenizer import TokenizerStageConfig

pytestmark = pytest.mark.integration

STEPS, ACCUM, WARMUP, LR = 3, 2, 2, 3e-4


def test_grad_accum_counts_optimiser_steps(services, storage, ray_session, tmp_path, monkeypatch):
    from detailflow.pipelines.data import synth
    from detailflow.pipelines.data.ingest import IngestConfig, ingest
    from detailflow.pipelines.train.loop_common import WorkerContext
    from detailflow.pipelines.train.tokenizer import run
    from detailflow.platform import checkpoints

    synth.write_folder(tmp_path / "img", size=32, per_class=4, val_per_class=1, seed=0)
    ingest(storage, str(tmp_path / "img"), IngestConfig(name="accum-shapes", split="train", shard_mb=0.05,
                                                        use_ray=False))
    log = tmp_path / "consumed"
    cfg = load_stage_config(TokenizerStageConfig, "configs/tokenizer-smoke.yaml", [
        "dataset=accum-shapes", "name=accum-test", "num_workers=0", f"steps={STEPS}", f"grad_accum={ACCUM}",
        f"warmup_steps={WARMUP}", f"lr={LR}", "checkpoint_every=2", "eval_every=100", "log_every=1",
        f"consumed_log={log}", "micro_batch=4"])
    seeded = []  # (rank, seed) of each call: in-process, the loop runs in this process
    original = WorkerContext.seed_rank
    monkeypatch.setattr(WorkerContext, "seed_rank",
                        lambda ctx, seed: seeded.append((ctx.rank, seed)) or original(ctx, seed))
    info = run(cfg, services)

    # issue 18: the loop reseeds torch per rank from (seed, rank) once, after the shared init
    assert seeded == [(0, cfg.seed)]

    # micro-batches consumed = steps x grad_accum, grad_accum of them per optimiser step
    steps = [int(line.split()[0]) for line in (tmp_path / "consumed.rank0").read_text().splitlines()]
    assert steps == [k for k in range(STEPS) for _ in range(ACCUM)]

    # checkpoints at optimiser steps 2 (checkpoint_every) and 3 (the end)
    fs = storage.filesystem()
    done = checkpoints.complete_checkpoints(fs, f"{services.s3_bucket}/runs", info["run_name"])
    assert [s for s, _ in done] == [2, 3]

    # LR at optimiser step k: linear warm-up from min(1e-5, lr) to lr over WARMUP steps (spec §1.11)
    client, (mlrun,) = runs_named(services.mlflow_tracking_uri, cfg.experiment, info["run_name"])
    lrs = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "lr")}
    start = 1e-5
    assert sorted(lrs) == list(range(STEPS))
    for k in range(WARMUP):
        assert lrs[k] == pytest.approx(start + (LR - start) * k / WARMUP)
    assert mlrun.data.params["global_batch"] == str(4 * ACCUM * 1)
    assert mlrun.data.params["world_size"] == "1"
