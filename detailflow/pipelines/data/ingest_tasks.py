"""How an ingest's work runs: shard and listing tasks on Ray (in flight as many as the cluster's CPUs
keep busy; a local source's pinned to the driver's node), or in this process (use_ray False).

    results = run_tasks(cfg, fn, [(a0,), (a1,)], task_options(cfg, items))
    markers = run_shards(storage, cfg, vprefix, todo, class_to_index, progress, local=False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from detailflow.pipelines.data import sources
from detailflow.pipelines.data.ingest_shards import SourceReadError, write_shard
from detailflow.pipelines.data.sources import Item
from detailflow.pipelines.data.task_stream import cancel_tasks

if TYPE_CHECKING:
    from detailflow.pipelines.data.ingest import IngestConfig


class IngestInterrupted(RuntimeError):
    """Raised by the fail_after_shards testing hook (simulates a crash before the manifest)."""


def ensure_ray(settings=None) -> None:
    """Start (or join) Ray per settings.ray_address if this process has not already."""
    import ray

    if ray.is_initialized():
        return
    from detailflow.platform.runtime import apply_runtime_env

    apply_runtime_env()
    address = getattr(settings, "ray_address", "local") if settings is not None else "local"
    if address in ("local", "", None):
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def task_options(cfg: IngestConfig, items: list[Item], local: bool | None = None) -> dict:
    """Ray options for the shard (and local listing) tasks. Local paths exist only on the driver's
    machine, so tasks reading them are pinned to the driver's node (hard affinity); refuse when that
    cannot work. `local` (default: from the items' kinds) says whether the source is local."""
    import ray

    opts = {"num_cpus": cfg.task_cpus, "max_retries": 2}
    if not (any(it.kind in ("file", "tar") for it in items) if local is None else local):
        return opts
    stage = "stage the source on S3 (e.g. `aws s3 sync SRC s3://BUCKET/raw/NAME`) and ingest the s3:// URI"
    if ray.util.client.ray.is_connected():
        raise ValueError(f"a local source cannot be read through a Ray Client (ray://) connection: {stage}, "
                         "or run with --local")
    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id and n.get("Alive")), {})
    if node.get("Resources", {}).get("CPU", 0) < cfg.task_cpus:
        raise ValueError(f"a local source can only be read on the driver's node, which has no CPU for the "
                         f"shard tasks: {stage}, or run with --local")
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {**opts, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def in_flight(cfg: IngestConfig) -> int:
    """Tasks kept in flight: cfg.max_in_flight, else twice what the cluster's CPUs run at once."""
    if cfg.max_in_flight:
        return int(cfg.max_in_flight)
    import ray

    return max(1, int(2 * ray.cluster_resources().get("CPU", 1) / max(cfg.task_cpus, 0.01)))


def run_tasks(cfg: IngestConfig, fn, calls: list[tuple], options: dict | None = None) -> list:
    """fn(*args) for every args in calls as Ray tasks, in_flight(cfg) at a time; results in call order."""
    import ray

    remote = ray.remote(fn).options(**(options or {"num_cpus": cfg.task_cpus, "max_retries": 2}))
    limit, results, pending, queue = in_flight(cfg), {}, {}, list(enumerate(calls))
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                i, args = queue.pop(0)
                pending[remote.remote(*args)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(ready[0])] = ray.get(ready[0])
    except BaseException:
        cancel_tasks(pending)
        raise
    return [results[i] for i in range(len(calls))]


def listing_mapper(storage, cfg: IngestConfig, local: bool = False):
    """How the listing tasks run (per tar, per group of class folders): Ray tasks on the workers
    (a local source's on the driver's node), or here (use_ray False)."""
    if not cfg.use_ray:
        return sources._serial

    def mapper(fn, calls):
        ensure_ray(storage.settings)
        return run_tasks(cfg, fn, calls, task_options(cfg, [], local=local))
    return mapper


def run_shards(storage, cfg: IngestConfig, prefix: str, todo: list[tuple[int, list[Item] | str, str]],
                class_to_index: dict[str, int], progress, local: bool) -> dict[int, dict]:
    done: dict[int, dict] = {}

    def finished(marker: dict) -> None:
        done[marker["index"]] = marker
        if progress is not None:
            progress(marker["rows"] + len(marker["rejected"]))
        if cfg.fail_after_shards is not None and len(done) >= cfg.fail_after_shards:
            raise IngestInterrupted(f"injected failure after {len(done)} shards")

    kwargs = {"row_group_rows": cfg.row_group_rows, "read_attempts": cfg.read_attempts}
    if not cfg.use_ray:
        for index, items, digest in todo:
            finished(write_shard(storage, prefix, index, items, class_to_index, digest, **kwargs))
        return done
    if not todo:
        return done
    import ray

    ensure_ray(storage.settings)
    remote = ray.remote(write_shard).options(**task_options(cfg, [], local=local))
    pending, queue, limit = [], list(todo), in_flight(cfg)
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                index, items, digest = queue.pop(0)
                pending.append(remote.remote(storage, prefix, index, items, class_to_index, digest,
                                             **kwargs))
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                marker = ray.get(ready[0])
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, SourceReadError):  # the plain message, not a remote traceback
                    raise err.cause from None
                raise
            finished(marker)
    except BaseException:
        cancel_tasks(pending)
        raise
    return done
