"""Pieces every stage's train_loop shares: worker context, engines, resume, tracking, cadence.

A stage loop reads:
    ctx = WorkerContext.from_ray(config, cfg)              # rank, world, device, precision, settings
    engine = ctx.engine(StepAdapter(model, "loss"), optimizer, cfg)
    state = ctx.restore({"ds": engine}, config)            # {} on a fresh start
    tracker = ctx.tracker(experiment, resolved, state)
    for step in range(state.get("step", 0), cfg.steps):
        ctx.maybe_fail(cfg, step)                          # fault injection for tests
        ...
        if ctx.due(step, cfg.checkpoint_every, cfg.steps):
            ctx.checkpoint({"ds": engine}, metrics, step=step + 1, tracker=tracker, resolved=resolved)
"""

from __future__ import annotations

import dataclasses
import os
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

    def engine(self, module: nn.Module, optimizer, cfg):
        ds_cfg = dsg.build_ds_config(micro_batch=cfg.micro_batch, zero_stage=cfg.zero_stage,
                                     grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                                     precision=self.precision)
        return dsg.init_engine(module.to(self.device), optimizer, ds_cfg, backend=self.spec.backend)

    def restore(self, engines: dict, config: dict) -> dict:
        return checkpoints.restore(engines, checkpoints.resume_checkpoint(config))

    def tracker(self, experiment: str, resolved: dict, state: dict) -> Tracker:
        return Tracker.start(self.settings.mlflow_tracking_uri, experiment=experiment,
                             run_name=self.run_name, run_id=state.get("mlflow_run_id"),
                             params=resolved, enabled=self.rank == 0,
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
                        "config": resolved, "run_name": self.run_name}
        checkpoints.save_and_report(engines, {**metrics, "step": step}, client_state=client_state,
                                    extra_files=extra_files, tracker=tracker,  # rank 0 logs it to MLflow
                                    config={"_in_process": self.world == 1 and _in_process(),
                                            "_settings": self.settings, "_run_name": self.run_name,
                                            "_storage_path": f"{self.settings.s3_bucket}/runs"})

    def data_position(self, state: dict) -> dict | None:
        """This rank's data position from a restored client_state (None on a fresh start, or when
        the world size changed: the per-rank plans differ then, so the stream restarts its epoch)."""
        positions = state.get("data_positions") or []
        if len(positions) != self.world:
            if positions:
                print(f"[detailflow] world size changed {len(positions)} -> {self.world}: rank {self.rank} "
                      "restarts the data epoch of rank 0's position", flush=True)
                return {"epoch": int(positions[0].get("epoch", 0)), "restart_epoch": True}
            return None
        return positions[self.rank] or None

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
