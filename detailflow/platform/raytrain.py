"""Launch one `train_loop(config)` with Ray Train's TorchTrainer (or in-process for debugging).

Usage:
    result = launch(train_loop, config, settings, run_name="tokenizer-smoke-2026-11-28-1a2b3c4d",
                    num_workers=2, use_gpu=False, cpus_per_worker=0.5, datasets={"train": ds})

Checkpoints land in s3://<bucket>/runs/<run_name>/checkpoint_*; submitting the same run name again
resumes from the latest one (Ray Train V2 restores its checkpoint manager from that folder; we also
pass the newest complete checkpoint ourselves because `resume_from_checkpoint` raises in V2).
`num_workers=0` runs the loop in this process with the same ray.train API (Train V2 local mode).
"""

from __future__ import annotations

from typing import Any

from detailflow.platform import checkpoints


def storage_path(settings) -> str:
    return f"{settings.s3_bucket}/runs"


def launch(train_loop, config: dict, settings, *, run_name: str, num_workers: int = 2,
           use_gpu: bool = False, cpus_per_worker: float = 0.5, max_failures: int = 2,
           num_to_keep: int = 2, datasets: dict[str, Any] | None = None):
    """Run `train_loop` on `num_workers` Ray Train workers; returns the ray.train.Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from detailflow.platform.storage import Storage

    fs = Storage(settings).filesystem()
    in_process = num_workers == 0
    loop_config = dict(config)
    loop_config.update(_settings=settings, _run_name=run_name, _storage_path=storage_path(settings),
                       _in_process=in_process)
    latest = checkpoints.find_latest(fs, storage_path(settings), run_name)
    if latest is not None:
        loop_config["resume_checkpoint"] = latest
    # Fractional CPUs: whole-CPU trainers starve Ray Data on a 2-core box (measured-here pitfall 3).
    resources = {"GPU": 1, "CPU": cpus_per_worker} if use_gpu else {"CPU": cpus_per_worker}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if in_process else resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path(settings),
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        ),
        datasets=datasets,
    )
    return trainer.fit()


def latest_checkpoint(settings, run_name: str):
    """The newest complete checkpoint of a run (for exports, AR decoding, inspection)."""
    from detailflow.platform.storage import Storage

    return checkpoints.find_latest(Storage(settings).filesystem(), storage_path(settings), run_name)
