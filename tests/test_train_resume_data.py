"""Exact data resume through the real tokenizer loop: 2 Ray Train workers (ZeRO-2) stream their own
parts of the plan from S3, rank 1 is killed mid-epoch, the worker group restarts from the last
checkpoint, and the micro-batches that trained the final model are the plan's, each exactly once."""

from __future__ import annotations

import itertools
import os

import pytest

from detailflow.pipelines.data.plan import Position
from detailflow.pipelines.train.stage_config import load_stage_config
from detailflow.pipelines.train.tokenizer import TokenizerStageConfig

pytestmark = pytest.mark.integration

DATASET = "resume-shapes"
STEPS = 12


@pytest.fixture(scope="module")
def dataset(storage, tmp_path_factory):
    from detailflow.pipelines.data import synth
    from detailflow.pipelines.data.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("shapes")
    synth.write_folder(root, size=32, per_class=8, val_per_class=1, seed=1)  # 80 train images
    # 8-row groups: 10 row groups, windows of 2 -> 5 windows per epoch, epochs of ~10 steps per rank
    return ingest(storage, str(root), IngestConfig(name=DATASET, split="train", shard_mb=0.05,
                                                   row_group_rows=8, use_ray=False))


def _read_log(path: str) -> list[tuple[int, Position]]:
    out = []
    with open(path) as f:
        for line in f:
            step, e, u, b = (int(x) for x in line.split()[:4])
            out.append((step, Position(e, u, b)))
    return out


def test_killed_worker_resumes_at_the_next_microbatch(services, storage, ray_session, dataset, tmp_path):
    from detailflow.pipelines.data.reader import ReaderConfig, epoch_plan
    from detailflow.pipelines.train.tokenizer import run

    log = str(tmp_path / "consumed")
    cfg = load_stage_config(TokenizerStageConfig, "configs/tokenizer-smoke.yaml", [
        f"dataset={DATASET}", "name=resume-test", f"steps={STEPS}", "checkpoint_every=4", "eval_every=100",
        "micro_batch=4", "window_groups=2", "fail_at_step=6", f"fail_marker={tmp_path / 'failed'}",
        f"consumed_log={log}"])
    run(cfg, services)
    assert os.path.exists(tmp_path / "failed")  # rank 1 really died at step 6
    reader = ReaderConfig(image_size=32, micro_batch=4, seed=cfg.seed, window_groups=2)
    plan = epoch_plan(dataset, reader, world=2)
    for rank in (0, 1):
        entries = _read_log(f"{log}.rank{rank}")
        steps = [s for s, _ in entries]
        assert steps.count(4) == 2 and steps.count(5) == 2 and steps.count(7) == 1  # 4, 5 replayed
        final = dict(entries)  # the last attempt of each step is the one the final model kept
        assert sorted(final) == list(range(STEPS))
        expect = list(itertools.islice(plan.iter_positions(rank=rank), STEPS))
        assert [final[s] for s in range(STEPS)] == expect  # the plan, each micro-batch exactly once
        replays = [p for s, p in entries if s in (4, 5)]
        assert replays[:2] == replays[2:]  # the replayed steps saw the very same micro-batches
        if rank == 1:  # 2 of the 5 windows per epoch: 8 steps, so this rank crossed into epoch 1
            assert len({p.epoch for p in expect}) == 2
