"""DeepSpeed glue: device/backend choice, the ds_config builder, engine creation and LR schedules.

Usage (inside a Ray Train worker or in-process):
    from detailflow.platform import deepspeed_glue as dsg
    dev = dsg.select_device()                         # cuda+nccl+bf16 or cpu+gloo+fp32
    ds_cfg = dsg.build_ds_config(micro_batch=8, zero_stage=2, precision=dev.precision)
    opt = dsg.make_optimizer(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
    engine = dsg.init_engine(model, opt, ds_cfg, backend=dev.backend)
    lr = dsg.tokenizer_lr(step, total_steps=1000, base_lr=3e-4, warmup_steps=50)
    dsg.set_lr(engine.optimizer, lr)

The client torch optimiser is deliberate: a DeepSpeed-named optimiser would JIT-compile
fused_adam / cpu_adam on CPU (measured-here pitfall 2); with a torch one only the shm comm op builds.
deepspeed is imported lazily so the Ray driver never needs it (platform-notes §1b).
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class DeviceSpec:
    device: str  # "cuda" or "cpu"
    backend: str  # torch.distributed backend: "nccl" on GPU, "gloo" on CPU
    precision: str  # "bf16" on GPU, "fp32" on CPU


def select_device(prefer: str = "auto") -> DeviceSpec:
    """The device triple for this process; prefer = "auto" | "cuda" | "cpu"."""
    if prefer not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {prefer!r}")
    if prefer == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but torch.cuda.is_available() is False")
    if prefer != "cpu" and torch.cuda.is_available():
        return DeviceSpec("cuda", "nccl", "bf16")
    # Without CUDA DeepSpeed auto-selects its CPU accelerator; setting it explicitly silences a warning.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return DeviceSpec("cpu", "gloo", "fp32")


def worker_device(spec: DeviceSpec) -> torch.device:
    """The torch device of this worker (its local GPU under Ray Train / torchrun)."""
    if spec.device == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def build_ds_config(
    *,
    micro_batch: int,
    zero_stage: int = 2,
    grad_accum: int = 1,
    grad_clip: float = 1.0,
    precision: str = "fp32",
    device: str = "cpu",
) -> dict[str, Any]:
    """A DeepSpeed config dict for a client torch optimiser (no DS optimiser/scheduler sections).

    On GPU (device "cuda") ZeRO >= 1 overlaps the gradient reduction with the backward pass
    (overlap_comm); on CPU (gloo) it stays off."""
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r} (fp16 is not supported)")
    if micro_batch < 1 or grad_accum < 1:
        raise ValueError(f"micro_batch ({micro_batch}) and grad_accum ({grad_accum}) must be >= 1")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 1:
        zero["overlap_comm"] = device == "cuda"
    if zero_stage >= 2:
        zero["contiguous_gradients"] = True
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        # Only matters with optimiser offload, where a client torch optimiser is otherwise refused.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves (MLflow on rank 0)
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def make_optimizer(params, *, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.0,
                   kind: str = "adam") -> torch.optim.Optimizer:
    """A client torch Adam/AdamW; `params` may be an iterable of tensors or of param-group dicts.

    Fused (one multi-tensor CUDA kernel per step) when every parameter is already on a GPU: move
    the model to its device first."""
    if kind not in ("adam", "adamw"):
        raise ValueError(f"optimizer kind must be adam or adamw, got {kind!r}")
    params = list(params)
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    fused = bool(tensors) and all(p.is_cuda for p in tensors)
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(backend: str) -> None:
    """Start a 1-process group when none exists (in-process runs); Ray Train workers already have one.

    Only LOCAL_RANK is set: with RANK/WORLD_SIZE/MASTER_* as well, Ray's local mode sees torchrun."""
    import torch.distributed as dist

    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's sanity check wants it
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1)
    _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals; a second in-process run (after Ray's local
    mode destroyed the previous group) would otherwise reuse dead ones."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    try:  # still a live group of the current world: keep DeepSpeed's cache
        if groups._WORLD_GROUP is None or dist.get_global_rank(groups._WORLD_GROUP, 0) >= 0:
            return
    except (ValueError, RuntimeError):
        pass
    for name in dir(groups):
        if name.startswith("_") and name.isupper() and "GROUP" in name:
            value = getattr(groups, name)
            setattr(groups, name, {} if isinstance(value, dict) else None)


