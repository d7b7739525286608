"""Self-correction code extraction for the AR model (spec §2.3, §6.3).

Usage:
    g = torch.Generator().manual_seed(0)
    out = extract_triplets(tokenizer, img_BCHW, g, views="tiny")
    out["clean"], out["input"], out["target"]   # LongTensor B x V x N
    out["view"] (B x V view ids), out["perturb_start"], out["perturb_width"] (B)
    extract_triplets(tokenizer, crop_B3SS, g, views="tencrop")   # S = view_input_size("tencrop", R)

Views: "tencrop" = TenCrop R of the ADM centre crop of the ORIGINAL image to int(1.1 R) (4 corners +
centre, then the same five crops of the horizontally flipped image, torchvision order). The caller
makes that crop from the original (pipelines: images.center_crop(decode_rgb(bytes), int(1.1 R)));
make_views only cuts, so it refuses any other input size rather than resample (an R crop upsampled
to 1.1 R is blurred: its views lack detail the original has). "tiny" = identity, horizontal flip,
1-px shift right, 1-px shift down (edge pixels replicated) of an R image. One perturbation position
per image with t = N (spec §1.8 rules), shared by its views; every view draws its own noisy codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from detailflow.models.selfcorrect import sample_perturbation
from detailflow.models.tokenizer import to_model_range

VIEW_KINDS = ("tencrop", "tiny")


def _centre_square(img_BCHW: torch.Tensor, side: int) -> torch.Tensor:
    """ADM-style centre crop: scale the short side to `side`, crop the centre side x side."""
    h, w = img_BCHW.shape[-2:]
    short = min(h, w)
    top, left = (h - short) // 2, (w - short) // 2
    sq = img_BCHW[..., top : top + short, left : left + short]
    if short == side:
        return sq
    if short > side:
        return F.interpolate(sq, size=(side, side), mode="area")
    return F.interpolate(sq, size=(side, side), mode="bicubic", align_corners=False)


def _five_crops(img_BCHW: torch.Tensor, size: int) -> list[torch.Tensor]:
    h, w = img_BCHW.shape[-2:]
    ct, cl = (h - size) // 2, (w - size) // 2
    return [
        img_BCHW[..., :size, :size],
        img_BCHW[..., :size, w - size :],
        img_BCHW[..., h - size :, :size],
        img_BCHW[..., h - size :, w - size :],
        img_BCHW[..., ct : ct + size, cl : cl + size],
    ]


def _shift(img_BCHW: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    h, w = img_BCHW.shape[-2:]
    pad = F.pad(img_BCHW, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return pad[..., top : top + h, left : left + w] if (dy or dx) else img_BCHW


def view_input_size(kind: str, image_size: int) -> int:
    """Side of the square image make_views expects: int(1.1 R) for tencrop (spec §2.3), else R."""
    if kind not in VIEW_KINDS:
        raise ValueError(f"unknown view kind {kind!r}; expected one of {VIEW_KINDS}")
    return int(1.1 * image_size) if kind == "tencrop" else image_size


def num_views(kind: str) -> int:
    """V, the views make_views returns per image: 10 for tencrop (5 crops x flip), 4 for tiny."""
    if kind not in VIEW_KINDS:
        raise ValueError(f"unknown view kind {kind!r}; expected one of {VIEW_KINDS}")
    return 10 if kind == "tencrop" else 4


def make_views(img_BCHW: torch.Tensor, kind: str = "tiny", image_size: int | None = None) -> torch.Tensor:
    """B x C x H x W -> B x V x C x R x R views (R = image_size: required for tencrop, default H for tiny)."""
    if kind not in VIEW_KINDS:
        raise ValueError(f"unknown view kind {kind!r}; expected one of {VIEW_KINDS}")
    img = to_model_range(img_BCHW)
    if kind == "tencrop":
        if not image_size:
            raise ValueError("tencrop needs image_size (R): its input is the int(1.1 R) crop, not R")
        size, side = image_size, view_input_size(kind, image_size)
        if tuple(img.shape[-2:]) != (side, side):
            raise ValueError(f"tencrop views of {size} px are cut from the ADM centre crop of the original "
                             f"to int(1.1 * {size}) = {side} px; got {tuple(img.shape[-2:])} (make it with "
                             f"images.center_crop(decode_rgb(data), {side}))")
        views = _five_crops(img, size) + _five_crops(img.flip(-1), size)
    else:
        size = image_size or img.shape[-1]
        img = _centre_square(img, size)
        views = [img, img.flip(-1), _shift(img, 0, 1), _shift(img, 1, 0)]
    return torch.stack(views, dim=1)


@torch.no_grad()
def extract_triplets(
    tokenizer, img_BCHW: torch.Tensor, rng: torch.Generator, views: str = "tiny"
) -> dict[str, torch.Tensor]:
    """clean / input / target index channels (B x V x N) with one perturbation span per image."""
    cfg = tokenizer.cfg
    views_BV = make_views(img_BCHW, views, cfg.image_size)
    b, v = views_BV.shape[:2]
    spans = [sample_perturbation(cfg.num_tokens, cfg.causal_num, cfg.group_size, rng) for _ in range(b)]
    j_B = torch.tensor([s[0] for s in spans], dtype=torch.long)
    w_B = torch.tensor([s[1] for s in spans], dtype=torch.long)
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        flat = views_BV.flatten(0, 1).to(next(tokenizer.parameters()).device)
        out = tokenizer.correction_codes(
            flat, j_B.repeat_interleave(v), w_B.repeat_interleave(v), generator=rng
        )
    finally:
        tokenizer.train(was_training)
    result = {k: out[k].reshape(b, v, -1).cpu() for k in ("clean", "input", "target")}
    result["view"] = torch.arange(v).expand(b, v).clone()
    result["perturb_start"], result["perturb_width"] = j_B, w_B
    return result
