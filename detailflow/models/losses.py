"""Tokenizer losses besides MSE/VQ (spec §1.10): perceptual, discriminator (hinge + LeCAM + CR), GAN.

Usage (second optimiser, run by the training loop after the generator step):
    disc = Discriminator(cfg)                         # cfg: TokenizerConfig
    opt_d = torch.optim.Adam(disc.trainable_parameters(), lr=1e-4, betas=(0.9, 0.95))
    loss_d, logs_d = discriminator_step(disc, real_BCcc, fake_BCcc.detach(), step, cfg)

The generator step must not touch the discriminator's parameters: wrap its forward AND backward in
`with frozen(disc):` (the adversarial term still back-propagates through D into the reconstruction).
Under DeepSpeed the D parameters' gradient hooks would otherwise reduce the generator's gradients into
D's buffers, where D's own backward adds to them (ZeRO-2: reduced twice, D stepped on the sum).

Feature networks: cfg.perceptual_net_path / cfg.disc_net_path name the pretrained nets; without them
the loss refuses to start, unless cfg.random_feature_nets (TESTS ONLY) asks for these stand-ins:
  * perceptual net: a fixed random ConvFeatureNet;
  * discriminator backbone: a fixed random ViTFeatureNet built in code.
Documented differences from the paper's nets either way: the LPIPS linear heads are replaced by equal
layer weights (no dropout quirk); no cls-token addition in D; D inputs are bicubic-upsampled /
area-downsampled to the backbone size (no 50% random crop for larger inputs); BatchNorm1d instead of
SyncBN in the heads (stats are per process).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow.models.diffaug import diff_augment
from detailflow.models.featurenets import (
    ConvFeatureNet,
    FrozenNet,
    FrozenPlacement,
    ViTFeatureNet,
    load_feature_net,
)
from detailflow.models.fp32_state import BatchNorm1dFp32, Fp32Buffers, spectral_norm


def _fit(img_BCHW: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize to a frozen net's working size: bicubic up, area down."""
    if size is None or img_BCHW.shape[-1] == size:
        return img_BCHW
    mode = "bicubic" if img_BCHW.shape[-1] < size else "area"
    kw = {"align_corners": False} if mode == "bicubic" else {}
    return F.interpolate(img_BCHW, size=(size, size), mode=mode, **kw)


def _missing_weights(field: str, wants: str) -> ValueError:
    return ValueError(f"{field} is not set: it must name {wants} (a local file, or s3://... resolved by the "
                      "training stage; nothing is downloaded from the internet). Random stand-in networks "
                      "are for tests only: random_feature_nets=True")


