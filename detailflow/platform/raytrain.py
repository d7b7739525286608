"""Launch one `train_loop(config)` with Ray Train's TorchTrainer (or in-process for debugging).

Usage:
    result = launch(train_loop, config, settings, run_name="tokenizer-smoke-2026-11-28-1a2b3c4d",
                    num_workers=2, use_gpu=False, cpus_per_worker=0.5, datasets={"train": ds})

Checkpoints land in s3://<bucket>/runs/<run_name>/checkpoint_*; submitting the same run name again
resumes from the latest one (Ray Train V2 restores its checkpoint manager from that folder and hands
it to `ray.train.get_checkpoint()`; the newest checkpoint every rank marked complete is passed too, for
in-process runs, because `resume_from_checkpoint` raises in V2).
`num_workers=0` runs the loop in this process with the same ray.train API (Train V2 local mode).
When fit() raises (max_failures exhausted, a bug), the run's MLflow run is marked FAILED with the
error as a tag before the exception propagates.

Drivers start Ray with `runtime_env=ray_runtime_env()`: its worker setup hook (`quiet_ray_logs`)
drops one known-harmless warning in every Ray worker process, see QUIET_LOG_MESSAGES.
"""

from __future__ import annotations

import logging
from typing import Any

from detailflow.platform import checkpoints

# logger name -> message start dropped in Ray workers. Root cause of the one entry: Ray Train V2's
# detached PlacementGroupCleaner asks the State API every second whether the controller is alive;
# the State API is served by the dashboard, which local drivers leave off (it costs ~1 GB RSS,
# measured-here pitfall 12), so every query fails and logs this warning every few seconds for the
# whole run. Without the State API the cleaner cannot do its job anyway; Ray removes a run's
# placement group itself when the controller exits normally or the driver's job ends.
QUIET_LOG_MESSAGES = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner":
        "Failed to query Ray Train Controller actor state",
}


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# The same cleaner's monitor thread, when several local Ray instances run on one machine (parallel
# test sessions, other users), cannot even find its State API ("Found multiple active Ray instances")
# and dies with a 30-line traceback per run. Same root cause, same (absent) effect on training.
QUIET_THREADS = ("PlacementGroupCleanerMonitor",)

# DeepSpeed's ZeRO gathers call a torch.distributed function torch has deprecated: a FutureWarning per
# rank per run in every training log, about code that is not ours and changes nothing.
QUIET_WARNINGS = (r"`torch\.distributed\.all_gather_into_tensor` is deprecated",)


def _quiet_thread_excepthook(previous):
    def hook(args):
        if args.thread is not None and args.thread.name in QUIET_THREADS:
            logging.getLogger(__name__).debug("thread %s ended: %s", args.thread.name, args.exc_value)
            return
        previous(args)

    hook._detailflow_quiet = True
    return hook


def quiet_ray_logs() -> None:
    """Ray `worker_process_setup_hook`: install the QUIET_LOG_MESSAGES filters, the QUIET_WARNINGS
    filters and the QUIET_THREADS exception hook (idempotent)."""
    import threading
    import warnings

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)

    for name, prefix in QUIET_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))
    if not getattr(threading.excepthook, "_detailflow_quiet", False):
        threading.excepthook = _quiet_thread_excepthook(threading.excepthook)


def ray_runtime_env() -> dict:
    """The job runtime_env for ray.init: every worker process (Train controller and its detached
    helpers included, they inherit the job's env) runs quiet_ray_logs at start."""
    return {"worker_process_setup_hook": f"{__name__}.quiet_ray_logs"}


def ensure_ray(settings) -> None:
    """Start (settings.ray_address "local") or join Ray for a CLI driver, unless this process already
    has; log_to_driver stays on (Ray's default): it brings rank 0's progress lines to the console."""
    import ray

    if ray.is_initialized():
        return
    if settings.ray_address in ("local", "", None):
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 runtime_env=ray_runtime_env())
    else:
        ray.init(address=settings.ray_address, runtime_env=ray_runtime_env())


def storage_path(settings) -> str:
    return f"{settings.s3_bucket}/runs"


