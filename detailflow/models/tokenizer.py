"""DetailFlow 1D tokenizer (spec §1): group-causal ViT encoder -> l2 VQ -> prefix ViT decoder at c(t),
with degraded supervision, self-correction, first-token alignment and optional perceptual/GAN losses.

Usage:
    from detailflow.models.configs import get_model_config
    from detailflow.models.tokenizer import DetailFlowTokenizer
    tok = DetailFlowTokenizer(get_model_config("tiny").tokenizer)
    codes_BN = tok.encode(img_BCHW)                 # img float in [-1, 1] (uint8 0..255 also accepted)
    img_t = tok.decode(codes_BN, t=8)               # B x 3 x c(8) x c(8)
    loss, logs = tok.training_step(img_BCHW, target_BCcc, t, step, discriminator=disc_or_None)
    # then, if the GAN is on: discriminator_step(disc, tok.last_target, tok.last_reconstruction, step, cfg)
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow.models.align import AlignHead, align_loss, build_teacher
from detailflow.models.featurenets import FrozenPlacement
from detailflow.models.losses import PerceptualLoss, gan_active, generator_adv_loss, perceptual_weight
from detailflow.models.masks import encoder_mask
from detailflow.models.quantizer import QuantOut, VectorQuantizer
from detailflow.models.resolution import ResolutionMap
from detailflow.models.selfcorrect import assemble_channels, mixing_weights, sample_perturbation
from detailflow.models.vit import Transformer, init_linear, init_siglip, patchify, resize_pos_2d, unpatchify


def _f(x: torch.Tensor) -> torch.Tensor:
    """A loss term for the logs: detached, stays on the device (host.host_floats converts, once)."""
    return x.detach()


def to_model_range(img: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float [-1, 1]; float tensors pass through."""
    if img.dtype == torch.uint8:
        return img.float() / 127.5 - 1.0
    if not img.is_floating_point():
        raise TypeError(f"images must be uint8 or float in [-1, 1], got {img.dtype}")
    return img


class Encoder(nn.Module):
    """[patch tokens ; N latent slots] -> blocks with the group-causal mask -> final LN -> N latents."""

    def __init__(self, cfg):
        super().__init__()
        w, n, f = cfg.enc_width, cfg.num_tokens, cfg.patch_size
        self.cfg = cfg
        self.embed = nn.Linear(f * f * 3, w)
        self.pos_2d = nn.Parameter(torch.randn(cfg.grid_size, cfg.grid_size, w) * 0.02)
        self.latent_queries = nn.Parameter(torch.randn(n, w) * 0.02)
        self.refined_queries = nn.Parameter(torch.randn(n, w) * 0.02)  # self-correction re-encoding only
        self.latent_pos = nn.Parameter(nn.init.trunc_normal_(torch.empty(n, w), std=0.02))
        self.transformer = Transformer(w, cfg.enc_depth, cfg.enc_heads, cfg.enc_mlp)
        init_siglip(self)
        # SigLIP's position-table init (std 1/sqrt(width)): at std 0.02 the patch tokens carry almost no
        # position next to their content, so the latents see a bag of patches and lose the layout
        nn.init.normal_(self.pos_2d, std=w**-0.5)

    def forward(
        self,
        img_BCHW: torch.Tensor,
        latent_slots_BNW: torch.Tensor | None = None,
        return_patches: bool = False,
    ):
        f = self.cfg.patch_size
        gh, gw = img_BCHW.shape[-2] // f, img_BCHW.shape[-1] // f
        dtype = self.embed.weight.dtype  # follow the module's dtype (fully-bf16 engines feed fp32 images)
        patches = self.embed(patchify(img_BCHW.to(dtype), f)) + resize_pos_2d(self.pos_2d, gh, gw)
        if latent_slots_BNW is None:
            latent_slots_BNW = self.latent_queries.expand(img_BCHW.shape[0], -1, -1)
        x = torch.cat([patches, latent_slots_BNW.to(dtype) + self.latent_pos], dim=1)
        mask = encoder_mask(gh * gw, self.cfg.num_tokens, self.cfg.causal_num, self.cfg.group_size, x.device)
        out = self.transformer(x, mask)
        latents = out[:, gh * gw :]
        return (latents, out[:, : gh * gw]) if return_patches else latents


