"""Self-correction (spec §1.8, §6.6 check 5): position rules, bookkeeping, gradient paths."""

import pytest
import torch
import torch.nn.functional as F

import detailflow.models.tokenizer as tokmod
from detailflow.models.configs import get_model_config
from detailflow.models.degrade import degrade_to_prefix
from detailflow.models.selfcorrect import (
    assemble_channels,
    mixing_weights,
    perturbation_probabilities,
    sample_perturbation,
)
from detailflow.models.tokenizer import DetailFlowTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("t", [2, 3, 5, 8])
def test_positions_inside_causal_prefix(t):
    probs = perturbation_probabilities(t, causal_num=8, group_size=8)
    assert probs == pytest.approx({(j, 1): 1 / t for j in range(t)})


def test_positions_full_prefix_paper_numbers():
    probs = perturbation_probabilities(128, causal_num=8, group_size=8)
    first = sum(p for (j, w), p in probs.items() if j < 8)
    assert first == pytest.approx(8 / 120) and all(w == 1 for (j, w) in probs if j < 8)
    for grp in range(1, 15):
        assert probs[(8 * grp, 8)] == pytest.approx(8 / 120)
    assert (120, 8) not in probs  # the last group of the prefix is never perturbed
    assert sum(probs.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("t,c,g", [(16, 4, 4), (12, 4, 4), (32, 4, 4), (24, 8, 8), (3, 4, 4)])
def test_sampler_matches_exact_distribution(t, c, g):
    gen = torch.Generator().manual_seed(0)
    draws = [sample_perturbation(t, c, g, gen) for _ in range(4000)]
    probs = perturbation_probabilities(t, c, g)
    assert set(draws) <= set(probs)
    for key, p in probs.items():
        assert abs(draws.count(key) / len(draws) - p) < 0.04
    for j, w in draws:
        assert j + w <= (t if t <= c else t - g)


def test_mixing_weights_and_bad_t():
    assert mixing_weights(128, 8, 8) == pytest.approx((128 / 240, 112 / 240))
    assert sum(mixing_weights(16, 0, 1)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        sample_perturbation(1, 4, 4)


def test_assemble_channels():
    clean = torch.arange(8)[None].repeat(2, 1)
    noisy, refined = clean + 100, clean + 200
    out = assemble_channels(clean, noisy, refined, torch.tensor([2, 4]), torch.tensor([3, 8]))
    assert out["input"][0].tolist() == [0, 1, 102, 203, 204, 205, 206, 207]
    assert out["target"][0].tolist() == [0, 1, 2, 203, 204, 205, 206, 207]
    assert out["input"][1].tolist() == [0, 1, 2, 3, 104, 105, 106, 107]
    assert torch.equal(out["target"][1], clean[1])


@pytest.fixture(scope="module")
def smoke_tok():
    torch.manual_seed(0)
    return DetailFlowTokenizer(get_model_config("smoke").tokenizer)


def test_correction_codes_bookkeeping(smoke_tok):
    tok, cfg = smoke_tok, smoke_tok.cfg
    img = torch.rand(4, 3, 32, 32) * 2 - 1
    j = torch.tensor([0, 2, 4, 8])
    w = torch.tensor([1, 1, 4, 4])
    e = j + w
    gen = torch.Generator().manual_seed(1)
    out = tok.correction_codes(img, j, w, generator=gen)
    assert torch.equal(out["clean"], tok.encode(img))
    z = tok.quant_conv(tok.encoder(img)).detach()
    near = tok.quantizer.nearest_k(z, cfg.noise_topk)
    for b in range(4):
        jb, eb = int(j[b]), int(e[b])
        assert torch.equal(out["target"][b, :eb], out["clean"][b, :eb])
        assert torch.equal(out["input"][b, :jb], out["clean"][b, :jb])
        assert torch.equal(out["input"][b, jb:eb], out["noisy"][b, jb:eb])
        assert torch.equal(out["input"][b, eb:], out["target"][b, eb:])
        assert (out["noisy"][b, :, None] == near[b]).any(-1).all()
    # the re-encoded tail is what a manual second pass gives
    noisy_vec = tok.codes_to_vectors(out["noisy"])
    pos = torch.arange(cfg.num_tokens)[None, :, None]
    prefix = torch.where(pos < j[:, None, None], tok.codes_to_vectors(out["clean"]), noisy_vec)
    with torch.no_grad():
        second = tok.quantizer(tok.quant_conv(tok.reencode(img, prefix, e))).idx_BN
    tail = pos[..., 0] >= e[:, None]
    assert torch.equal(out["target"][tail], second[tail])


def test_reencode_prefix_gets_no_gradient(smoke_tok):
    tok = smoke_tok
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    prefix = torch.randn(2, 16, 8, requires_grad=True)
    tok.zero_grad(set_to_none=True)
    tok.reencode(img, prefix, torch.tensor([4, 8])).sum().backward()
    assert prefix.grad is None
    assert tok.refine_proj.weight.grad is not None
    qgrad = tok.encoder.refined_queries.grad
    assert qgrad[:4].abs().sum() == 0 and qgrad[8:].abs().sum() > 0  # queries only at slots >= e
    assert tok.encoder.latent_queries.grad is None


@pytest.mark.parametrize("jw", [(1, 1), (4, 4)])
def test_training_step_corrected_half_sends_no_gradient_to_pass_one(monkeypatch, jw):
    cfg = get_model_config("smoke").tokenizer
    cfg.align_teacher = "none"
    torch.manual_seed(0)
    tok = DetailFlowTokenizer(cfg)
    monkeypatch.setattr(tokmod, "sample_perturbation", lambda *a, **k: jw)
    img = torch.rand(3, 3, 32, 32) * 2 - 1
    t = 12
    target = degrade_to_prefix(img, t, tok.rmap)
    loss, logs = tok.training_step(img, target, t, step=0)
    assert (logs["perturb_start"], logs["perturb_width"]) == jw
    loss.backward()
    g_full = tok.encoder.latent_queries.grad.clone()
    # reference: only the clean half and the weighted pass-1 VQ terms reach the normal queries
    tok.zero_grad(set_to_none=True)
    first = tok.quantize(img)
    w1, _ = mixing_weights(cfg.num_tokens, *jw)
    clean_mse = F.mse_loss(tok.decoder(first.q_BND[:, :t], tok.rmap.canvas_size(t)), target)
    vq1 = first.codebook_loss_BN.mean() + cfg.commit_beta * first.commit_loss_BN.mean()
    (0.5 * clean_mse + w1 * vq1).backward()
    torch.testing.assert_close(g_full, tok.encoder.latent_queries.grad, rtol=1e-4, atol=1e-8)
