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
    """Names of the conversions made; .sites: (name, innermost detailflow file) of each; .callers: the
    file of the frame that made each conversion (project code, DeepSpeed's, torch's)."""

    def __init__(self):
        super().__init__()
        self.sites: list[tuple[str, str]] = []
        self.callers: list[str] = []


def count_host_conversions(monkeypatch) -> Conversions:
    """From now until the test ends, record every SYNCING call (tests/test_train_recipe.py uses it too)."""
    calls = Conversions()
    sites = calls.sites

    def counting(owner, name):
        orig = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            stack = traceback.extract_stack()
            calls.callers.append(stack[-2].filename)
            callers = [f.filename for f in stack if "/detailflow/" in f.filename]
            sites.append((name, callers[-1].split("/detailflow/")[-1] if callers else "test"))
            return orig(*args, **kwargs)

        return wrapper

    for owner, names in SYNCING.items():
        for name in names:
            monkeypatch.setattr(owner, name, counting(owner, name))
    return calls


@pytest.fixture
def host_conversions(monkeypatch):
    return count_host_conversions(monkeypatch)


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


def test_one_full_tokenizer_step_converts_once_for_its_log_line(host_conversions):
    """One optimiser step exactly as train_loop runs it, on real ZeRO-2 DeepSpeed engines with the GAN
    (hinge + LeCAM + CR, DiffAugment), perceptual, alignment and self-correction terms all on:
    micro_step (generator engine forward/backward/step with D frozen, then D's engine step) and
    DeviceSums.add make no conversion in the project's code; the log line (step_logs: the means and the
    engine's grad norm) makes exactly one, a single .tolist(). The loop's old log line,
    float(engine.get_global_grad_norm() or 0.0) beside the means, made three."""
    from detailflow.models.degrade import degrade_to_prefix
    from detailflow.models.losses import Discriminator
    from detailflow.models.tokenizer import DetailFlowTokenizer
    from detailflow.pipelines.train.loop_common import DeviceSums, StepAdapter, step_logs
    from detailflow.pipelines.train.tokenizer import DiscriminatorStep, micro_step
    from detailflow.platform import deepspeed_glue as dsg

    cfg = _cfg(align_teacher="thumbnail", align_weight=1.0, perceptual_warmup=1)
    ds_cfg = dsg.build_ds_config(micro_batch=4, zero_stage=2, grad_clip=1.0, precision="fp32")
    torch.manual_seed(0)
    model, disc = DetailFlowTokenizer(cfg), Discriminator(cfg)
    engine = dsg.init_engine(StepAdapter(model, "training_step"), dsg.make_optimizer(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3), ds_cfg)
    d_engine = dsg.init_engine(DiscriminatorStep(disc, cfg),
                               dsg.make_optimizer(disc.trainable_parameters(), lr=1e-3), ds_cfg)
    img = torch.rand(4, 3, cfg.image_size, cfg.image_size) * 2 - 1
    t = cfg.num_tokens  # > 1: self-correction on
    target = degrade_to_prefix(img, t, model.rmap)
    sums = DeviceSums()
    sums.add(micro_step(engine, d_engine, model, img, target, t, 5))  # warm-up step (lazy inits)
    sums.means()

    def project(start: int) -> list[tuple[str, str]]:
        """Conversions made by the project's own frames since `start` (the CPU-generator draw of
        selfcorrect.sample_perturbation is a host value, not a device sync: left out)."""
        return [(n, site) for (n, site), caller in zip(host_conversions.sites[start:],
                                                       host_conversions.callers[start:], strict=True)
                if "/detailflow/" in caller and site != "models/selfcorrect.py"]

    host_conversions.clear()
    host_conversions.sites.clear()
    host_conversions.callers.clear()
    logs = micro_step(engine, d_engine, model, img, target, t, 6)
    sums.add(logs)
    assert {"gan_g", "perceptual", "align", "perturb_start", "d_hinge", "d_lecam", "d_cr"} <= set(logs)
    assert project(0) == []
    mark = len(host_conversions)
    line = step_logs(sums, engine, lr=1e-3, images_per_s=1.0)
    assert project(mark) == [("tolist", "models/host.py")]
    norm = engine.get_global_grad_norm()
    assert line["grad_norm"] == pytest.approx(float(norm)) and line["grad_norm"] > 0
    assert line["lr"] == 1e-3 and isinstance(line["loss"], float)