def init_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict,
                backend: str = "gloo"):
    """deepspeed.initialize over an existing (or fresh 1-process) group; returns the engine."""
    ensure_process_group(backend)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def engine_dtype(engine) -> torch.dtype:
    """The dtype float inputs must have for this engine (bf16 engines hold bf16 parameters)."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """The client torch optimiser under DeepSpeed's ZeRO / mixed-precision wrappers."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_bytes(engine) -> int:
    """Bytes of optimiser-state tensors (Adam moments, step) held by THIS rank."""
    opt = innermost_optimizer(engine.optimizer)
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def mean_over_ranks(metrics: dict[str, Any]) -> dict[str, Any]:
    """Every numeric entry averaged over the ranks that have it (all ranks must call this together).

    Ranks may log different keys (a rank whose t had no self-correction logs no perturb_start), so
    the dicts are gathered as objects, not reduced as one fixed-length tensor; non-numbers keep
    rank 0's value. One small collective per logging step."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(metrics)
    local = {k: float(v) for k, v in metrics.items()
             if isinstance(v, int | float) and not isinstance(v, bool)}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    out = dict(metrics)
    for key in set().union(*gathered):
        values = [g[key] for g in gathered if key in g]
        out[key] = sum(values) / len(values)
    return out


def set_lr(optimizer, lr: float) -> None:
    """Set lr on every param group; a group's optional "lr_scale" multiplies it."""
    for group in innermost_optimizer(optimizer).param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ---- LR schedules (pure functions of the step) -------------------------------------------------

def warmup_cosine(step: int, *, total_steps: int, base_lr: float, warmup_steps: int,
                  warmup_start_lr: float, final_lr: float) -> float:
    """Linear warm-up warmup_start_lr -> base_lr over warmup_steps, then cosine to final_lr at total_steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def tokenizer_lr(step: int, *, total_steps: int, base_lr: float, warmup_steps: int,
                 warmup_start_lr: float = 1e-5, min_lr_ratio: float = 0.1) -> float:
    """Spec §1.11: per-step linear warm-up (timm's 1e-5 start, capped at lr) then cosine to 0.1·lr."""
    return warmup_cosine(step, total_steps=total_steps, base_lr=base_lr, warmup_steps=warmup_steps,
                         warmup_start_lr=min(warmup_start_lr, base_lr), final_lr=min_lr_ratio * base_lr)


def ar_lr(step: int, *, total_steps: int, base_lr: float, warmup_frac: float = 0.05) -> float:
    """Spec §2.4: linear warm-up over 5% of steps from 0.005·lr, then cosine to 0.01·lr."""
    warmup = int(round(warmup_frac * total_steps))
    return warmup_cosine(step, total_steps=total_steps, base_lr=base_lr, warmup_steps=warmup,
                         warmup_start_lr=0.005 * base_lr, final_lr=0.01 * base_lr)


# ---- the fp32 master weights each rank holds (for the sharded EMA) -------------------------------

def master_fragments(engine, strip_prefix: str = "model.") -> dict:
    """name -> models.ema.Fragment: this rank's piece of every trainable parameter's fp32 MASTER
    weights (what the optimiser steps; bf16 engines train bf16 copies of them), as views, no copies:
      * ZeRO-3: the local fp32 partition (deepspeed.utils.safe_get_local_fp32_param); rank r holds
        flat[r * part : (r + 1) * part] of each parameter (the tail rank's padding is cut off);
      * ZeRO-1/2 and DeepSpeed's bf16 optimiser: the fp32 fragment linked to the parameter
        (param._hp_mapping; None when this rank owns none of it);
      * ZeRO-0 in fp32: the parameter itself (every rank holds all of it).
    Names lose the StepAdapter's prefix so they match the bare module. Call again after each step
    (cheap): offloaded partitions may move."""
    import torch.distributed as dist

    from detailflow.models.ema import Fragment

    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        key = name[len(strip_prefix):] if name.startswith(strip_prefix) else name
        if hasattr(p, "ds_id"):  # ZeRO-3
            from deepspeed.utils import safe_get_local_fp32_param

            local = safe_get_local_fp32_param(p).reshape(-1)
            start = rank * local.numel()
            n = max(0, min(local.numel(), p.ds_numel - start))
            out[key] = Fragment(local[:n], start, p.ds_numel, tuple(p.ds_shape), True)
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16 optimiser
            m = p._hp_mapping
            if m is None:
                out[key] = Fragment(torch.empty(0), 0, p.numel(), tuple(p.shape), True)
            else:
                out[key] = Fragment(m.get_hp_fragment().reshape(-1), m.lp_fragment_address.start, p.numel(),
                                    tuple(p.shape), True)
        else:  # ZeRO-0, fp32: the parameters are the masters
            out[key] = Fragment(p.detach().reshape(-1), 0, p.numel(), tuple(p.shape), False)
    return out


def gather_fragments(fragments: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Whole fp32 tensors (on CPU) from every rank's pieces. ALL ranks must call; one all-reduce per
    parameter on `device` (the worker's device: nccl reduces GPU tensors only); partitioned pieces
    are disjoint, so the sum of the zero-padded pieces is the whole."""
    import torch.distributed as dist

    multi = dist.is_initialized() and dist.get_world_size() > 1
    out = {}
    for name, f in fragments.items():
        if not f.partitioned:
            out[name] = f.local.detach().float().reshape(f.shape).cpu().clone()
            continue
        buf = torch.zeros(f.numel, dtype=torch.float32, device=device)
        buf[f.start:f.start + f.local.numel()] = f.local.detach().float().to(device)
        if multi:
            dist.all_reduce(buf)
        out[name] = buf.reshape(f.shape).cpu()
    return out
