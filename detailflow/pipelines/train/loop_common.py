"""Pieces every stage's train_loop shares: worker context, engines, resume, tracking, cadence.

A stage loop reads:
    ctx = WorkerContext.from_ray(config, cfg)              # rank, world, device, precision, settings
    engine = ctx.engine(StepAdapter(model, "loss"), optimizer, cfg)
    state = ctx.restore({"ds": engine}, config)            # {} on a fresh start
    tracker = ctx.tracker(experiment, resolved, state)
    ctx.seed_rank(cfg.seed)                                # after the (shared) init: per-rank draws
    for step in range(state.get("step", 0), cfg.steps):  # OPTIMISER steps
        ctx.maybe_fail(cfg, step)                          # fault injection for tests
        for _ in range(cfg.grad_accum): ...                # micro-batches of this optimiser step
        if ctx.due(step, cfg.checkpoint_every, cfg.steps):
            ctx.checkpoint({"ds": engine}, metrics, step=step + 1, tracker=tracker, resolved=resolved)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from detailflow.platform import checkpoints
from detailflow.platform import deepspeed_glue as dsg
from detailflow.platform.tracking import Tracker


class StepAdapter(nn.Module):
    """engine(...) -> model.<method>(...), so DeepSpeed's forward bookkeeping (ZeRO-3 gathers) applies.

    Parameter names gain the prefix "model." (stripped again by the export)."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args, _fn=None, **kwargs):
        """model.<method>(...), or _fn(model, ...) for other work (eval) that must run inside the
        engine's forward so ZeRO-3 gathers what it reads."""
        if _fn is not None:
            return _fn(self.model, *args, **kwargs)
        return getattr(self.model, self.method)(*args, **kwargs)


def zero3_external(engine, submodules: tuple[str, ...] = ()) -> None:
    """ZeRO-3 gathers a module's params only while ITS forward runs. The adapter calls a plain method
    of the model (so the model's own direct params would never be gathered), and some submodules are
    read by plain methods too (a codebook lookup): register those on the adapter, gathered for its
    whole forward."""
    if engine.zero_optimization_stage() != 3:
        return
    import deepspeed

    params = list(engine.module.model.parameters(recurse=False))
    for name in submodules:
        params += list(engine.module.get_submodule(name).parameters())
    for p in params:
        deepspeed.zero.register_external_parameter(engine.module, p)


def stage_from_config(cls, config: dict):
    """The typed stage config from a train_loop_config dict (private "_" keys and extras ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})


def rank_seed(seed: int, rank: int) -> int:
    """This rank's torch seed, derived from (seed, rank) (numpy's SeedSequence: well mixed, so
    neighbouring seeds/ranks give unrelated streams)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint64)[0] >> 1)


def resolve_grad_accum(*, micro_batch: int, grad_accum: int, world: int, global_batch: int | None) -> int:
    """The gradient accumulation that keeps the recipe's global batch (micro_batch x grad_accum x
    world) on `world` workers; refuses, naming the numbers, when it cannot. global_batch None: the
    config's grad_accum as given."""
    world = max(1, int(world))
    if global_batch is None:
        return grad_accum
    per_step = micro_batch * world
    if global_batch < per_step or global_batch % per_step:
        raise ValueError(f"global batch {global_batch} is not a multiple of {world} workers x micro-batch "
                         f"{micro_batch} = {per_step}: choose micro_batch so that micro_batch x workers "
                         f"divides {global_batch} (e.g. micro_batch={max(1, global_batch // world)} "
                         f"if {world} divides it), or run on another number of workers")
    return global_batch // per_step


def resolve_batch(cfg):
    """The stage config with grad_accum resolved for its worker count (driver side, before the run
    name is made: the checkpoint layout is part of it); prints the resolved global batch."""
    world = max(1, int(cfg.num_workers))
    accum = resolve_grad_accum(micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, world=world,
                               global_batch=cfg.global_batch)
    if accum != cfg.grad_accum:
        print(f"[detailflow] global batch {cfg.global_batch} = {world} workers x micro-batch "
              f"{cfg.micro_batch} x grad_accum {accum} (config had {cfg.grad_accum})", flush=True)
    return dataclasses.replace(cfg, grad_accum=accum)