class Decoder(nn.Module):
    """[(c/f)^2 mask tokens + resized 2D pos ; t projected codes + 1D pos] -> full attention -> pixels."""

    def __init__(self, cfg):
        super().__init__()
        w, f = cfg.dec_width, cfg.patch_size
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.randn(1, w) * 0.02)
        self.pos_2d = nn.Parameter(torch.randn(cfg.grid_size, cfg.grid_size, w) * 0.02)
        self.post_quant = nn.Linear(cfg.code_dim, w)
        self.latent_pos = nn.Parameter(nn.init.trunc_normal_(torch.empty(cfg.num_tokens, w), std=0.02))
        self.transformer = Transformer(w, cfg.dec_depth, cfg.dec_heads, cfg.dec_mlp)
        self.to_pixels = nn.Linear(w, f * f * 3)
        init_siglip(self)
        init_linear(self.to_pixels)  # small output head: the first reconstructions start near 0, not at +-1
        # He-scale code projection (std sqrt(2/code_dim)): the codes must dominate the latent slots from the
        # start, or the reconstruction gradient reaching z is too weak to resist the commitment pull
        nn.init.trunc_normal_(self.post_quant.weight, std=(2.0 / cfg.code_dim) ** 0.5)

    def forward(self, q_BTD: torch.Tensor, canvas: int) -> torch.Tensor:
        f, t = self.cfg.patch_size, q_BTD.shape[1]
        if canvas % f or not 1 <= t <= self.cfg.num_tokens:
            raise ValueError(f"bad decode request: canvas={canvas} (multiple of {f}), t={t}")
        side = canvas // f
        img_tokens = (self.mask_token + resize_pos_2d(self.pos_2d, side, side)).expand(q_BTD.shape[0], -1, -1)
        latents = self.post_quant(q_BTD.to(self.mask_token.dtype)) + self.latent_pos[:t]
        out = self.transformer(torch.cat([img_tokens, latents], dim=1))
        return unpatchify(self.to_pixels(out[:, : side * side]), f, side)


