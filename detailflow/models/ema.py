"""Exponential moving average of model parameters (spec §2.4: decay 0.9999, tiny 0.999).

Usage:
    ema = EMA(model, decay=0.999)            # a whole fp32 copy, updated from the module's params
    ... optimizer.step(); ema.update(model)
    ema.copy_to(eval_model)                  # evaluation / export uses the EMA weights
    save_file(ema.state_dict(), ...)         # flat name -> tensor dict (safetensors friendly)

    ema = ShardedEMA(fragments, decay)       # under DeepSpeed: each rank's fp32 master pieces
    ... engine.step(); ema.update(fragments) # (platform.deepspeed_glue.master_fragments)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class EMA:
    """Float32 shadow copies of every trainable parameter: shadow <- d*shadow + (1-d)*param."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, avg in self.shadow.items():
            if name not in params:
                raise KeyError(f"EMA tracks {name!r} but the model has no such parameter")
            avg.lerp_(params[name].detach().to(avg.device, torch.float32), 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averages (cast to each parameter's dtype)."""
        params = dict(model.named_parameters())
        for name, avg in self.shadow.items():
            params[name].copy_(avg.to(params[name].device, params[name].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"shadow.{n}": t for n, t in self.shadow.items()}
        state["decay"] = torch.tensor(self.decay, dtype=torch.float64)
        state["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        shadow = {k[len("shadow."):]: v for k, v in state.items() if k.startswith("shadow.")}
        if shadow.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - shadow.keys(), shadow.keys() - self.shadow.keys()
            raise KeyError(f"EMA state does not match: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name, t in shadow.items():
            if t.shape != self.shadow[name].shape:
                want = tuple(self.shadow[name].shape)
                raise ValueError(f"EMA {name}: saved {tuple(t.shape)} vs model {want}")
            self.shadow[name].copy_(t)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])


class Fragment(NamedTuple):
    """The piece of one parameter's fp32 master weights this process holds, as a 1-D view."""

    local: torch.Tensor  # 1-D fp32 view of flat_param[start : start + local.numel()] (may be empty)
    start: int  # offset of the piece in the flattened parameter
    numel: int  # elements of the whole parameter
    shape: tuple  # the whole parameter's shape
    partitioned: bool  # True: pieces of all ranks are disjoint (ZeRO); False: every rank holds it all


class ShardedEMA:
    """EMA of the fp32 master weights, kept per shard: each rank averages only the piece of every
    parameter that its optimiser partition owns (ZeRO-1/2/3), so an update is local, elementwise
    and needs no communication; ZeRO-0 ranks each average the whole (identical) parameters.

    `full_state` (name -> full fp32 tensor) is assembled by the caller's collective from
    `fragments_of_shadow()` (platform.deepspeed_glue.gather_fragments) only when a whole copy is
    needed: samples, checkpoints, the export. `load_full` takes such a dict back (any world size)."""

    def __init__(self, fragments: dict[str, Fragment], decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.meta = {n: f._replace(local=torch.empty(0)) for n, f in fragments.items()}
        self.shadow = {n: f.local.detach().float().clone() for n, f in fragments.items()}

    @torch.no_grad()
    def update(self, fragments: dict[str, Fragment]) -> None:
        """shadow <- decay * shadow + (1 - decay) * master, over this rank's pieces."""
        names = [n for n in self.shadow if self.shadow[n].numel()]
        if names:
            masters = [fragments[n].local.detach().to(torch.float32) for n in names]
            torch._foreach_lerp_([self.shadow[n] for n in names], masters, 1.0 - self.decay)
        self.num_updates += 1

    def fragments_of_shadow(self) -> dict[str, Fragment]:
        return {n: m._replace(local=self.shadow[n]) for n, m in self.meta.items()}

    @torch.no_grad()
    def load_full(self, full_state: dict[str, torch.Tensor], num_updates: int = 0) -> None:
        """Take this rank's pieces from whole parameters (e.g. a checkpoint's consolidated EMA)."""
        missing = self.meta.keys() - full_state.keys()
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)}")
        for name, m in self.meta.items():
            flat = full_state[name].reshape(-1).to(torch.float32)
            if flat.numel() != m.numel:
                raise ValueError(f"EMA {name}: saved {flat.numel()} elements vs model {m.numel}")
            self.shadow[name].copy_(flat[m.start:m.start + self.shadow[name].numel()])
        self.num_updates = num_updates
