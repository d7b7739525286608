"""Feature-net loader hook, alignment teachers, perceptual loss, DiffAugment, discriminator, LeCAM."""

import dataclasses

import pytest
import torch

from detailflow.models.align import AlignHead, NetworkTeacher, ThumbnailTeacher, align_loss, build_teacher
from detailflow.models.configs import get_model_config
from detailflow.models.diffaug import cutout, diff_augment, translation
from detailflow.models.featurenets import ConvFeatureNet, ViTFeatureNet, load_feature_net, save_feature_net
from detailflow.models.host import host_floats
from detailflow.models.losses import (
    Discriminator,
    PerceptualLoss,
    discriminator_step,
    hinge_d,
    lecam_reg,
    perceptual_weight,
)
from detailflow.models.tokenizer import DetailFlowTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**changes):
    """Smoke tokenizer config; random stand-in feature nets unless a test says otherwise."""
    changes = {"random_feature_nets": True, **changes}
    return dataclasses.replace(get_model_config("smoke").tokenizer, **changes)


def _vit():
    torch.manual_seed(0)
    return ViTFeatureNet(image_size=32, patch_size=8, width=24, depth=2, heads=2, mlp=32)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("fmt", ["safetensors", "torch", "torchscript", "pt2"])
def test_feature_net_loader_hook(tmp_path, fmt):
    net = _vit().eval()
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    path = tmp_path / f"net.{fmt}"
    if fmt == "safetensors":
        save_feature_net(net, str(path))
    elif fmt == "torch":
        torch.save({"arch": "vit", "config": net.config, "state_dict": net.state_dict()}, path)
    elif fmt == "torchscript":
        torch.jit.trace(net, img).save(str(path))
    else:
        torch.export.save(torch.export.export(net, (img,)), str(path))
    loaded = load_feature_net(str(path))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert fmt == "pt2" or not loaded.training  # exported programs are frozen in eval form already
    with torch.no_grad():
        for a, b in zip(loaded(img), net(img), strict=True):
            torch.testing.assert_close(a, b)


def test_feature_net_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_feature_net(str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="neither"):
        load_feature_net(str(bad))
    wrong = tmp_path / "wrong.pt"
    torch.save({"arch": "vit", "config": _vit().config, "state_dict": {"x": torch.zeros(1)}}, wrong)
    with pytest.raises(ValueError, match="do not match"):
        load_feature_net(str(wrong))


def test_thumbnail_teacher_is_the_4x4_area_thumbnail():
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    feat = ThumbnailTeacher()(img)
    assert feat.shape == (2, 48)
    want = img.reshape(2, 3, 4, 8, 4, 8).mean(dim=(3, 5)).flatten(1)
    torch.testing.assert_close(feat, torch.nn.functional.normalize(want, dim=-1))


