"""Layers whose running state stays float32 when the module is cast to bf16/fp16 (the discriminator).

A bf16 engine casts the discriminator: DeepSpeed >= 0.19 casts the parameters only (`p.data = p.data.to(
bf16)`, buffers keep their dtype unless `buffer_dtype` is set); older DeepSpeed and `module.bfloat16()`
cast the floating buffers too. Both broke the stock layers: spectral norm's power-iteration vectors
`_u/_v` in fp32 against a bf16 weight (`addmv input tensors must have the same dtype`), BatchNorm's fp32
running stats against bf16 weights, and EMAs stored in bf16 freeze (0.999 * x rounds back to x).

  * Fp32Buffers: mixin; the buffers named in `fp32_buffers` stay float32 through `.to()/.half()/
    .bfloat16()` (device moves still apply), and `ensure_fp32()` re-materialises them in float32 after
    a cast that bypassed `_apply` (`b.data = ...`);
  * spectral_norm(module): the power iteration and sigma in float32, u/v kept float32, the normalised
    weight returned in the weight's dtype. State-dict keys equal torch's parametrizations.spectral_norm;
  * BatchNorm1dFp32: statistics and affine in float32, output in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize


class Fp32Buffers:
    """Mixin for nn.Module subclasses: `fp32_buffers` (names of own buffers) stay float32."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers[n] for n in self.fp32_buffers if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:  # the cast changed its dtype: keep the fp32 values, move only
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return out

    def ensure_fp32(self) -> None:
        for name in self.fp32_buffers:
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()


class SpectralNormFp32(Fp32Buffers, nn.Module):
    """W / sigma(W), sigma by power iteration (torch's algorithm) computed in float32."""

    fp32_buffers = ("_u", "_v")

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, eps: float = 1e-12):
        super().__init__()
        if weight.ndim < 2:
            raise ValueError(f"spectral_norm needs a weight with >= 2 dims, got shape {tuple(weight.shape)}")
        self.n_power_iterations, self.eps = n_power_iterations, eps
        w_mat = weight.detach().flatten(1).float()
        u = w_mat.new_empty(w_mat.shape[0]).normal_(0, 1)
        v = w_mat.new_empty(w_mat.shape[1]).normal_(0, 1)
        self.register_buffer("_u", F.normalize(u, dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(v, dim=0, eps=eps))
        self._power_method(w_mat, 15)

    @torch.no_grad()
    def _power_method(self, w_mat: torch.Tensor, n: int) -> None:
        u, v = self._u, self._v
        for _ in range(n):
            u = F.normalize(torch.mv(w_mat, v), dim=0, eps=self.eps)
            v = F.normalize(torch.mv(w_mat.t(), u), dim=0, eps=self.eps)
        self._u.copy_(u)  # in place: the buffers stay the module's own tensors
        self._v.copy_(v)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.ensure_fp32()
        w_mat = weight.flatten(1).float()
        if self.training:
            self._power_method(w_mat.detach(), self.n_power_iterations)
        u, v = self._u.clone(), self._v.clone()  # clones: a later in-place update must not break backward
        sigma = torch.dot(u, torch.mv(w_mat, v))
        return (weight.float() / sigma).to(weight.dtype)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value


def spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Register SpectralNormFp32 on module.<name> (dim 0 = output channels, as torch's for convs)."""
    parametrize.register_parametrization(module, name, SpectralNormFp32(getattr(module, name)))
    return module


class BatchNorm1dFp32(Fp32Buffers, nn.BatchNorm1d):
    """BatchNorm1d computed in float32 (running stats, affine), returned in the input's dtype."""

    fp32_buffers = ("running_mean", "running_var")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ensure_fp32()
        if self.training:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight.float(),
                         self.bias.float(), self.training, self.momentum, self.eps)
        return y.to(x.dtype)
