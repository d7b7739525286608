"""One bf16 tokenizer step at DetailFlow-16 sizes with the GAN on (issue 18, "Measure"), pure torch.

Random frozen networks of the real sizes are traced to TorchScript files and loaded as the recipe loads
them (FrozenPlacement: map_location onto the GPU, probed at the training micro-batch, bf16 autocast):
SigLIP2-so400m-like teacher (ViT 1152 wide, 27 blocks, patch 16), a VGG16-shaped perceptual net (13
convs, the five LPIPS taps), DINO ViT-S/16 (384 wide, 12 blocks; embedding + blocks 2/5/8/11). The
tokenizer and the discriminator get DeepSpeed 0.19's exact bf16 cast (parameters only). Prints step
time, peak memory and the frozen nets' device; any dtype error fails the run.

    python benchmarks/gan_bf16_step.py [--batch 16] [--steps 5]      # needs a CUDA GPU
    python benchmarks/gan_bf16_step.py --tiny --device cpu             # the same code path, tiny nets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow.models.configs import get_model_config
from detailflow.models.featurenets import FrozenPlacement, ViTFeatureNet
from detailflow.models.losses import Discriminator, discriminator_step, frozen
from detailflow.models.tokenizer import DetailFlowTokenizer


class VGG16Taps(nn.Module):
    """VGG16's 13 3x3 convs (random weights); returns relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""

    def __init__(self):
        super().__init__()
        stages, prev = [], 3
        for width, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
            layers = []
            for _ in range(convs):
                layers += [nn.Conv2d(prev, width, 3, padding=1), nn.ReLU()]
                prev = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        taps = []
        for i, stage in enumerate(self.stages):
            x = stage(F.max_pool2d(x, 2) if i else x)
            taps.append(x)
        return taps


class Taps(nn.Module):
    """A ViTFeatureNet returning only the listed feature indices (DINO: embedding + blocks 2/5/8/11)."""

    def __init__(self, net: nn.Module, keep: tuple[int, ...]):
        super().__init__()
        self.net, self.keep = net, keep

    def forward(self, x):
        feats = self.net(x)
        return [feats[i] for i in self.keep]


def _trace(net: nn.Module, size: int, path: Path) -> str:
    traced = torch.jit.trace(net.eval(), torch.randn(2, 3, size, size), check_trace=False)
    torch.jit.save(traced, str(path))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="micro-batch per GPU (the recipe's 16)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after two warm-up steps")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="smoke config and tiny frozen nets (a dry run)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(0)
    base = get_model_config("smoke" if args.tiny else "detailflow-16").tokenizer
    size, tmp = base.image_size, Path(tempfile.mkdtemp())
    if args.tiny:
        teacher, dino = ViTFeatureNet(size, 8, 32, 2, 2, 64), ViTFeatureNet(size, 8, 32, 12, 2, 64)
    else:  # SigLIP2-so400m/16 and DINO ViT-S/16 widths, depths, heads, MLPs
        teacher, dino = ViTFeatureNet(size, 16, 1152, 27, 16, 4304), ViTFeatureNet(224, 16, 384, 12, 6, 1536)
    files = {
        "align_teacher_path": _trace(teacher, size, tmp / "siglip2.pt"),
        "perceptual_net_path": _trace(VGG16Taps(), size, tmp / "vgg16.pt"),
        "disc_net_path": _trace(Taps(dino, (0, 3, 6, 9, 12)), size, tmp / "dino.pt"),  # D runs at 256
    }
    on = dict(perceptual_weight=base.perceptual_weight or 1.0, gan_weight=base.gan_weight or 0.2,
              align_weight=base.align_weight or 1.0, align_teacher="siglip2")  # all on (smoke: off)
    cfg = dataclasses.replace(base, disc_start=0, perceptual_warmup=1, **on, **files)
    where = FrozenPlacement(device=args.device, batch=args.batch)
    t0 = time.perf_counter()
    tok = DetailFlowTokenizer(cfg, where).to(args.device)
    disc = Discriminator(cfg, where=where).to(args.device)
    load_s = time.perf_counter() - t0
    for module in (tok, disc):  # DeepSpeed 0.19's bf16 cast: parameters only
        for p in module.parameters():
            p.data = p.data.to(torch.bfloat16)
    fused = args.device.startswith("cuda")
    opt_g = torch.optim.Adam([p for p in tok.parameters() if p.requires_grad], lr=1e-4, fused=fused)
    opt_d = torch.optim.Adam(disc.trainable_parameters(), lr=1e-4, fused=fused)
    img = (torch.rand(args.batch, 3, size, size, device=args.device) * 2 - 1).bfloat16()
    t = cfg.num_tokens

    def step(i: int) -> dict:
        with frozen(disc):
            loss, logs = tok.training_step(img, img, t, i, discriminator=disc)
            loss.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        d_loss, d_logs = discriminator_step(disc, tok.last_target, tok.last_reconstruction, i, cfg)
        d_loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        return {**logs, **d_logs}

    sync = torch.cuda.synchronize if fused else (lambda: None)
    for i in range(2):
        step(i)
    sync()
    if fused:
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    for i in range(args.steps):
        logs = step(2 + i)
    sync()
    dt = (time.perf_counter() - t1) / args.steps
    frozen_dev = {k: str(next(iter(n.net.parameters())).device)
                  for k, n in (("teacher", tok.teacher.net), ("perceptual", tok.perceptual.net),
                               ("disc_backbone", disc.backbone))}
    out = {
        "device": torch.cuda.get_device_name() if fused else "cpu", "micro_batch": args.batch,
        "image_size": size, "step_s": round(dt, 4), "images_per_s": round(args.batch / dt, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if fused else None,
        "frozen_load_s": round(load_s, 1),
        "frozen_net_device": frozen_dev,
        "disc_buffers": sorted({str(b.dtype) for b in disc.buffers() if b.dtype.is_floating_point}),
        "logs": {k: round(float(v), 4) for k, v in logs.items() if k in ("loss", "gan_g", "d_loss", "align")},
        "lecam_ema": [float(disc.ema_real), float(disc.ema_fake)],
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
