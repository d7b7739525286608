"""Group-parallel sampler (spec §3, checks §6.6 items 6-7): KV cache == recompute, teacher forcing ==
incremental logits, pass counts, CFG, top-k/top-p, prefixes."""

import math

import pytest
import torch
from ar_models import make_model

from detailflow.models.sampler import (
    decode_plan,
    draw,
    draw_uniforms,
    filter_logits,
    guide,
    sample,
    step_logits,
)

GEOMETRIES = [(16, 4, 4), (32, 8, 8), (24, 4, 8)]  # (N, g, causal_num)


def count_passes(model, **kw):
    calls = []
    handle = model.norm.register_forward_hook(lambda *a: calls.append(1))  # final norm: once per pass
    try:
        sample(model, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0), **kw)
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("n,g,c", GEOMETRIES)
@pytest.mark.parametrize("kv", [True, False])
def test_forward_pass_count(n, g, c, kv):
    model = make_model(n, g, c)
    expected = c + (n - c) // g
    if c == g:
        assert expected == model.cfg.forward_passes == c + model.cfg.num_groups - 1
    assert count_passes(model, use_kv_cache=kv) == expected
    assert count_passes(model, use_kv_cache=kv, cfg_scale=2.0) == expected
    if kv:
        assert count_passes(model, group_parallel=False) == n
    seen = []
    sample(model, torch.tensor([3]), use_kv_cache=kv,
           on_pass=lambda s, e, codes: seen.append((s, e, codes.shape)))
    assert seen == [(s, e, (1, e)) for s, e in decode_plan(n, g, c)] and len(seen) == expected


@pytest.mark.parametrize("n,g,c", GEOMETRIES)
def test_teacher_forcing_equals_incremental(n, g, c):
    model = make_model(n, g, c)
    cls = torch.tensor([0, 2, 5])
    codes = sample(model, cls, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tf = model(codes, cls)
        cache = model.new_cache(3)
        for start, stop in decode_plan(n, g, c):
            torch.testing.assert_close(step_logits(model, codes, cls, start, stop, cache), tf[:, start:stop],
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(step_logits(model, codes, cls, start, stop, None), tf[:, start:stop],
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,g,c", GEOMETRIES)
@pytest.mark.parametrize("cfg_scale,top_k,top_p", [(1.0, 0, 1.0), (1.5, 0, 1.0), (3.0, 10, 1.0),
                                                   (1.5, 0, 0.8), (2.0, 20, 0.9)])
def test_kv_cache_gives_same_tokens_as_recompute(n, g, c, cfg_scale, top_k, top_p):
    model = make_model(n, g, c)
    cls = torch.tensor([0, 1, 2, 3, 4, 5])
    for seed in range(3):
        kw = dict(cfg_scale=cfg_scale, top_k=top_k, top_p=top_p)
        a = sample(model, cls, generator=torch.Generator().manual_seed(seed), **kw)
        b = sample(model, cls, generator=torch.Generator().manual_seed(seed), use_kv_cache=False, **kw)
        assert torch.equal(a, b), f"seed {seed}"
        assert a.shape == (6, n) and a.dtype == torch.long and a.min() >= 0 and a.max() < 48
    other = sample(model, cls, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(other, sample(model, cls, generator=torch.Generator().manual_seed(98)))


def guided_tf_logits(model, codes, cls, cfg_scale):
    logits = model(codes, cls)
    if cfg_scale == 1:
        return logits
    return guide(torch.cat([logits, model(codes, torch.full_like(cls, model.null_class))]), cfg_scale)


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5, 4.0])
def test_cfg_against_teacher_forcing(cfg_scale):
    """Replaying the sampler's uniforms on teacher-forcing logits reproduces its tokens; scale 1 uses the
    conditional logits alone, scale s uses uncond + s (cond - uncond)."""
    model = make_model()
    cls = torch.tensor([1, 3, 4])
    codes = sample(model, cls, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = guided_tf_logits(model, codes, cls, cfg_scale)
    gen = torch.Generator().manual_seed(5)
    for start, stop in decode_plan(16, 4, 4):
        u = draw_uniforms(3, stop - start, 48, gen, "cpu")
        assert torch.equal(draw(logits[:, start:stop], u), codes[:, start:stop])
    greedy = sample(model, cls, cfg_scale=cfg_scale, temperature=0.0)
    with torch.no_grad():
        logits = guided_tf_logits(model, greedy, cls, cfg_scale)
    assert torch.equal(logits.argmax(-1), greedy)


def test_cfg_scale_one_does_not_double_batch():
    model = make_model()
    sizes = []
    model.norm.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))
    sample(model, torch.tensor([0, 1]), cfg_scale=1.0)
    sample(model, torch.tensor([0, 1]), cfg_scale=1.2)
    assert set(sizes[:7]) == {2} and set(sizes[7:]) == {4}


def test_return_prefixes_and_token_by_token():
    model = make_model()
    cls = torch.tensor([0, 1])
    codes, prefixes = sample(model, cls, generator=torch.Generator().manual_seed(2), return_prefixes=True)
    assert [p.shape[1] for p in prefixes] == [1, 2, 3, 4, 8, 12, 16]
    assert all(torch.equal(p, codes[:, :p.shape[1]]) for p in prefixes)
    tbt, tbt_prefixes = sample(model, cls, generator=torch.Generator().manual_seed(2), group_parallel=False,
                               return_prefixes=True)
    assert [p.shape[1] for p in tbt_prefixes] == list(range(1, 17))
    assert torch.equal(tbt[:, :4], codes[:, :4])  # identical first (token-causal) group
    with pytest.raises(ValueError, match="token-by-token"):
        sample(model, cls, group_parallel=False, use_kv_cache=False)


def test_filter_and_draw_statistics():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda x: torch.isfinite(x).tolist()
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.45)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.6)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.85)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_k=3, top_p=0.99)) == [True, True, True, False]
    n = 40000
    gen = torch.Generator().manual_seed(0)
    x = draw(logits.expand(n, 1, 4), torch.rand(n, 1, 4, generator=gen))
    counts = torch.bincount(x.flatten(), minlength=4).float()
    for k, p in enumerate([0.5, 0.3, 0.15, 0.05]):
        assert abs(counts[k] - n * p) < 5 * math.sqrt(n * p * (1 - p))
    y = draw(logits.expand(n, 1, 4), torch.rand(n, 1, 4, generator=gen), top_k=2)
    assert set(y.unique().tolist()) == {0, 1}
    assert abs((y == 0).float().mean() - 0.5 / 0.8) < 0.02
    z = draw(logits.expand(n, 1, 4), torch.rand(n, 1, 4, generator=gen), temperature=2.0)
    tempered = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    tempered /= tempered.sum()
    freq = torch.bincount(z.flatten(), minlength=4).float() / n
    assert torch.allclose(freq, tempered, atol=0.015)
    greedy = draw(logits.expand(2, 1, 4), torch.rand(2, 1, 4), temperature=0)
    assert torch.equal(greedy, torch.zeros(2, 1).long())


