"""DetailFlowGPT mechanisms (spec §2.1-§2.4, checks §6.6): mask, layout, RoPE, class dropout, loss,
param groups, EMA, self-correction pair selection, export round trip."""

import dataclasses
import math

import pytest
import torch

from detailflow.models.ar import DetailFlowGPT, group_causal_mask, select_correction_pairs
from detailflow.models.configs import ARConfig, get_model_config
from detailflow.models.ema import EMA
from detailflow.models.export import load_state_checked, save_pretrained
from detailflow.models.rope import apply_rope, rope_2d_tables

GEOMETRIES = [(16, 4, 4), (32, 4, 4), (32, 8, 8), (24, 4, 8)]  # (N, g, causal_num)


def tiny_cfg(n=16, g=4, c=4, **kw) -> ARConfig:
    base = dict(vocab_size=37, num_classes=5, num_tokens=n, group_size=g, causal_num=c, dim=32, depth=2,
                heads=2, ffn_multiple_of=16)
    return ARConfig(**{**base, **kw})


def random_model(cfg: ARConfig, seed=0) -> DetailFlowGPT:
    torch.manual_seed(seed)
    model = DetailFlowGPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, 0.0, 0.3)  # the zero-init head would make every logit 0
    return model


def test_mask_matches_worked_example():
    # spec §2.2 table for N = 16, g = 4: the columns each row may see
    sees = {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3]}
    sees |= {r: list(range(8)) for r in range(4, 8)}
    sees |= {r: list(range(12)) for r in range(8, 12)}
    sees |= {r: list(range(16)) for r in range(12, 16)}
    expected = torch.zeros(16, 16, dtype=torch.bool)
    for r, cols in sees.items():
        expected[r, cols] = True
    assert torch.equal(group_causal_mask(16, 4, 4), expected)


