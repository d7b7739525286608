"""l2-normalised VQ (spec §1.3): straight-through, norms, losses, noisy top-k, usage/perplexity."""

import pytest
import torch
import torch.nn.functional as F

from detailflow.models.quantizer import VectorQuantizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("k,d", [(64, 8), (256, 4)])
def test_nearest_norms_and_losses(k, d):
    torch.manual_seed(0)
    vq = VectorQuantizer(k, d, usage_window=128)
    z = torch.randn(3, 10, d, requires_grad=True)
    out = vq(z)
    assert torch.allclose(out.q_BND.norm(dim=-1), torch.ones(3, 10), atol=1e-5)
    book = vq.codebook()
    assert torch.allclose(book.norm(dim=-1), torch.ones(k), atol=1e-6)
    brute = torch.cdist(F.normalize(z.detach(), dim=-1).reshape(-1, d), book).argmin(-1).reshape(3, 10)
    assert torch.equal(out.idx_BN, brute)
    torch.testing.assert_close(out.q_BND.detach(), book[out.idx_BN])
    zn = F.normalize(z.detach(), dim=-1)
    torch.testing.assert_close(out.codebook_loss_BN, (book[out.idx_BN] - zn).pow(2).mean(-1))
    torch.testing.assert_close(out.commit_loss_BN, out.codebook_loss_BN)


def test_straight_through_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 8)
    z = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(2, 5, 8)
    (vq(z).q_BND * w).sum().backward()
    # q = normalize(z) + const: the gradient is exactly that of normalize(z) . w
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=-1) * w).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)
    assert vq.embedding.grad is None  # the ST output gives the codebook no gradient


def test_codebook_and_commit_gradients_go_to_the_right_side():
    vq = VectorQuantizer(16, 4)
    z = torch.randn(2, 3, 4, requires_grad=True)
    out = vq(z)
    out.codebook_loss_BN.sum().backward(retain_graph=True)
    assert z.grad is None and vq.embedding.grad is not None
    vq.embedding.grad = None
    out.commit_loss_BN.sum().backward()
    assert z.grad is not None and vq.embedding.grad is None


@pytest.mark.parametrize("topk", [1, 4, 8])
def test_noisy_codes_within_k_nearest(topk):
    vq = VectorQuantizer(64, 8)
    z = torch.randn(4, 32, 8)
    gen = torch.Generator().manual_seed(3)
    out = vq(z, noise_topk=topk, generator=gen)
    near = vq.nearest_k(z, topk)
    assert (out.noisy_idx_BN[..., None] == near).any(-1).all()
    if topk == 1:
        assert torch.equal(out.noisy_idx_BN, out.idx_BN)
    else:  # uniform-ish: the nearest is picked about 1/k of the time, never always
        frac = (out.noisy_idx_BN == out.idx_BN).float().mean()
        assert 0.0 < frac < 0.6


def test_noisy_pick_is_uniform():
    vq = VectorQuantizer(16, 4)
    z = torch.randn(1, 1, 4).expand(1, 20000, 4)
    out = vq(z, noise_topk=4, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(out.noisy_idx_BN.flatten(), minlength=16)
    assert (counts > 0).sum() == 4
    assert (counts[counts > 0].float() / 20000 - 0.25).abs().max() < 0.02


def test_usage_window_and_perplexity():
    vq = VectorQuantizer(8, 4, usage_window=6).train()
    vq._remember(torch.tensor([0, 1, 2, 3]))
    assert vq.usage() == pytest.approx(4 / 8)
    vq._remember(torch.tensor([4, 4, 4, 4]))  # ring buffer keeps the last 6: [2, 3, 4, 4, 4, 4]
    assert vq.usage() == pytest.approx(3 / 8)
    vq._remember(torch.arange(8))
    assert vq.usage() == pytest.approx(6 / 8)
    assert vq.perplexity(torch.arange(8)) == pytest.approx(8.0, rel=1e-5)
    assert vq.perplexity(torch.zeros(10, dtype=torch.long)) == pytest.approx(1.0)
    with torch.no_grad():  # eval-style calls do not count
        vq(torch.randn(1, 50, 4))
    assert vq.usage() == pytest.approx(6 / 8)


def test_lookup_rejects_bad_indices():
    vq = VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match="code indices"):
        vq.lookup(torch.tensor([8]))