def worker_resources(*, use_gpu: bool, cpus_per_worker: float, reader_cpus: float = 0.0,
                     accelerator: dict[str, float] | None = None) -> dict[str, float]:
    """One rank's placement-group bundle: its CPUs plus its reader tasks' CPUs (reader_task_options
    runs them in this bundle), a GPU, or `accelerator` in its place (a custom resource such as
    {"sim_gpu": 1} that stands in for a GPU on a simulated cluster, tests/test_cluster_placement.py)."""
    if cpus_per_worker <= 0 or reader_cpus < 0:
        raise ValueError(f"cpus_per_worker ({cpus_per_worker}) must be > 0, reader_cpus ({reader_cpus}) >= 0")
    out = {"CPU": cpus_per_worker + reader_cpus}
    if use_gpu:
        out["GPU"] = 1
    out.update(accelerator or {})
    return out


def reader_task_options(local_rank: int | None = None) -> dict | None:
    """Ray task options that run a rank's reader tasks inside the rank's placement-group bundle, on
    the rank's node (None outside a placement group: a local run, a test driver).

    The Train worker actor reserves its whole bundle, reader CPUs included (worker_resources), so the
    tasks ask for no CPU of their own (num_cpus=0, the caller's): they can neither wait for a free
    CPU (the lockstep deadlock of tests/test_data_reader.py) nor land anywhere else (the head,
    another rank's node). The bundle
    is the local_rank-th of the placement group's bundles on this node (Ray Train does not tell a
    worker its bundle index; every bundle on the node is on the same machine)."""
    import ray
    from ray.util import get_current_placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not ray.is_initialized():  # a first task will start a local Ray: no placement group then
        return None
    pg = get_current_placement_group()
    if pg is None:
        return None
    node = ray.get_runtime_context().get_node_id()
    here = sorted(int(i) for i, n in placement_group_table(pg)["bundles_to_node_id"].items() if n == node)
    if not here:
        raise RuntimeError(f"placement group {pg.id.hex()} has no bundle on this worker's node {node}")
    if local_rank is None:
        try:
            import ray.train

            local_rank = ray.train.get_context().get_local_rank()
        except Exception:  # not a Ray Train worker: the first bundle on this node
            local_rank = 0
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=here[local_rank % len(here)],
        placement_group_capture_child_tasks=False)}


def launch(train_loop, config: dict, settings, *, run_name: str, num_workers: int = 2,
           use_gpu: bool = False, cpus_per_worker: float = 0.5, max_failures: int = 2,
           num_to_keep: int = 2, datasets: dict[str, Any] | None = None, experiment: str | None = None,
           reader_cpus: float = 0.0, accelerator: dict[str, float] | None = None):
    """Run `train_loop` on `num_workers` Ray Train workers; returns the ray.train.Result.

    experiment: the MLflow experiment of the run (default config["experiment"]; else every
    experiment is searched for the run name) — where a failure is recorded.
    reader_cpus / accelerator: see worker_resources (each rank's bundle)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from detailflow.platform.storage import Storage
    from detailflow.platform.tracking import mark_failed

    fs = Storage(settings).filesystem()
    in_process = num_workers == 0
    loop_config = dict(config)
    loop_config.update(_settings=settings, _run_name=run_name, _storage_path=storage_path(settings),
                       _in_process=in_process)
    latest = checkpoints.find_latest(fs, storage_path(settings), run_name)
    if latest is not None:
        loop_config["resume_checkpoint"] = latest
    # Fractional CPUs: whole-CPU trainers starve Ray Data on a 2-core box (measured-here pitfall 3).
    resources = worker_resources(use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, reader_cpus=reader_cpus,
                                 accelerator=accelerator)
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
    try:
        return trainer.fit()
    except BaseException as exc:  # KeyboardInterrupt too: the run must not stay RUNNING forever
        try:
            mark_failed(settings.mlflow_tracking_uri, run_name, exc,
                        experiment=experiment or config.get("experiment"))
        except Exception as mlflow_exc:  # never hide the training error behind a tracking one
            logging.getLogger(__name__).warning("could not mark MLflow run %s FAILED: %s", run_name,
                                                mlflow_exc)
        raise


def logs_hint() -> str:
    """Where this driver's Ray workers write their stdout/stderr (for error messages)."""
    try:
        import ray._private.worker as worker

        node = worker._global_node
        if node is not None:  # a local cluster started by this driver
            return f"{node.get_logs_dir_path()} (worker-*.out / worker-*.err)"
    except Exception:  # a private API: the generic answer below still helps
        pass
    return "/tmp/ray/session_latest/logs on the Ray head node (worker-*.out / worker-*.err)"


def latest_checkpoint(settings, run_name: str):
    """The newest checkpoint of a run that every rank marked complete (exports, inspection)."""
    from detailflow.platform.storage import Storage

    return checkpoints.find_latest(Storage(settings).filesystem(), storage_path(settings), run_name)
