"""Group-parallel sampling for DetailFlowGPT (spec §3) with a KV cache.

Usage:
    from detailflow.models.sampler import sample
    gen = torch.Generator().manual_seed(0)
    codes_BN = sample(model, class_ids_B, cfg_scale=1.5, generator=gen)          # 23 passes for N=128
    codes_BN, prefixes = sample(model, class_ids_B, return_prefixes=True)        # prefix codes per step
    sample(model, class_ids_B, on_pass=lambda start, stop, codes_Bt: ...)       # hook after every pass

Decoding plan (sequence positions, c = causal_num, g = group_size): passes [0,1), [1,2), ..,
[c-1,c) produce t_0 .. t_{c-1} one at a time; then chunks [c, c+g), [c+g, c+2g), ... each produce a
whole group (position q's logits give t_q). That is c + (N-c)/g = causal_num + M - 1 passes (c = g).

Modes:
- use_kv_cache=True: each pass runs only its new positions; keys (already rotated) and values of earlier
  positions come from a preallocated cache. The g-1 query embeddings enter once, in chunk [c, c+g).
- use_kv_cache=False: the released code's way, each pass recomputes the whole prefix [0, stop) and
  reads the last positions' logits (the output head is applied to those positions only).
- group_parallel=False: a cost baseline for ordinary next-token decoding with a cache: N passes of one
  position each, position q's logits give t_q. A position then sees only the earlier positions of its
  own block (their neighbours are not computed yet), so this is NOT the trained model's distribution;
  it measures what decoding N tokens one at a time costs with the same network. It is defined with the
  cache only (recomputing the prefix would let earlier block positions see later ones: another model).

Randomness: every pass draws one B x L x V block of uniforms from `generator` (same shapes, same order
in every mode) and picks argmax(logits / T + Gumbel(u)), an exact sample of softmax(logits / T). So the
KV and no-KV paths consume identical random numbers and give identical tokens for the same seed, up to
float noise: the two paths compute logits with differently shaped matmuls (~1e-6 apart). Gumbel-max only
flips a token when the two best perturbed scores are that close; an inverse CDF over 8192 codes would
flip whenever any of its 8192 boundaries moved past the uniform, about 100x more often.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from detailflow.models.ar import DetailFlowGPT, KVCache


def decode_plan(num_tokens: int, group_size: int, causal_num: int, group_parallel: bool = True) -> list:
    """List of (start, stop) position chunks, one per forward pass."""
    if not group_parallel:
        return [(q, q + 1) for q in range(num_tokens)]
    plan = [(q, q + 1) for q in range(causal_num)]
    plan += [(q, q + group_size) for q in range(causal_num, num_tokens, group_size)]
    return plan


def guide(logits_2BLV: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a [cond; uncond] batch: uncond + s * (cond - uncond)."""
    cond, uncond = logits_2BLV.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask to -inf everything outside the top-k and outside the nucleus of mass top_p."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # keep a token while the mass before it is <= top_p
        drop_sorted = mass_before > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw_uniforms(batch: int, length: int, vocab: int, generator: torch.Generator | None,
                  device) -> torch.Tensor:
    """The random numbers of one pass: B x L x V uniforms in [0, 1)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(batch, length, vocab, generator=generator, device=gen_device).to(device)


def draw(logits_BLV: torch.Tensor, uniforms_BLV: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
         top_p: float = 1.0) -> torch.Tensor:
    """Gumbel-max sample of each row of softmax(filtered logits / T); temperature 0 = argmax. B x L long."""
    if temperature <= 0:
        return logits_BLV.argmax(-1)
    scores = logits_BLV.float()
    if temperature != 1.0:
        scores = scores / temperature
    scores = filter_logits(scores, top_k, top_p)
    # scores + Gumbel(u) = scores - log(-log u); u = 0 gives -inf, never chosen
    neg_log_neg_log = uniforms_BLV.to(scores.device, copy=True).log_().neg_().log_()
    return (scores - neg_log_neg_log).argmax(-1)


def step_logits(model: DetailFlowGPT, codes_BN: torch.Tensor, class_ids_B: torch.Tensor, start: int,
                stop: int, cache: KVCache | None) -> torch.Tensor:
    """Logits (fp32) of positions [start, stop) given the codes known so far: one forward pass."""
    if cache is not None:
        return model.run(model.embed_range(codes_BN, class_ids_B, start, stop), start, cache)
    return model.run(model.embed_range(codes_BN, class_ids_B, 0, stop), 0, None, last=stop - start)


@torch.no_grad()
def sample(model: DetailFlowGPT, class_ids_B: torch.Tensor, *, cfg_scale: float = 1.0,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, use_kv_cache: bool = True, group_parallel: bool = True,
           return_prefixes: bool = False, on_pass: Callable[[int, int, torch.Tensor], None] | None = None):
    """Sample B code sequences (B x N long) for the given class ids; see the module docstring.

    cfg_scale == 1 runs the conditional model alone; > 1 doubles the batch with the null class.
    With return_prefixes, also returns the list of prefix codes (B x t) after every pass.
    on_pass(start, stop, codes_Bt) is called after every forward pass (counting, streaming previews).
    """
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}")
    if class_ids_B.dim() != 1:
        raise ValueError(f"class_ids must be 1-D, got shape {tuple(class_ids_B.shape)}")
    if not (group_parallel or use_kv_cache):
        raise ValueError("group_parallel=False (token-by-token baseline) needs use_kv_cache=True")
    cfg = model.cfg
    if ((class_ids_B < 0) | (class_ids_B > cfg.num_classes)).any():
        raise ValueError(f"class ids must be in [0, {cfg.num_classes}] ({cfg.num_classes} = null class)")
    device = model.tok_emb.weight.device
    batch = class_ids_B.shape[0]
    guided = cfg_scale > 1.0
    classes = class_ids_B.to(device)
    if guided:
        classes = torch.cat([classes, torch.full_like(classes, model.null_class)])
    codes = torch.zeros(classes.shape[0], cfg.num_tokens, dtype=torch.long, device=device)
    cache = model.new_cache(classes.shape[0]) if use_kv_cache else None
    prefixes = []
    was_training = model.training
    model.eval()  # dropout off and no class dropout while sampling
    try:
        for start, stop in decode_plan(cfg.num_tokens, cfg.group_size, cfg.causal_num, group_parallel):
            logits = step_logits(model, codes, classes, start, stop, cache)
            if guided:
                logits = guide(logits, cfg_scale)
            uniforms = draw_uniforms(batch, stop - start, cfg.vocab_size, generator, device)
            new = draw(logits, uniforms, temperature, top_k, top_p)
            codes[:, start:stop] = new.repeat(2, 1) if guided else new
            if return_prefixes:
                prefixes.append(codes[:batch, :stop].clone())
            if on_pass is not None:
                on_pass(start, stop, codes[:batch, :stop])
    finally:
        model.train(was_training)
    out = codes[:batch]
    return (out, prefixes) if return_prefixes else out
