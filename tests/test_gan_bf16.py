"""The GAN under a bf16 engine (issue 18): the casts DeepSpeed applies to the discriminator must leave
spectral norm, BatchNorm and the LeCAM EMAs working in float32 state, and the losses must run.

Casts: DeepSpeed 0.19's bf16 engine casts the PARAMETERS only (`p.data = p.data.to(bf16)`, its
_cast_module_mixed_precision); older engines and `module.bfloat16()` cast the floating buffers too
(`module.to(bf16)`). Both are tested."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from detailflow.models.configs import get_model_config
from detailflow.models.fp32_state import spectral_norm
from detailflow.models.losses import Discriminator, discriminator_step, frozen, generator_adv_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cast_params_only(module: nn.Module) -> nn.Module:
    """Exactly DeepSpeed 0.19's bf16 cast (engine._cast_module_mixed_precision, no buffer_dtype)."""
    for p in module.parameters():
        if p.dtype.is_floating_point:
            p.data = p.data.to(torch.bfloat16)
    return module


CASTS = {"deepspeed_params_only": _cast_params_only, "module_to_bf16": lambda m: m.to(torch.bfloat16)}


def _cfg(**changes):
    base = dict(gan_weight=0.2, disc_start=0, random_feature_nets=True, disc_lecam_weight=0.001,
                disc_cr_weight=4.0)
    return dataclasses.replace(get_model_config("smoke").tokenizer, **{**base, **changes})


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_disc_and_generator_losses_run_in_bf16(cast):
    cfg = _cfg()
    torch.manual_seed(0)
    disc = CASTS[cast](Discriminator(cfg))
    assert disc.heads[0].out.parametrizations.weight.original.dtype == torch.bfloat16
    for name, buf in disc.named_buffers():  # power-iteration vectors, BN stats, LeCAM EMAs
        if buf.dtype.is_floating_point:
            assert buf.dtype == torch.float32, name
    real = (torch.rand(4, 3, cfg.image_size, cfg.image_size) * 2 - 1).to(torch.bfloat16)
    fake = (torch.rand(4, 3, cfg.image_size, cfg.image_size) * 2 - 1).to(torch.bfloat16).requires_grad_()
    loss, _ = discriminator_step(disc, real, fake, 0, cfg)  # hinge + LeCAM + CR
    loss.backward()
    grads = [p.grad for p in disc.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    with frozen(disc):  # the generator's adversarial term flows through bf16 D into the fake image
        adv = generator_adv_loss(disc, fake, cfg)
        adv.backward()
    assert fake.grad is not None and torch.isfinite(fake.grad).all() and fake.grad.abs().sum() > 0
    assert disc.ema_real.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_lecam_ema_follows_the_closed_form_after_the_cast(cast):
    """First update initialises the EMA (here to 0); k more with constant m: ema = m (1 - 0.999^k).
    A bf16 EMA stalls once 0.001 m drops below half its rounding step (near m/4 for m = 1)."""
    disc = CASTS[cast](Discriminator(_cfg()))
    disc.update_lecam(torch.tensor(0.0, dtype=torch.bfloat16), torch.tensor(0.0, dtype=torch.bfloat16))
    m_real, m_fake, k = 1.0, -0.75, 2000
    real_mean, fake_mean = (torch.tensor(m, dtype=torch.bfloat16) for m in (m_real, m_fake))
    for _ in range(k):
        disc.update_lecam(real_mean, fake_mean)
    assert disc.ema_real.dtype == torch.float32
    assert float(disc.ema_real) == pytest.approx(m_real * (1 - 0.999**k), rel=1e-4)
    assert float(disc.ema_fake) == pytest.approx(m_fake * (1 - 0.999**k), rel=1e-4)


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_spectral_norm_after_the_cast_has_unit_top_singular_value(cast):
    """The normalised weight's largest singular value (torch.linalg.svdvals, independent) is 1 after a
    few power iterations, with the weight in bf16."""
    torch.manual_seed(3)
    conv = spectral_norm(nn.Conv1d(24, 16, 3))
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(7.0)  # far from norm 1 before the normalisation
    CASTS[cast](conv)
    conv.train()
    for _ in range(20):  # each training-mode access runs one power iteration
        w = conv.weight
    assert w.dtype == torch.bfloat16
    assert conv.parametrizations.weight[0]._u.dtype == torch.float32
    top = torch.linalg.svdvals(w.detach().float().flatten(1))[0]
    assert float(top) == pytest.approx(1.0, abs=0.02)  # bf16 rounding of the weight: ~0.4% per entry
    before = torch.linalg.svdvals(conv.parametrizations.weight.original.detach().float().flatten(1))[0]
    assert float(before) > 3.0
    y = conv(torch.randn(2, 24, 10, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert conv.parametrizations.weight.original.grad.dtype == torch.bfloat16


def test_spectral_norm_state_dict_keys_match_torch():
    """Checkpoints written with torch's spectral_norm load into the fp32-state version and back."""
    from torch.nn.utils.parametrizations import spectral_norm as torch_sn

    ours, theirs = spectral_norm(nn.Conv1d(4, 3, 1)), torch_sn(nn.Conv1d(4, 3, 1))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    assert torch.allclose(ours.weight, theirs.weight, atol=1e-6)