def check_resume_world(client_state: dict, world: int, where: str = "the checkpoint") -> None:
    """Refuse (before step 0) to resume a DeepSpeed checkpoint saved by another number of ranks:
    its ZeRO partitions and per-rank data positions belong to that world size."""
    saved = client_state.get("world_size")
    if saved is None and client_state.get("data_positions"):
        saved = len(client_state["data_positions"])
    if saved is not None and int(saved) != int(world):
        batch = (client_state.get("config") or {}).get("global_batch")
        raise RuntimeError(f"{where} was saved by {saved} workers but this run has {world}: a ZeRO "
                           f"checkpoint resumes only at its own world size (global batch "
                           f"{batch if batch is not None else 'as recorded'}); run with num_workers={saved}, "
                           "or start a new run")


class DeviceSums:
    """Running sums of the per-micro-batch logs, kept ON DEVICE: adding a tensor never syncs with
    the host; means() converts everything at once (one .tolist()) once per logging interval."""

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: Mapping) -> None:
        for key, value in logs.items():
            if isinstance(value, bool) or not isinstance(value, int | float | torch.Tensor):
                continue
            if isinstance(value, torch.Tensor):
                value = value.detach().float().reshape(())
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        """Every key's mean since the last call (then reset); ONE host conversion for all tensors."""
        from detailflow.models.host import host_floats

        out = {k: v / self.counts[k] for k, v in host_floats(self.sums).items()}
        self.sums, self.counts = {}, {}
        return out


def step_logs(sums: DeviceSums, engine, **host_values) -> dict[str, float]:
    """The values of one log line: the running means of `sums` and the engine's global grad norm of
    the last optimiser step (a device tensor under ZeRO-1/2; None when DeepSpeed computes none: 0.0),
    converted together in ONE host transfer (was: float(norm or 0.0), a bool() and a float() of a device
    tensor besides the means' transfer); host_values (lr, throughput) are added as they are."""
    norm = engine.get_global_grad_norm()
    sums.add({"grad_norm": 0.0 if norm is None else norm})
    return {**sums.means(), **host_values}


def resolved_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "resume_checkpoint"}