@pytest.mark.parametrize("n,g,c", GEOMETRIES)
def test_mask_rule(n, g, c):
    m = group_causal_mask(n, g, c)
    for i in range(n):
        for j in range(n):
            assert m[i, j] == ((j <= i) if i < c else (i // g >= j // g))


@pytest.mark.parametrize("n,g,c", GEOMETRIES)
def test_layout_and_causality(n, g, c):
    """Changing input code t_j changes exactly the logits of rows allowed to see its position."""
    cfg = tiny_cfg(n, g, c)
    model = random_model(cfg)
    cls = torch.tensor([1, 3])
    codes = torch.randint(cfg.vocab_size, (2, n))
    base = model(codes, cls)
    assert base.shape == (2, n, cfg.vocab_size) and base.dtype == torch.float32
    mask = group_causal_mask(n, g, c)
    for j in range(n - g):
        pos = j + 1 if j < c else j + g  # t_j sits after cls, and after the g-1 queries once j >= c
        other = codes.clone()
        other[:, j] = (other[:, j] + 1) % cfg.vocab_size
        changed = (model(other, cls) - base).abs().amax(dim=(0, 2)) > 0
        assert torch.equal(changed, mask[:, pos]), f"t_{j} at position {pos}"
    # the last group is never an input: a longer input is cut to its first N - g codes
    longer = torch.cat([codes, torch.randint(cfg.vocab_size, (2, 3))], dim=1)
    assert torch.equal(model(longer, cls), base)


def test_query_embeddings_sit_after_first_causal_block():
    cfg = tiny_cfg(16, 4, 4)
    model = random_model(cfg)
    codes = torch.randint(cfg.vocab_size, (1, 16))
    x = model.embed_range(codes, torch.tensor([2]), 0, 16)
    assert torch.equal(x[0, 0], model.cls_emb.weight[2])
    assert torch.equal(x[0, 1:5], model.tok_emb(codes[0, :4]))
    assert torch.equal(x[0, 5:8], model.query_emb)
    assert torch.equal(x[0, 8:16], model.tok_emb(codes[0, 4:12]))
    assert torch.equal(model.embed_range(codes, torch.tensor([2]), 6, 10), x[:, 6:10])


@pytest.mark.parametrize("head_dim,g", [(8, 4), (24, 4), (64, 8)])
def test_rope_2d(head_dim, g):
    n = 4 * g + 1
    cos, sin = rope_2d_tables(n, g, head_dim)
    assert cos.shape == (n, head_dim // 2)
    assert torch.all(cos[0] == 0) and torch.all(sin[0] == 0)  # class token quirk: q, k zeroed
    x = torch.randn(1, 1, n, head_dim)
    rx = apply_rope(x, cos, sin)
    assert torch.all(rx[..., 0, :] == 0)
    torch.testing.assert_close(rx[..., 1:, :].norm(dim=-1), x[..., 1:, :].norm(dim=-1))
    # position 1 = (row 0, col 0): identity; position g+1 = (row 1, col 0): only the first half rotates
    torch.testing.assert_close(rx[..., 1, :], x[..., 1, :])
    q = x[..., g + 1, :]
    assert torch.equal(rx[..., g + 1, head_dim // 2:], q[..., head_dim // 2:])
    assert not torch.allclose(rx[..., g + 1, :head_dim // 2], q[..., :head_dim // 2])
    # scores depend on (row, col) offsets only: (r1,c0)-(r0,c1) == (r2,c1)-(r1,c2)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(sq, sk):
        rq = apply_rope(q.view(1, 1, 1, -1), cos[sq:sq + 1], sin[sq:sq + 1])
        rk = apply_rope(k.view(1, 1, 1, -1), cos[sk:sk + 1], sin[sk:sk + 1])
        return (rq * rk).sum()

    pos = lambda r, c: 1 + r * g + c
    torch.testing.assert_close(score(pos(1, 0), pos(0, 1)), score(pos(2, 1), pos(1, 2)))


def test_class_dropout_frequency():
    model = DetailFlowGPT(tiny_cfg()).train()
    torch.manual_seed(0)
    n, p = 20000, model.cfg.class_dropout
    ids = model.drop_classes(torch.randint(model.cfg.num_classes, (n,)))
    nulls = (ids == model.null_class).sum().item()
    assert abs(nulls - n * p) < 5 * math.sqrt(n * p * (1 - p))
    model.eval()
    ids = torch.randint(model.cfg.num_classes, (n,))
    assert torch.equal(model.drop_classes(ids), ids)


def test_forward_applies_class_dropout_only_in_train_mode():
    model = DetailFlowGPT(tiny_cfg(class_dropout=0.5))
    seen = []
    model.cls_emb.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    codes, cls = torch.randint(37, (400, 16)), torch.zeros(400, dtype=torch.long)
    model.train()(codes, cls)
    model.eval()(codes, cls)
    assert 100 < (seen[0] == model.null_class).sum() < 300
    assert (seen[1] == 0).all()


def test_dropout_only_in_train_mode():
    model = random_model(tiny_cfg())
    codes, cls = torch.randint(37, (2, 16)), torch.tensor([0, 1])
    assert torch.equal(model(codes, cls), model(codes, cls))
    model.train()
    assert not torch.equal(model(codes, cls), model(codes, cls))


def test_init_and_loss():
    cfg = tiny_cfg()
    model = DetailFlowGPT(cfg).eval()
    assert torch.all(model.head.weight == 0)
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.004
    assert all(b.bias is None for b in model.modules() if isinstance(b, torch.nn.Linear))
    codes_in, target = torch.randint(37, (3, 16)), torch.randint(37, (3, 16))
    cls = torch.tensor([0, 1, 2])
    # zero head: uniform predictions, CE = log V exactly
    torch.testing.assert_close(model.loss(codes_in, target, cls), torch.tensor(math.log(cfg.vocab_size)))
    model = random_model(cfg)
    logits = model(codes_in, cls)
    manual = -torch.log_softmax(logits, -1).gather(-1, target[..., None]).mean()
    torch.testing.assert_close(model.loss(codes_in, target, cls), manual)


def test_param_groups():
    model = DetailFlowGPT(tiny_cfg())
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * model.cfg.depth + 1  # RMSNorm gains only
    ids = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}
    assert any(p is model.query_emb for p in decay["params"])


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.999])
def test_ema(decay):
    model = DetailFlowGPT(tiny_cfg())
    ema = EMA(model, decay)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], decay * start[n] + (1 - decay) * p)
    other = DetailFlowGPT(tiny_cfg())
    ema.copy_to(other)
    torch.testing.assert_close(other.tok_emb.weight, ema.shadow["tok_emb.weight"])
    restored = EMA(DetailFlowGPT(tiny_cfg()), 0.1)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == decay and restored.num_updates == 1
    assert all(torch.equal(restored.shadow[n], t) for n, t in ema.shadow.items())
    with pytest.raises(ValueError):
        EMA(model, 1.5)


@pytest.mark.parametrize("views", [0, 3])
def test_select_correction_pairs(views):
    b, n = 4000, 8
    shape = (b, views, n) if views else (b, n)
    clean = torch.randint(0, 100, shape)
    inp, target = clean + 1000, clean + 2000
    gen = torch.Generator().manual_seed(0)
    x0, y0 = select_correction_pairs(clean, inp, target, 0.0)
    assert (x0 < 1000).all() and torch.equal(x0, y0)
    x, y = select_correction_pairs(clean, inp, target, 0.3, generator=gen)
    assert x.shape == y.shape == (b, n)
    used = x[:, 0] >= 1000
    assert torch.equal(used, y[:, 0] >= 2000)  # input and target come from the same choice
    assert torch.equal(torch.where(used[:, None], x - 1000, x), torch.where(used[:, None], y - 2000, y))
    assert abs(used.sum().item() - 0.3 * b) < 5 * math.sqrt(b * 0.21)
    if views:  # every sample takes one whole view, views chosen roughly uniformly
        base = torch.where(used[:, None], x - 1000, x)
        which = (clean == base[:, None]).all(-1).float().argmax(-1)
        assert torch.bincount(which, minlength=views).min() > b / views * 0.8
    x1, _ = select_correction_pairs(clean, inp, target, 1.0)
    assert (x1 >= 1000).all()
    with pytest.raises(ValueError, match="triplets"):
        select_correction_pairs(clean, inp[:1], target)


def test_export_round_trip_ar(tmp_path):
    cfg = tiny_cfg()
    model = random_model(cfg, seed=3)
    save_pretrained(model, dataclasses.asdict(cfg), tmp_path)
    fresh = DetailFlowGPT(cfg).eval()
    loaded = load_state_checked(fresh, tmp_path)
    assert ARConfig(**loaded) == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(),
                                                  strict=True))
    codes, cls = torch.randint(37, (2, 16)), torch.tensor([0, 4])
    assert torch.equal(model(codes, cls), fresh(codes, cls))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_state_checked(DetailFlowGPT(tiny_cfg(vocab_size=38)), tmp_path)


def test_bad_inputs():
    model = DetailFlowGPT(get_model_config("smoke").ar)
    with pytest.raises(ValueError, match="N-g"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 16, dtype=torch.long), torch.zeros(3, dtype=torch.long))
