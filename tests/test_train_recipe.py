"""The recipe is the contract (global batch on any worker count, resume at the saved world size only),
per-rank seeds with the prefix length t still shared, and the loop's host conversions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from detailflow.pipelines.train.loop_common import (
    DeviceSums,
    WorkerContext,
    check_resume_world,
    resolve_batch,
    resolve_grad_accum,
)

ROOT = Path(__file__).resolve().parent.parent
SPEC_GLOBAL_BATCH = {  # detailflow-spec.md §1.11 (tokenizer 256), §2.4 (AR 256; README 512 for -16/-32)
    ("tokenizer", 16): 256, ("tokenizer", 32): 256, ("tokenizer", 64): 256,
    ("ar", 16): 512, ("ar", 32): 512, ("ar", 64): 256,
}


@pytest.mark.parametrize("world,accum", [(16, 1), (8, 2), (4, 4), (1, 16)])
def test_grad_accum_keeps_the_global_batch(world, accum):
    assert resolve_grad_accum(micro_batch=16, grad_accum=1, world=world, global_batch=256) == accum
    assert 16 * accum * world == 256


@pytest.mark.parametrize("world,micro", [(3, 16), (64, 16), (5, 8)])
def test_a_worker_count_that_cannot_keep_the_global_batch_refuses_naming_the_numbers(world, micro):
    with pytest.raises(ValueError) as err:
        resolve_grad_accum(micro_batch=micro, grad_accum=1, world=world, global_batch=256)
    msg = str(err.value)
    assert "256" in msg and f"{world} workers" in msg and f"micro-batch {micro}" in msg


def test_driver_resolves_grad_accum_and_the_worker_refuses_a_mismatch():
    from detailflow.pipelines.train.tokenizer import TokenizerStageConfig

    cfg = resolve_batch(TokenizerStageConfig(global_batch=64, micro_batch=8, num_workers=2, grad_accum=1))
    assert cfg.grad_accum == 4
    assert resolve_batch(TokenizerStageConfig(global_batch=None, grad_accum=3)).grad_accum == 3
    ctx = WorkerContext(rank=0, world=4, spec=None, device=torch.device("cpu"), precision="fp32",
                        settings=None, run_name="r")
    with pytest.raises(ValueError, match="needs grad_accum=2"):
        ctx.check_batch(cfg)  # resolved for 2 workers, started on 4


def test_resume_at_another_world_size_refuses_before_step_0():
    check_resume_world({"world_size": 4, "step": 10}, 4)
    with pytest.raises(RuntimeError, match="saved by 4 workers but this run has 2"):
        check_resume_world({"world_size": 4, "step": 10, "config": {"global_batch": 256}}, 2)
    # a checkpoint written before world_size was recorded: its per-rank data positions say it
    with pytest.raises(RuntimeError, match="saved by 3 workers but this run has 1"):
        check_resume_world({"data_positions": [{}, {}, {}]}, 1)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_pipeline_recipes_train_the_papers_global_batch_on_their_workers(size):
    pipeline = yaml.safe_load((ROOT / f"configs/pipelines/detailflow-{size}.yaml").read_text())
    for stage in pipeline["stages"]:
        if stage["kind"] not in ("train-tokenizer", "train-ar"):
            continue
        recipe = yaml.safe_load((ROOT / stage["params"]["config"]).read_text())
        merged = {**recipe, **stage["params"].get("overrides", {})}
        world = stage["resources"]["num_workers"]
        kind = stage["kind"].removeprefix("train-")
        want = SPEC_GLOBAL_BATCH[(kind, size)]
        assert merged["global_batch"] == want, stage["name"]
        accum = resolve_grad_accum(micro_batch=merged["micro_batch"], grad_accum=merged.get("grad_accum", 1),
                                   world=world, global_batch=merged["global_batch"])
        assert merged["micro_batch"] * accum * world == want, stage["name"]
        # the recipe file alone (its own workers) trains the same global batch
        assert recipe["micro_batch"] * recipe.get("grad_accum", 1) * recipe["num_workers"] == want


def _ctx(rank: int) -> WorkerContext:
    return WorkerContext(rank=rank, world=2, spec=None, device=torch.device("cpu"), precision="fp32",
                         settings=None, run_name="r")


def _draws(rank: int, seed: int = 42) -> torch.Tensor:
    torch.manual_seed(seed)  # the shared init the loops do first
    drop = torch.nn.Dropout(0.5)
    _ctx(rank).seed_rank(seed)
    return torch.cat([drop(torch.ones(64)), torch.rand(16), torch.randint(0, 1000, (16,)).float()])


def test_each_rank_draws_its_own_dropout_masks_and_noise_reproducibly():
    r0, r1 = _draws(0), _draws(1)
    assert not torch.equal(r0, r1)
    assert torch.equal(r0, _draws(0)) and torch.equal(r1, _draws(1))  # same (seed, rank): same draws
    assert not torch.equal(_draws(0, seed=43), r0)


def test_prefix_length_t_stays_shared_across_ranks():
    """The reader draws t from (seed, micro-batch index) with its own generator: per-rank torch
    seeds must not change it, so every rank trains the same t at each micro-batch."""
    from detailflow.models.configs import get_model_config
    from detailflow.models.degrade import sample_prefix_len
    from detailflow.models.resolution import ResolutionMap

    rmap = ResolutionMap.from_config(get_model_config("smoke").tokenizer)
    ts = []
    for rank in (0, 1):
        _ctx(rank).seed_rank(42)
        # the stream's shared-t draw for micro-batch index i (reader.window_task, shared_t=True)
        ts.append([sample_prefix_len(rmap, 0.8, np.random.default_rng([42, i, 0x57E9])) for i in range(32)])
        torch.rand(100)  # rank-local torch draws in between change nothing
    assert ts[0] == ts[1]


def test_running_log_sums_stay_on_device_and_convert_once_per_log(monkeypatch):
    from test_loss_host_syncs import count_host_conversions

    conversions = count_host_conversions(monkeypatch)
    sums = DeviceSums()
    values = {"loss": [], "mse": []}
    for step in range(10):  # 10 micro-batches of logs as the loss code returns them (0-dim tensors)
        loss, mse = torch.tensor(1.0 + step), torch.tensor(0.5 * step)
        values["loss"].append(1.0 + step)
        values["mse"].append(0.5 * step)
        sums.add({"loss": loss, "mse": mse, "perturb_start": 3.0})
    assert conversions == []
    means = sums.means()
    assert conversions == ["tolist"]  # one transfer for every mean
    assert means["loss"] == pytest.approx(sum(values["loss"]) / 10)
    assert means["mse"] == pytest.approx(sum(values["mse"]) / 10) and means["perturb_start"] == 3.0
    assert sums.means() == {}  # reset after each logging interval