def test_siglip2_teacher_from_local_file(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_feature_net(_vit(), str(path))
    cfg = _cfg(align_teacher="siglip2", align_teacher_path=str(path))
    teacher = build_teacher(cfg)
    assert isinstance(teacher, NetworkTeacher) and teacher.dim == 24
    tok = DetailFlowTokenizer(cfg)
    assert tok.align_head.net[-1].out_features == 24
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, logs = tok.training_step(img, img, 16, 0)
    loss.backward()
    assert "align" in logs and tok.align_head.net[0].weight.grad is not None
    assert not any(k.startswith("teacher") for k in tok.state_dict())
    with pytest.raises(ValueError, match="align_teacher_path"):
        build_teacher(_cfg(align_teacher="siglip2"))
    with pytest.raises(ValueError, match="unknown align_teacher"):
        build_teacher(_cfg(align_teacher="clip"))


def test_align_head_and_loss():
    head = AlignHead(8, 16, 48)
    out = head(torch.randn(5, 8))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    assert float(align_loss(out, out)) == pytest.approx(-1.0)
    assert float(align_loss(out, -out)) == pytest.approx(1.0)


def test_perceptual_loss_and_warmup(tmp_path):
    perc = PerceptualLoss(_cfg(perceptual_weight=1.0))
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    assert float(perc(x, x)) == pytest.approx(0.0, abs=1e-6)
    y = x + 0.3 * torch.randn_like(x)
    x.requires_grad_(True)
    d = perc(x, y)
    d.backward()
    assert float(d) > 0 and x.grad.abs().sum() > 0
    cfg = _cfg(perceptual_weight=2.0, perceptual_warmup=100)
    assert [perceptual_weight(cfg, s) for s in (0, 50, 100, 500)] == [0.0, 1.0, 2.0, 2.0]
    path = tmp_path / "perc.safetensors"  # a loaded conv net works the same way
    save_feature_net(ConvFeatureNet(seed=3), str(path))
    assert float(PerceptualLoss(_cfg(perceptual_weight=1.0, perceptual_net_path=str(path)))(x, y)) > 0


def test_diffaug_ops():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    out = diff_augment(x, generator=gen, prob=1.0)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None
    assert torch.equal(diff_augment(x, prob=0.0), x)
    ones = torch.ones(64, 1, 16, 16)
    cut = cutout(ones, 0.5, gen)
    frac = (cut == 0).float().mean(dim=(1, 2, 3))  # an 8x8 square, clipped at the border
    assert frac.max() == 0.25 and frac.min() >= 1 / 16 and set(cut.unique().tolist()) == {0.0, 1.0}
    moved = translation(ones, 0.125, gen)
    assert ((moved == 0) | (moved == 1)).all() and (moved == 0).any()
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        diff_augment(x, policy="blur")


def test_hinge_and_lecam_values():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert float(hinge_d(real, fake)) == pytest.approx(0.5 * (0.5 + 0.75))
    assert float(lecam_reg(real, fake, torch.tensor(1.0), torch.tensor(0.0))) == pytest.approx(2.0 + 4.625)


def test_discriminator_shapes_params_and_step():
    cfg = _cfg(gan_weight=0.2, disc_start=3)
    disc = Discriminator(cfg)
    assert not any("backbone" in k for k in disc.state_dict())
    assert all(p.requires_grad for p in disc.trainable_parameters()) and disc.trainable_parameters()
    for canvas in (8, 24, 32):  # every degraded canvas is resized to the backbone size
        logits = disc(torch.rand(2, 3, canvas, canvas))
        assert logits.shape == (2, 3 * 16)  # embedding + 2 blocks, 4x4 tokens each
    real, fake = torch.rand(4, 3, 24, 24) * 2 - 1, torch.rand(4, 3, 24, 24) * 2 - 1
    loss0, logs0 = discriminator_step(disc, real, fake, 2, cfg)
    loss0.backward()
    assert float(loss0) == 0.0 and host_floats(logs0) == {"d_loss": 0.0}
    disc.zero_grad()
    loss, logs = discriminator_step(disc, real, fake, 3, cfg)
    logs = host_floats(logs)
    loss.backward()
    assert float(loss) > 0 and bool(disc.ema_started)
    assert float(disc.ema_real) == pytest.approx(logs["logits_real"], abs=1e-6)
    disc.update_lecam(torch.tensor(1.0), torch.tensor(1.0))
    assert float(disc.ema_real) == pytest.approx(0.999 * logs["logits_real"] + 0.001, abs=1e-6)
    no_cr = _cfg(gan_weight=0.2, disc_start=0, disc_cr_weight=0.0, disc_lecam_weight=0.0)
    _, logs2 = discriminator_step(Discriminator(no_cr), real, fake, 0, no_cr)
    assert "d_cr" not in logs2 and float(logs2["d_lecam"]) == 0.0


def test_consistency_regularisation_is_one_mse_at_the_spec_weight():
    """Spec §1.10: 4.0 x the MSE between D's logits and those of strongly augmented copies, over the
    real and fake halves together (not the sum of two MSEs, which doubles the weight to 8)."""
    cfg = _cfg(gan_weight=0.2, disc_start=0, diffaug=False, disc_lecam_weight=0.0, disc_cr_weight=4.0)
    disc = Discriminator(cfg).eval()  # eval: no BN-statistics or spectral-norm update between calls
    real, fake = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    loss, logs = discriminator_step(disc, real, fake, 0, cfg, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)  # the same strong augmentations, real first, then fake
    with torch.no_grad():
        lr, lf = disc(real), disc(fake)
        sr = disc(diff_augment(real, cutout_ratio=0.5, prob=1.0, generator=gen))
        sf = disc(diff_augment(fake, cutout_ratio=0.5, prob=1.0, generator=gen))
    cr = 0.5 * (float(((sr - lr) ** 2).mean()) + float(((sf - lf) ** 2).mean()))
    assert float(logs["d_cr"]) == pytest.approx(cr, rel=1e-5)
    hinge = 0.5 * (float(torch.relu(1 - lr).mean()) + float(torch.relu(1 + lf).mean()))
    assert float(loss) == pytest.approx(0.2 * hinge + 4.0 * cr, rel=1e-5)


def test_random_feature_nets_only_on_request(tmp_path):
    for build, field in ((PerceptualLoss, "perceptual_net_path"), (Discriminator, "disc_net_path")):
        with pytest.raises(ValueError, match=f"{field} is not set.*random_feature_nets=True"):
            build(_cfg(perceptual_weight=1.0, gan_weight=0.2, random_feature_nets=False))
    path = tmp_path / "perc.safetensors"  # a named file is used without the test switch
    save_feature_net(ConvFeatureNet(seed=3), str(path))
    PerceptualLoss(_cfg(perceptual_weight=1.0, perceptual_net_path=str(path), random_feature_nets=False))
