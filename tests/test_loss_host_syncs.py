"""No host syncs in the tokenizer's loss code (issue 18): one generator + discriminator loss computation
(the tokenizer's training step with self-correction, alignment, perceptual and G's adversarial term; D's
hinge + LeCAM + CR; forward and backward) converts no device tensor to a Python value; logs stay tensors
until host_floats turns them into floats with one transfer."""

from __future__ import annotations

import dataclasses
import traceback

import pytest
import torch

from detailflow.models.configs import get_model_config
from detailflow.models.host import host_floats
from detailflow.models.losses import (
    Discriminator,
    PerceptualLoss,
    discriminator_step,
    frozen,
    generator_adv_loss,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# tensor -> host conversions, and ops whose output size depends on the data (a device sync on CUDA)
SYNCING = {
    torch.Tensor: ["item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "unique",
                   "bincount", "nonzero"],
    torch: ["unique", "bincount", "nonzero", "masked_select"],
}


class Conversions(list):
    """Names of the conversions made; .sites: (name, innermost detailflow file) of each."""

    def __init__(self):
        super().__init__()
        self.sites: list[tuple[str, str]] = []


@pytest.fixture
def host_conversions(monkeypatch):
    calls = Conversions()
    sites = calls.sites

    def counting(owner, name):
        orig = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            callers = [f.filename for f in traceback.extract_stack() if "/detailflow/" in f.filename]
            sites.append((name, callers[-1].split("/detailflow/")[-1] if callers else "test"))
            return orig(*args, **kwargs)

        return wrapper

    for owner, names in SYNCING.items():
        for name in names:
            monkeypatch.setattr(owner, name, counting(owner, name))
    return calls


def _cfg(**changes):
    base = dict(random_feature_nets=True, gan_weight=0.2, disc_start=0, disc_lecam_weight=0.001,
                disc_cr_weight=4.0, perceptual_weight=1.0, diffaug=True)
    return dataclasses.replace(get_model_config("smoke").tokenizer, **{**base, **changes})


def test_the_counter_sees_each_kind_of_conversion(host_conversions):
    x = torch.tensor([1.0, 0.0])
    float(x[0]), x[0].item(), bool(x[0]), x.tolist(), torch.unique(x), x.nonzero()
    assert host_conversions == ["__float__", "item", "__bool__", "tolist", "unique", "nonzero"]


@pytest.mark.parametrize("step", [0, 5])
def test_generator_and_discriminator_losses_make_no_host_conversion(host_conversions, step):
    cfg = _cfg(disc_start=3)  # step 0: the GAN is still off (zero D loss); step 5: everything on
    torch.manual_seed(0)
    disc, perceptual = Discriminator(cfg), PerceptualLoss(cfg)
    real = torch.rand(4, 3, cfg.image_size, cfg.image_size) * 2 - 1
    fake = (torch.rand(4, 3, cfg.image_size, cfg.image_size) * 2 - 1).requires_grad_()
    host_conversions.clear()  # construction may probe; the step itself must not convert
    with frozen(disc):
        g_loss = perceptual(fake, real) + cfg.gan_weight * generator_adv_loss(disc, fake, cfg)
        g_loss.backward()
    d_loss, d_logs = discriminator_step(disc, real, fake, step, cfg)
    d_loss.backward()
    assert host_conversions == []
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in d_logs.values())


def test_host_floats_is_one_transfer_and_equals_each_value(host_conversions):
    logs = {"a": torch.tensor(1.5), "b": torch.tensor([2.25]), "lr": 0.1, "c": torch.tensor(3)}
    host_conversions.clear()
    out = host_floats(logs)
    assert host_conversions == ["tolist"]
    assert out == {"a": 1.5, "b": 2.25, "lr": 0.1, "c": 3.0} and list(out) == list(logs)
    with pytest.raises(ValueError, match="'v' must hold one value"):
        host_floats({"v": torch.zeros(2)})


def test_tokenizer_training_step_makes_no_device_to_host_conversion(host_conversions):
    """The generator's step: the only conversion left is selfcorrect.sample_perturbation's int() of a
    draw from a CPU generator (a host value, no device sync); the code stats are tensors too."""
    from detailflow.models.degrade import degrade_to_prefix
    from detailflow.models.tokenizer import DetailFlowTokenizer

    cfg = _cfg(align_teacher="thumbnail", align_weight=1.0, perceptual_warmup=1)
    torch.manual_seed(0)
    tok, disc = DetailFlowTokenizer(cfg), Discriminator(cfg)
    img = torch.rand(4, 3, cfg.image_size, cfg.image_size) * 2 - 1
    t = cfg.num_tokens  # > 1: self-correction on
    target = degrade_to_prefix(img, t, tok.rmap)
    host_conversions.clear()
    host_conversions.sites.clear()
    with frozen(disc):
        loss, logs = tok.training_step(img, target, t, 5, discriminator=disc)
        loss.backward()
    d_loss, _ = discriminator_step(disc, tok.last_target, tok.last_reconstruction, 5, cfg)
    d_loss.backward()
    assert {"perturb_start", "align", "perceptual", "gan_g", "codebook_usage", "perplexity"} <= set(logs)
    assert [s for s in host_conversions.sites if s[1] != "models/selfcorrect.py"] == []
    assert len(host_conversions.sites) <= 1
