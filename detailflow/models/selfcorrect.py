"""Self-correction bookkeeping (spec §1.8): where to perturb, how wide, loss mixing, index channels.

Position rule for prefix length t (N tokens, group g, causal prefix c):
    j ~ U{0..t-1} if t <= c else U{0..t-g-1};  j >= c snaps down to its group start;
    width w = 1 inside the causal prefix, g otherwise;  end e = j + w.
"""

from __future__ import annotations

import torch


def perturbation_width(j: int, causal_num: int, group_size: int) -> int:
    return 1 if j < causal_num else group_size


def _snap(j: int, causal_num: int, group_size: int) -> int:
    return j if j < causal_num else group_size * (j // group_size)


def _raw_range(t: int, causal_num: int, group_size: int) -> int:
    if t < 2:
        raise ValueError(f"self-correction needs a prefix of at least 2 tokens, got t={t}")
    return t if t <= causal_num else t - group_size


def sample_perturbation(
    t: int, causal_num: int, group_size: int, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """(j, w): start and width of the perturbed span for prefix length t."""
    hi = _raw_range(t, causal_num, group_size)
    j = int(
        torch.randint(
            hi, (1,), generator=generator, device=generator.device if generator is not None else "cpu"
        )
    )
    j = _snap(j, causal_num, group_size)
    return j, perturbation_width(j, causal_num, group_size)


def perturbation_probabilities(t: int, causal_num: int, group_size: int) -> dict[tuple[int, int], float]:
    """Exact distribution of sample_perturbation: {(j, w): probability}."""
    hi = _raw_range(t, causal_num, group_size)
    probs: dict[tuple[int, int], float] = {}
    for raw in range(hi):
        j = _snap(raw, causal_num, group_size)
        key = (j, perturbation_width(j, causal_num, group_size))
        probs[key] = probs.get(key, 0.0) + 1.0 / hi
    return probs


def mixing_weights(num_tokens: int, j: int, w: int) -> tuple[float, float]:
    """Weights of the clean pass and the re-encoding pass in the codebook/commit losses."""
    denom = 2 * num_tokens - j - w
    return num_tokens / denom, (num_tokens - j - w) / denom


def span_masks(j_B: torch.Tensor, e_B: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy_BN, tail_BN): positions in [j, e) and positions >= e, per sample."""
    pos = torch.arange(num_tokens, device=j_B.device)[None, :]
    return (pos >= j_B[:, None]) & (pos < e_B[:, None]), pos >= e_B[:, None]


def assemble_channels(
    clean_BN: torch.Tensor,
    noisy_BN: torch.Tensor,
    refined_BN: torch.Tensor,
    j_B: torch.Tensor,
    e_B: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Index channels used by AR extraction: input = clean | noisy [j,e) | re-encoded >= e;
    label = clean < e | re-encoded >= e."""
    in_span, tail = span_masks(j_B, e_B, clean_BN.shape[1])
    inp = torch.where(in_span, noisy_BN, torch.where(tail, refined_BN, clean_BN))
    label = torch.where(tail, refined_BN, clean_BN)
    return {"clean": clean_BN, "input": inp, "target": label}