class PerceptualLoss:
    """LPIPS-style distance: channel-normalised feature differences, averaged, summed over layers.
    `where`: device and training micro-batch; the net is probed at B and 2B (self-correction doubles
    the decoded batch)."""

    def __init__(self, cfg, where: FrozenPlacement | None = None):
        if cfg.perceptual_net_path:
            batches = where.batches(1, 2) if where else ()
            net = load_feature_net(cfg.perceptual_net_path, where, cfg.image_size, batches)
        elif cfg.random_feature_nets:
            net = ConvFeatureNet(seed=0).to(where.device if where else "cpu")
        else:
            raise _missing_weights("perceptual_net_path", "the perceptual network (LPIPS VGG16 features)")
        self.size = getattr(net, "image_size", None)
        self.net = FrozenNet(net, where)

    def __call__(self, x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
        fx = self.net(_fit(x_BCHW.float(), self.size))
        with torch.no_grad():
            fy = self.net(_fit(y_BCHW.float(), self.size))
        total = x_BCHW.new_zeros((), dtype=torch.float32)
        for a, b in zip(fx, fy, strict=True):
            a, b = a.float(), b.float()  # bf16 under the nets' CUDA autocast
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (a - b).pow(2).sum(dim=1).mean()
        return total


def perceptual_weight(cfg, step: int) -> float:
    """Linear warm-up of the perceptual weight over cfg.perceptual_warmup steps."""
    if cfg.perceptual_weight == 0:
        return 0.0
    return cfg.perceptual_weight * min(1.0, step / max(1, cfg.perceptual_warmup))


class DiscHead(nn.Module):
    """[SN conv k1, BN, LReLU] -> residual [SN conv k9 circular, BN, LReLU] / sqrt 2 -> SN conv k1 -> 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.inp = nn.Sequential(
            spectral_norm(nn.Conv1d(channels, channels, 1)), BatchNorm1dFp32(channels), nn.LeakyReLU(0.2)
        )
        self.res = nn.Sequential(
            spectral_norm(nn.Conv1d(channels, channels, 9, padding=4, padding_mode="circular")),
            BatchNorm1dFp32(channels),
            nn.LeakyReLU(0.2),
        )
        self.out = spectral_norm(nn.Conv1d(channels, 1, 1))

    def forward(self, f_BCL: torch.Tensor) -> torch.Tensor:
        x = self.inp(f_BCL)
        x = (x + self.res(x)) / math.sqrt(2)
        return self.out(x).flatten(1)


class Discriminator(Fp32Buffers, nn.Module):
    """Trainable 1D-conv heads over the token features of a frozen backbone; logits B x (layers * L).
    Under a bf16/fp16 cast the heads run in that dtype; spectral-norm vectors, BatchNorm statistics and
    the LeCAM EMAs stay float32 (fp32_state)."""

    fp32_buffers = ("ema_real", "ema_fake")

    def __init__(self, cfg, backbone: nn.Module | None = None, where: FrozenPlacement | None = None):
        super().__init__()
        if backbone is None and cfg.disc_net_path:  # real, fake: separate calls, each B or, after a
            batches = where.batches(1, 2) if where else ()  # self-corrected step, 2B images
            backbone = load_feature_net(cfg.disc_net_path, where, cfg.image_size, batches)
        if backbone is None and not cfg.random_feature_nets:
            raise _missing_weights("disc_net_path", "the frozen discriminator backbone (DINO ViT-S/16)")
        if backbone is None:
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(1234)  # the stand-in backbone is the same random net in every process
            backbone = ViTFeatureNet(cfg.image_size, cfg.patch_size, width=32, depth=2, heads=2, mlp=64)
            torch.random.set_rng_state(gen_state)
            backbone = backbone.to(where.device if where else "cpu")
        self.size = getattr(backbone, "image_size", cfg.image_size)
        self.backbone = FrozenNet(backbone, where)
        with torch.no_grad():
            feats = self.backbone(torch.zeros(2, 3, self.size, self.size))
        self.heads = nn.ModuleList([DiscHead(f.shape[1]) for f in feats])
        self.register_buffer("ema_real", torch.zeros(()))  # LeCAM EMAs of the mean real/fake logits
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("ema_started", torch.zeros((), dtype=torch.bool))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(_fit(img_BCHW.float(), self.size))
        dtype = self.heads[0].out.parametrizations.weight.original.dtype
        return torch.cat([h(f.flatten(2).to(dtype)) for h, f in zip(self.heads, feats, strict=True)], dim=1)

    @torch.no_grad()
    def update_lecam(self, real_mean: torch.Tensor, fake_mean: torch.Tensor, decay: float = 0.999) -> None:
        """EMA of the mean logits in float32, initialised by the first update (no host sync)."""
        self.ensure_fp32()
        started = self.ema_started
        for ema, mean in ((self.ema_real, real_mean), (self.ema_fake, fake_mean)):
            mean = mean.detach().float()
            ema.copy_(torch.where(started, ema * decay + mean * (1 - decay), mean))
        self.ema_started.fill_(True)


def hinge_d(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def lecam_reg(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real, ema_fake) -> torch.Tensor:
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


@contextlib.contextmanager
def frozen(module: nn.Module | None):
    """Parameters of `module` that require grad do not for the block (None: no-op). Autograd records
    requires_grad at forward time, so the block must cover the forward; it covers the backward too so
    nothing re-enables them in between."""
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def gan_active(cfg, step: int) -> bool:
    return cfg.gan_weight > 0 and step >= cfg.disc_start


def generator_adv_loss(
    disc: Discriminator, fake_BCHW: torch.Tensor, cfg, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Hinge generator loss -mean D(aug(fake)) (unweighted)."""
    x = diff_augment(fake_BCHW, cutout_ratio=0.2, prob=0.5, generator=generator) if cfg.diffaug else fake_BCHW
    return -disc(x).float().mean()


def discriminator_step(
    disc: Discriminator,
    real_BCHW: torch.Tensor,
    fake_BCHW: torch.Tensor,
    step: int,
    cfg,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """D loss = gan_weight * (hinge + lecam_w * LeCAM) + cr_w * CR, all zero before cfg.disc_start.
    Logs are detached 0-dim tensors (no host sync here): host.host_floats converts them in one transfer.

    CR is ONE mean squared error over the real and fake logits together (spec §1.10: weight 4.0 on
    "the MSE between the logits and those of strongly augmented copies"), i.e. the mean of the real
    and fake MSEs (equal batch sizes), not their sum, which would double the effective weight."""
    if not gan_active(cfg, step):
        zero = sum(p.sum() for p in disc.trainable_parameters()) * 0.0  # keeps the graph (DDP-friendly)
        return zero, {"d_loss": zero.detach()}
    fake_BCHW = fake_BCHW.detach()
    aug = (
        (lambda x: diff_augment(x, cutout_ratio=0.2, prob=0.5, generator=generator))
        if cfg.diffaug
        else (lambda x: x)
    )
    lr, lf = disc(aug(real_BCHW)).float(), disc(aug(fake_BCHW)).float()  # losses in fp32 under bf16
    hinge = hinge_d(lr, lf)
    if disc.training:
        disc.update_lecam(lr.mean(), lf.mean())
    lecam = lecam_reg(lr, lf, disc.ema_real, disc.ema_fake) if cfg.disc_lecam_weight > 0 else lr.new_zeros(())
    loss = cfg.gan_weight * (hinge + cfg.disc_lecam_weight * lecam)
    logs = {
        "d_hinge": hinge.detach(),
        "d_lecam": lecam.detach(),
        "logits_real": lr.mean().detach(),
        "logits_fake": lf.mean().detach(),
    }
    if cfg.disc_cr_weight > 0:
        strong = lambda x: diff_augment(x, cutout_ratio=0.5, prob=1.0, generator=generator)  # noqa: E731
        strong_logits = torch.cat([disc(strong(real_BCHW)), disc(strong(fake_BCHW))]).float()
        cr = F.mse_loss(strong_logits, torch.cat([lr, lf]))
        loss = loss + cfg.disc_cr_weight * cr
        logs["d_cr"] = cr.detach()
    logs["d_loss"] = loss.detach()
    return loss, logs