@dataclass
class WorkerContext:
    rank: int  # global rank of this worker
    world: int  # number of workers
    spec: dsg.DeviceSpec  # device / backend / default precision
    device: torch.device  # this worker's torch device
    precision: str  # "fp32" | "bf16" actually used
    settings: Any  # platform Settings (S3, MLflow)
    run_name: str  # deterministic run name (storage folder and MLflow run name)

    @classmethod
    def from_ray(cls, config: dict, cfg) -> WorkerContext:
        import ray.train

        ctx = ray.train.get_context()
        spec = dsg.select_device(cfg.device)
        precision = spec.precision if cfg.precision == "auto" else cfg.precision
        return cls(rank=ctx.get_world_rank(), world=ctx.get_world_size(), spec=spec,
                   device=dsg.worker_device(spec), precision=precision,
                   settings=config["_settings"], run_name=config["_run_name"])

    def seed_rank(self, seed: int) -> int:
        """After the model init (identical on every rank from torch.manual_seed(seed)): reseed torch
        (CPU and every CUDA device) from (seed, rank), so dropout masks, class-dropout rows, perturbed
        spans and DiffAugment draws differ across ranks and repeat for the same (seed, rank). The
        prefix length t is not drawn here: the reader draws it from (seed, micro-batch index),
        shared by all ranks. Returns the rank's seed."""
        value = rank_seed(seed, self.rank)
        torch.manual_seed(value)
        return value

    def check_batch(self, cfg) -> None:
        """Refuse before step 0 when this worker group does not train the recipe's global batch."""
        if cfg.global_batch is None:
            return
        accum = resolve_grad_accum(micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, world=self.world,
                                   global_batch=cfg.global_batch)
        if accum != cfg.grad_accum:
            raise ValueError(f"global batch {cfg.global_batch} on {self.world} workers x micro-batch "
                             f"{cfg.micro_batch} needs grad_accum={accum}, the config has {cfg.grad_accum} "
                             "(the driver resolves it: run through `detailflow train`)")

    def engine(self, module: nn.Module, optimizer, cfg):
        ds_cfg = dsg.build_ds_config(micro_batch=cfg.micro_batch, zero_stage=cfg.zero_stage,
                                     grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                                     precision=self.precision, device=self.device.type)
        return dsg.init_engine(module.to(self.device), optimizer, ds_cfg, backend=self.spec.backend)

    def restore(self, engines: dict, config: dict) -> dict:
        """Load the checkpoint to resume (fresh: {}), refusing one saved at another world size
        BEFORE any engine reads its shards."""
        checkpoint = checkpoints.resume_checkpoint(config)
        if checkpoint is not None:
            check_resume_world(checkpoints.read_client_state(checkpoint), self.world,
                               checkpoints.checkpoint_uri(checkpoint))
        return checkpoints.restore(engines, checkpoint)

    def tracker(self, experiment: str, resolved: dict, state: dict) -> Tracker:
        from detailflow.pipelines.train.stage_config import checkpoint_layout

        # world_size and global batch as this worker group trains them (in-process: world 1)
        params = {**resolved, **checkpoint_layout({**resolved, "num_workers": self.world})}
        return Tracker.start(self.settings.mlflow_tracking_uri, experiment=experiment,
                             run_name=self.run_name, run_id=state.get("mlflow_run_id"),
                             params=params, enabled=self.rank == 0,
                             tags={"detailflow.world_size": self.world, "detailflow.device": self.device})

    def maybe_fail(self, cfg, step: int) -> None:
        """Exit rank 1 hard at cfg.fail_at_step, once: the marker file makes the retry pass."""
        if cfg.fail_at_step < 0 or step != cfg.fail_at_step or self.rank != min(1, self.world - 1):
            return
        if not cfg.fail_marker or os.path.exists(cfg.fail_marker):
            return
        with open(cfg.fail_marker, "w") as f:
            f.write(f"rank {self.rank} exited at step {step}\n")
        os._exit(17)

    @staticmethod
    def due(step: int, every: int, total: int) -> bool:
        """After finishing `step` (0-based): is an every-N action due (always at the last step)?"""
        return step + 1 == total or (every > 0 and (step + 1) % every == 0)

    def checkpoint(self, engines: dict, metrics: dict, *, step: int, tracker: Tracker,
                   resolved: dict, data_position: dict | None = None,
                   extra_files: dict[str, bytes] | None = None) -> None:
        run_id = self.broadcast(tracker.run_id)
        # every rank reads its own part of the data plan: the checkpoint keeps each rank's position
        positions = self.all_gather(data_position or {})
        client_state = {"step": step, "mlflow_run_id": run_id, "data_positions": positions,
                        "config": resolved, "run_name": self.run_name, "world_size": self.world}
        checkpoints.save_and_report(engines, {**metrics, "step": step}, client_state=client_state,
                                    extra_files=extra_files, tracker=tracker,  # rank 0 logs it to MLflow
                                    config={"_in_process": self.world == 1 and _in_process(),
                                            "_settings": self.settings, "_run_name": self.run_name,
                                            "_storage_path": f"{self.settings.s3_bucket}/runs"})

    def data_position(self, state: dict) -> dict | None:
        """This rank's data position from a restored client_state (None on a fresh start). restore()
        has refused a checkpoint of another world size, so it holds one position per rank."""
        positions = state.get("data_positions") or []
        return (positions[self.rank] or None) if positions else None

    def all_gather(self, obj) -> list:
        """[rank 0's obj, rank 1's obj, ...] on every rank."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """rank 0's value on every rank (the MLflow run id lives only on rank 0)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _in_process() -> bool:
    import ray.train

    return type(ray.train.get_context()).__name__.startswith("Local")


def to_float(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [0,255] -> float [-1,1]; float tensors are only moved/cast."""
    from detailflow.models.tokenizer import to_model_range

    return to_model_range(x.to(device, non_blocking=True)).to(dtype)
