"""Exponential moving average of model parameters (spec §2.4: decay 0.9999, tiny 0.999).

Usage:
    ema = EMA(model, decay=0.999)
    ... optimizer.step(); ema.update(model)
    ema.copy_to(eval_model)                  # evaluation / export uses the EMA weights
    save_file(ema.state_dict(), ...)         # flat name -> tensor dict (safetensors friendly)
"""

from __future__ import annotations

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
