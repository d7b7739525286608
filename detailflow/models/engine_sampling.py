"""Per-row guidance and Gumbel-max sampling for the generation engine (engine.py).

Usage:
    from detailflow.models.engine_sampling import draw_rows, guide_rows, guide_runs
    logits_QV = guide_rows(logits_TV, pick_Q, partner_Q, scale_Q)           # CFG per sampled token
    logits_QV = guide_runs(logits_TV, plan.runs, plan.n_sampled, scale_U)   # eager plan: strided views
    codes_Q = draw_rows(logits_QV, uniforms_QV, temperature_Q, top_k_Q, top_p_Q, filter_Q)

Every sampled token (Q of them) carries its own request's settings, so one call serves a batch of
requests with different CFG scales, temperatures, top-k and top-p. The arithmetic is the same as
sampler.guide / sampler.filter_logits / sampler.draw for one request (same formulas, same fp32 order):
uncond + s * (cond - uncond) only where s > 1, scores / T, top-k threshold = the k-th largest score,
nucleus over the post-top-k distribution, argmax(scores - log(-log u)); temperature 0 = argmax of the
guided logits. Shapes never depend on the data unless `filter_Q` is an index tensor, so with
filter_Q None or "all" the whole draw can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch


def guide_rows(logits_TV: torch.Tensor, pick_Q: torch.Tensor, partner_Q: torch.Tensor,
               scale_Q: torch.Tensor) -> torch.Tensor:
    """Guided logits of the sampled tokens: uncond + s (cond - uncond) where s > 1, else cond as is.

    pick_Q: index (in T) of each sampled token (its conditional row); partner_Q: index of its
    null-class twin (any index, e.g. itself, when s == 1).
    """
    cond_QV = logits_TV[pick_Q]
    uncond_QV = logits_TV[partner_Q]
    guided_QV = uncond_QV + scale_Q[:, None] * (cond_QV - uncond_QV)
    return torch.where((scale_Q > 1.0)[:, None], guided_QV, cond_QV)


def guide_runs(logits_TV: torch.Tensor, runs: list, n_sampled: int, scale_U: torch.Tensor) -> torch.Tensor:
    """Guided logits of the eager plan's sampled tokens (engine_plan.Run): in a guided run the tokens
    come as (cond row, null row) pairs, read as two strided views (no gathers); CFG scale per pair."""
    if not any(run.guided for run in runs):
        return logits_TV  # every token is sampled, unguided
    out_QV = logits_TV.new_empty(n_sampled, logits_TV.shape[-1])
    pair = 0
    for run in runs:
        n_tok = run.rows * run.width
        run_V = logits_TV[run.tok0:run.tok0 + n_tok]
        if not run.guided:
            out_QV[run.q0:run.q0 + n_tok] = run_V
            continue
        n_pairs = run.rows // 2
        both_P2WV = run_V.unflatten(0, (n_pairs, 2, run.width))
        cond_PWV, uncond_PWV = both_P2WV[:, 0], both_P2WV[:, 1]
        guided_PWV = out_QV[run.q0:run.q0 + n_pairs * run.width].unflatten(0, (n_pairs, run.width))
        # uncond + s * (cond - uncond), in that order of fp32 operations (sampler.guide)
        torch.sub(cond_PWV, uncond_PWV, out=guided_PWV)
        guided_PWV.mul_(scale_U[pair:pair + n_pairs, None, None]).add_(uncond_PWV)
        pair += n_pairs
    return out_QV


def filter_rows(scores_QV: torch.Tensor, top_k_Q: torch.Tensor, top_p_Q: torch.Tensor) -> torch.Tensor:
    """sampler.filter_logits with a top-k and top-p per row (k <= 0 or >= V: none; p >= 1: none)."""
    vocab = scores_QV.shape[-1]
    sorted_QV, order_QV = scores_QV.sort(-1, descending=True)
    k_Q = torch.where((top_k_Q > 0) & (top_k_Q < vocab), top_k_Q, torch.full_like(top_k_Q, vocab))
    kth_Q1 = sorted_QV.gather(-1, (k_Q - 1)[:, None])
    scores_QV = scores_QV.masked_fill(scores_QV < kth_Q1, float("-inf"))
    # The post-top-k scores in descending order: the same value sequence sampler.filter_logits sorts.
    sorted_QV = sorted_QV.masked_fill(sorted_QV < kth_Q1, float("-inf"))
    probs_QV = sorted_QV.softmax(-1)
    mass_before_QV = probs_QV.cumsum(-1) - probs_QV  # keep a token while the mass before it is <= p
    drop_sorted_QV = (mass_before_QV > top_p_Q[:, None]) & (top_p_Q < 1.0)[:, None]
    drop_QV = torch.zeros_like(drop_sorted_QV).scatter(-1, order_QV, drop_sorted_QV)
    return scores_QV.masked_fill(drop_QV, float("-inf"))


def draw_rows(logits_QV: torch.Tensor, uniforms_QV: torch.Tensor, temperature_Q: torch.Tensor,
              top_k_Q: torch.Tensor, top_p_Q: torch.Tensor,
              filter_Q: torch.Tensor | str | None = "all", greedy: bool = True, tempered: bool = True,
              consume_uniforms: bool = False) -> torch.Tensor:
    """Gumbel-max sample per row of softmax(filtered logits / T_row); T_row <= 0 = argmax. Q long.

    filter_Q: None = no row truncates (skips the sort); "all" = apply top-k/top-p to every row (no-op
    rows stay untouched; fixed shapes); an index tensor = only those rows (eager, saves the sort).
    greedy=False / tempered=False promise that no row has T <= 0 / T != 1 (skips that work);
    consume_uniforms=True lets the Gumbel noise overwrite uniforms_QV (no allocation).
    """
    greedy_Q = temperature_Q <= 0
    logits_QV = logits_QV.float()
    scores_QV = logits_QV
    if tempered or greedy:
        scale_Q = torch.where(greedy_Q, torch.ones_like(temperature_Q), temperature_Q)
        scores_QV = logits_QV / scale_Q[:, None]
    if isinstance(filter_Q, str):
        scores_QV = filter_rows(scores_QV, top_k_Q, top_p_Q)
    elif filter_Q is not None:
        scores_QV = scores_QV.index_copy(0, filter_Q, filter_rows(scores_QV[filter_Q], top_k_Q[filter_Q],
                                                                  top_p_Q[filter_Q]))
    # scores + Gumbel(u) = scores - log(-log u); u = 0 gives -inf, never chosen
    neg_log_neg_log_QV = (uniforms_QV.log_() if consume_uniforms else uniforms_QV.log()).neg_().log_()
    sampled_Q = torch.sub(scores_QV, neg_log_neg_log_QV, out=neg_log_neg_log_QV).argmax(-1)
    return torch.where(greedy_Q, logits_QV.argmax(-1), sampled_Q) if greedy else sampled_Q