class DetailFlowTokenizer(nn.Module):
    def __init__(self, cfg, frozen: FrozenPlacement | None = None):
        """frozen: device + training micro-batch of the frozen teacher/perceptual nets (loaded onto the
        device and probed at that batch); None: CPU load, following the input's device."""
        super().__init__()
        self.cfg = cfg
        self.rmap = ResolutionMap.from_config(cfg)
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Linear(cfg.enc_width, cfg.code_dim)
        self.quantizer = VectorQuantizer(
            cfg.codebook_size, cfg.code_dim, cfg.usage_window, cfg.codebook_init_norm
        )
        self.refine_proj = nn.Linear(cfg.code_dim, cfg.enc_width)  # perturbed prefix -> encoder slots
        self.decoder = Decoder(cfg)
        init_siglip(self.quant_conv)
        init_siglip(self.refine_proj)
        self.teacher = build_teacher(cfg, frozen)  # frozen, kept outside the state dict
        self.align_head = (
            AlignHead(cfg.code_dim, cfg.align_hidden, self.teacher.dim) if self.teacher else None
        )
        self.perceptual = PerceptualLoss(cfg, frozen) if cfg.perceptual_weight > 0 else None
        self.last_reconstruction: torch.Tensor | None = None  # detached, for the discriminator step
        self.last_target: torch.Tensor | None = None
        if cfg.encoder_init_path:
            self._load_encoder(cfg.encoder_init_path)

    def _load_encoder(self, path: str) -> None:
        from safetensors.torch import load_file

        if not os.path.isfile(path):
            raise FileNotFoundError(f"encoder_init_path {path!r} not found (nothing is downloaded)")
        state = load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
        try:
            missing, unexpected = self.encoder.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"{path}: encoder weights mismatch: {exc}") from exc
        if missing or unexpected:
            raise ValueError(f"{path}: encoder weights mismatch: missing={missing} unexpected={unexpected}")

    # ---- inference -------------------------------------------------------------------------------
    def _check_image(self, img: torch.Tensor) -> torch.Tensor:
        img = to_model_range(img)
        r = self.cfg.image_size
        if img.ndim != 4 or img.shape[1] != 3 or img.shape[-2:] != (r, r):
            raise ValueError(f"expected images B x 3 x {r} x {r}, got {tuple(img.shape)}")
        return img

    def quantize(self, img_BCHW: torch.Tensor, noise_topk: int = 0, generator=None) -> QuantOut:
        return self.quantizer(self.quant_conv(self.encoder(img_BCHW)), noise_topk, generator)

    @torch.no_grad()
    def encode(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """All N nearest code indices (B x N, long)."""
        return self.quantize(self._check_image(img_BCHW)).idx_BN

    def codes_to_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (any shape) -> unit code vectors (shape + code_dim)."""
        return self.quantizer.lookup(codes.long())

    def decode_vectors(self, q_BTD: torch.Tensor, t: int | None = None) -> torch.Tensor:
        t = self.rmap.check_admissible(q_BTD.shape[1] if t is None else t)
        if q_BTD.shape[1] < t:
            raise ValueError(f"decode needs at least t={t} codes, got {q_BTD.shape[1]}")
        return self.decoder(q_BTD[:, :t], self.rmap.canvas_size(t))

    def decode(self, codes_BT: torch.Tensor, t: int | None = None) -> torch.Tensor:
        """Decode the first t codes (default: all given) to B x 3 x c(t) x c(t)."""
        if codes_BT.ndim != 2:
            raise ValueError(f"expected codes B x T, got shape {tuple(codes_BT.shape)}")
        return self.decode_vectors(self.codes_to_vectors(codes_BT), t)

    # ---- self-correction ---------------------------------------------------------------------------
    def reencode(self, img_BCHW: torch.Tensor, prefix_BND: torch.Tensor, e_B: torch.Tensor) -> torch.Tensor:
        """Second encoder pass: slots < e hold the projected (detached) prefix codes, slots >= e the
        refined queries. prefix_BND spans N positions; entries >= e are ignored."""
        n = self.cfg.num_tokens
        before = (torch.arange(n, device=img_BCHW.device)[None, :] < e_B[:, None])[..., None]
        slots = torch.where(
            before,
            self.refine_proj(prefix_BND.detach().to(self.refine_proj.weight.dtype)),
            self.encoder.refined_queries,
        )
        return self.encoder(img_BCHW, latent_slots_BNW=slots)

    @torch.no_grad()
    def correction_codes(
        self,
        img_BCHW: torch.Tensor,
        j_B: torch.Tensor,
        w_B: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Index channels clean/input/target (B x N) for given perturbation spans (extraction path)."""
        img = self._check_image(img_BCHW)
        j_B, e_B = j_B.to(img.device).long(), (j_B + w_B).to(img.device).long()
        first = self.quantize(img, self.cfg.noise_topk, generator)
        noisy_vec = self.quantizer.lookup(first.noisy_idx_BN)
        pos = torch.arange(self.cfg.num_tokens, device=img.device)[None, :, None]
        prefix = torch.where(pos < j_B[:, None, None], first.q_BND, noisy_vec)
        second = self.quantizer(self.quant_conv(self.reencode(img, prefix, e_B)))
        out = assemble_channels(first.idx_BN, first.noisy_idx_BN, second.idx_BN, j_B, e_B)
        out["noisy"] = first.noisy_idx_BN
        return out

    # ---- training ------------------------------------------------------------------------------------
    def _vq_terms(self, qo: QuantOut) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.cfg.codebook_weight * qo.codebook_loss_BN.mean(),
            self.cfg.commit_beta * qo.commit_loss_BN.mean(),
        )

    def training_step(
        self,
        img_BCHW: torch.Tensor,
        target_BCcc: torch.Tensor,
        t: int,
        step: int,
        discriminator: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """Generator loss for one micro-batch whose prefix length t is shared (spec §1.6, §1.8, §1.10).
        Logs: python numbers for t and the drawn span, 0-dim tensors for the losses and code stats (no
        host sync in the step; host.host_floats turns them into floats in one transfer)."""
        cfg, n = self.cfg, self.cfg.num_tokens
        t = self.rmap.check_admissible(t)
        img = self._check_image(img_BCHW)
        c = self.rmap.canvas_size(t)
        target = to_model_range(target_BCcc)
        if target.shape != (img.shape[0], 3, c, c):
            raise ValueError(
                f"target for t={t} must be {img.shape[0]} x 3 x {c} x {c}, got {tuple(target.shape)}"
            )
        correct = cfg.self_correction and t > 1
        first = self.quantize(img, cfg.noise_topk if correct else 0)
        cb, commit = self._vq_terms(first)
        logs: dict[str, float | torch.Tensor] = {"t": float(t)}
        q_dec, tgt = first.q_BND[:, :t], target
        if correct:
            j, w = sample_perturbation(t, cfg.causal_num, cfg.group_size)
            e = j + w
            noisy_vec = self.quantizer.lookup(first.noisy_idx_BN, check=False)  # top-k draws: in range
            prefix = torch.cat([first.q_BND[:, :j], noisy_vec[:, j:e].to(first.q_BND.dtype)], dim=1).detach()
            padded = F.pad(prefix, (0, 0, 0, n - e))
            e_B = torch.full((img.shape[0],), e, device=img.device)
            second = self.quantizer(self.quant_conv(self.reencode(img, padded, e_B)[:, e:]))
            cb2, commit2 = self._vq_terms(second)
            w1, w2 = mixing_weights(n, j, w)
            cb, commit = w1 * cb + w2 * cb2, w1 * commit + w2 * commit2
            corrected = torch.cat([prefix, second.q_BND], dim=1)
            q_dec, tgt = torch.cat([q_dec, corrected[:, :t]], dim=0), torch.cat([target, target], dim=0)
            logs.update(perturb_start=float(j), perturb_width=float(w))
        recon = self.decoder(q_dec, c)
        mse = F.mse_loss(recon.float(), tgt.float())
        loss = mse + cb + commit
        logs.update(mse=_f(mse), vq=_f(cb + commit), codebook=_f(cb), commit=_f(commit))
        if self.teacher is not None:
            student = self.align_head(first.q_BND[:, 0])  # clean half only
            la = align_loss(student, self.teacher(img))
            loss = loss + cfg.align_weight * la
            logs["align"] = _f(la)
        wp = perceptual_weight(cfg, step) if self.perceptual is not None else 0.0
        if wp > 0:
            lp = self.perceptual(recon, tgt)
            loss = loss + wp * lp
            logs.update(perceptual=_f(lp), perceptual_weight=wp)
        if gan_active(cfg, step):
            if discriminator is None:
                raise ValueError(
                    f"gan_weight={cfg.gan_weight} and step {step} >= disc_start={cfg.disc_start}: "
                    "pass discriminator=Discriminator(cfg) to training_step"
                )
            adv = generator_adv_loss(discriminator, recon, cfg)
            loss = loss + cfg.gan_weight * adv
            logs["gan_g"] = _f(adv)
        self.last_reconstruction, self.last_target = recon.detach(), tgt.detach()
        logs.update(
            loss=_f(loss),
            codebook_usage=self.quantizer.usage(),
            perplexity=self.quantizer.perplexity(first.idx_BN),
        )
        return loss, logs
