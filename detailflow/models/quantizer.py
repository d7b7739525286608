"""l2-normalised vector quantiser (spec §1.3): nearest code by cosine, straight-through estimator,
codebook + commitment losses, noisy top-k codes for self-correction, usage monitor and perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class QuantOut:
    q_BND: torch.Tensor  # straight-through quantised vectors (value = code, gradient -> z)
    idx_BN: torch.Tensor  # nearest code indices
    codebook_loss_BN: torch.Tensor  # per-token ||e - sg(z)||^2 / D (mean over the code dim)
    commit_loss_BN: torch.Tensor  # per-token ||z - sg(e)||^2 / D
    noisy_idx_BN: torch.Tensor | None = None  # uniform pick among the k nearest codes (if asked)


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, code_dim: int, usage_window: int = 65536, init_norm: float = 1.0):
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        weight = torch.empty(codebook_size, code_dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        # every lookup re-normalises, so init_norm leaves the codes unchanged; it only sets how fast Adam
        # turns them (angular step ~ lr / row norm). 1.0 is the spec's; see TokenizerConfig.codebook_init_norm
        self.embedding = nn.Parameter(F.normalize(weight, dim=-1) * init_norm)
        # ring buffer of the last `usage_window` assigned indices (-1 = empty); not saved in checkpoints
        self.register_buffer("_recent", torch.full((usage_window,), -1, dtype=torch.long), persistent=False)
        self._cursor = 0

    def codebook(self) -> torch.Tensor:
        """The l2-normalised K x D codebook used for every lookup."""
        return F.normalize(self.embedding.float(), dim=-1)

    def lookup(self, idx: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Indices (any shape) -> unit code vectors (shape + D). check=False skips the range check (two
        host syncs) for indices valid by construction (the training step's own top-k draws)."""
        if check and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.codebook_size):
            raise ValueError(
                f"code indices must be in [0, {self.codebook_size}), got [{int(idx.min())}, {int(idx.max())}]"
            )
        return F.embedding(idx, self.codebook())

    def forward(
        self, z_BND: torch.Tensor, noise_topk: int = 0, generator: torch.Generator | None = None
    ) -> QuantOut:
        z = F.normalize(z_BND.float(), dim=-1)
        book = self.codebook()
        sim_BNK = z @ book.t()  # on unit vectors, max cosine == min squared distance
        idx = sim_BNK.argmax(dim=-1)
        e = F.embedding(idx, book)
        codebook_loss = (e - z.detach()).pow(2).mean(dim=-1)
        commit_loss = (z - e.detach()).pow(2).mean(dim=-1)
        q = z + (e - z).detach()
        noisy = self.noisy_indices(sim_BNK, noise_topk, generator) if noise_topk > 0 else None
        if self.training and torch.is_grad_enabled():  # only training assignments count as usage
            self._remember(idx)
        return QuantOut(q.to(z_BND.dtype), idx, codebook_loss, commit_loss, noisy)

    @staticmethod
    def noisy_indices(
        sim_BNK: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """For every token an index drawn uniformly among its k most similar codes (nearest included)."""
        k = min(k, sim_BNK.shape[-1])
        top_BNk = sim_BNK.topk(k, dim=-1).indices
        dev = generator.device if generator is not None else top_BNk.device
        pick = torch.randint(k, top_BNk.shape[:-1] + (1,), generator=generator, device=dev)
        return top_BNk.gather(-1, pick.to(top_BNk.device)).squeeze(-1)

    def nearest_k(self, z_BND: torch.Tensor, k: int) -> torch.Tensor:
        """The k nearest code indices of every vector (B x N x k), for checks."""
        sim = F.normalize(z_BND.float(), dim=-1) @ self.codebook().t()
        return sim.topk(min(k, self.codebook_size), dim=-1).indices

    @torch.no_grad()
    def _remember(self, idx: torch.Tensor) -> None:
        flat = idx.reshape(-1)
        size = self._recent.numel()
        if flat.numel() >= size:
            self._recent.copy_(flat[-size:])
            self._cursor = 0
            return
        end = self._cursor + flat.numel()
        if end <= size:
            self._recent[self._cursor : end] = flat
        else:
            cut = size - self._cursor
            self._recent[self._cursor :] = flat[:cut]
            self._recent[: end - size] = flat[cut:]
        self._cursor = end % size

    @torch.no_grad()
    def usage(self) -> torch.Tensor:
        """Fraction of the codebook among the last `usage_window` indices assigned in training
        (0-dim tensor; fixed-size histogram, no host sync)."""
        seen = torch.zeros(self.codebook_size + 1, device=self._recent.device)  # slot 0: unfilled (-1)
        seen.index_fill_(0, self._recent.reshape(-1) + 1, 1.0)
        return seen[1:].sum() / self.codebook_size

    @torch.no_grad()
    def perplexity(self, idx: torch.Tensor) -> torch.Tensor:
        """exp(entropy) of the code histogram of one batch of indices (0-dim tensor, no host sync)."""
        flat = idx.reshape(-1)
        counts = torch.zeros(self.codebook_size, device=flat.device).index_add_(
            0, flat, torch.ones(flat.shape, device=flat.device))
        p = counts / counts.sum().clamp_min(1)
        return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