def test_bf16_and_train_mode_restored():
    model = make_model().to(torch.bfloat16).train()
    codes = sample(model, torch.tensor([0, 1]), cfg_scale=1.5, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 16) and model.training
    assert model.new_cache(1).k[0].dtype == torch.bfloat16


def test_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="cfg_scale"):
        sample(model, torch.tensor([0]), cfg_scale=0.5)
    with pytest.raises(ValueError, match="class ids"):
        sample(model, torch.tensor([7]))
    with pytest.raises(ValueError, match="1-D"):
        sample(model, torch.tensor([[0]]))


@pytest.mark.gpu
def test_cuda_kv_equals_recompute_and_bf16():
    model = make_model().cuda()
    cls = torch.tensor([0, 1, 2, 3], device="cuda")
    gen = lambda: torch.Generator(device="cuda").manual_seed(4)
    a = sample(model, cls, cfg_scale=1.5, generator=gen())
    b = sample(model, cls, cfg_scale=1.5, generator=gen(), use_kv_cache=False)
    assert a.is_cuda and torch.equal(a, b)
    model = model.to(torch.bfloat16)
    codes = sample(model, cls, cfg_scale=1.5, top_k=10, generator=gen())
    assert codes.shape == (4, 16) and codes.max() < 48


@pytest.mark.parametrize("scale", [0.0, 1.0, 1.5, 3.0, -0.5])
def test_guide_matches_the_cfg_closed_form_on_hand_made_logits(scale):
    """CFG (spec §3): uncond + s (cond - uncond), written out per entry by hand, never via guide.
    s = 0 gives the unconditional logits, s = 1 the conditional ones."""
    cond = [[[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]]]  # 1 x 2 x 3 (B x L x V)
    uncond = [[[1.0, 1.0, -0.5], [4.0, -3.0, 0.25]]]
    want = [[[u + scale * (c - u) for c, u in zip(cr, ur, strict=True)]
             for cr, ur in zip(cb, ub, strict=True)] for cb, ub in zip(cond, uncond, strict=True)]
    got = guide(torch.tensor(cond + uncond), scale)  # the batch is [cond; uncond]
    assert got.shape == (1, 2, 3)
    assert torch.allclose(got, torch.tensor(want), atol=1e-6), (got.tolist(), want)
    if scale == 0.0:
        assert got.tolist() == uncond
    if scale == 1.0:
        assert got.tolist() == cond
