"""Frozen feature networks (alignment teacher, perceptual net, discriminator backbone) and their
local-file loader hook. Nothing is ever downloaded.

Every feature net maps an image B x 3 x H x W in [-1, 1] to a LIST of features with channels on
dim 1 (B x C x L for token nets, B x C x H x W for conv nets).

Files accepted by load_feature_net(path):
  * *.safetensors written by save_feature_net: weights + {"arch", "config"} in the file metadata;
  * a torch file {"arch", "config", "state_dict"} (loaded with weights_only=True);
  * a TorchScript archive (torch.jit.save) or a torch.export archive (*.pt2, torch.export.save) of any
    network following the interface above: the route for foreign weights such as the SigLIP2 vision
    tower (trace/export it offline where transformers is available, point align_teacher_path at it).

Usage:
    net = ViTFeatureNet(image_size=32, patch_size=4, width=32, depth=2, heads=2, mlp=64)
    save_feature_net(net, "teacher.safetensors"); net2 = load_feature_net("teacher.safetensors")
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, safe_open, save_file

from detailflow.models.vit import Block, init_linear, patchify, resize_pos_2d


class ViTFeatureNet(nn.Module):
    """Patch-embed + learned 2D positions + pre-LN blocks; features after the embedding and after
    every block (the last one post-LayerNorm), each B x C x L."""

    arch = "vit"

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp: int):
        super().__init__()
        self.config = dict(
            image_size=image_size, patch_size=patch_size, width=width, depth=depth, heads=heads, mlp=mlp
        )
        self.image_size, self.patch_size = image_size, patch_size
        grid = image_size // patch_size
        self.embed = nn.Linear(patch_size * patch_size * 3, width)
        self.pos_2d = nn.Parameter(torch.randn(grid, grid, width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        init_linear(self)

    def forward(self, img_BCHW: torch.Tensor) -> list[torch.Tensor]:
        h, w = (s // self.patch_size for s in img_BCHW.shape[-2:])
        x = self.embed(patchify(img_BCHW, self.patch_size)) + resize_pos_2d(self.pos_2d, h, w)
        feats = [x]
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            feats.append(self.norm(x) if i == len(self.blocks) - 1 else x)
        return [rearrange(f, "b l c -> b c l") for f in feats]


class ConvFeatureNet(nn.Module):
    """Small conv net (stride-2 stages, ReLU): a stand-in perceptual network for tiny runs."""

    arch = "conv"

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), seed: int = 0):
        super().__init__()
        self.config = dict(channels=list(channels), seed=seed)
        gen = torch.Generator().manual_seed(seed)
        layers, prev = [], 3
        for i, ch in enumerate(channels):
            conv = nn.Conv2d(prev, ch, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (prev * 9)) ** 0.5)
                conv.bias.zero_()
            layers.append(conv)
            prev = ch
        self.convs = nn.ModuleList(layers)

    def forward(self, img_BCHW: torch.Tensor) -> list[torch.Tensor]:
        feats, x = [], img_BCHW
        for conv in self.convs:
            x = F.relu(conv(x))
            feats.append(x)
        return feats


ARCHS = {"vit": ViTFeatureNet, "conv": ConvFeatureNet}


def save_feature_net(net: nn.Module, path: str) -> None:
    """Write a ViTFeatureNet/ConvFeatureNet as safetensors with its architecture in the metadata."""
    meta = {"arch": net.arch, "config": json.dumps(net.config)}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path, metadata=meta)


def _build(arch: str, config: dict, state: dict, path: str) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"{path}: unknown feature-net arch {arch!r}; known: {sorted(ARCHS)}")
    net = ARCHS[arch](**config)
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{path}: weights do not match arch {arch!r}: {exc}") from exc
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match arch {arch!r}: missing={missing} unexpected={unexpected}"
        )
    return net


def load_feature_net(path: str) -> nn.Module:
    """Load a frozen feature network from a local file (see module docstring for the formats)."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"feature network file not found: {path!r} (nothing is downloaded)")
    if path.endswith(".pt2"):  # torch.export archive (fixed input shape unless exported with dynamic dims)
        net = torch.export.load(path).module()
    elif path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
        if "arch" not in meta:
            raise ValueError(
                f"{path}: safetensors metadata lacks 'arch'/'config' (write it with save_feature_net)"
            )
        net = _build(meta["arch"], json.loads(meta.get("config", "{}")), load_file(path), path)
    else:
        try:
            net = torch.jit.load(path, map_location="cpu")
            return freeze(net)
        except Exception:  # not TorchScript: a plain torch weights file
            pass
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: neither a torch weights file nor a TorchScript archive") from exc
        else:
            if not isinstance(obj, dict) or not {"arch", "config", "state_dict"} <= set(obj):
                raise ValueError(f"{path}: torch file must hold a dict with 'arch', 'config', 'state_dict'")
            net = _build(obj["arch"], obj["config"], obj["state_dict"], path)
    return freeze(net)


def freeze(net: nn.Module) -> nn.Module:
    try:
        net.eval()
    except NotImplementedError:  # torch.export modules are exported in eval mode and refuse eval()
        pass
    for p in net.parameters():  # (ScriptModules lack requires_grad_)
        p.requires_grad_(False)
    return net


class FrozenNet:
    """Holds a frozen net OUTSIDE the owning module's parameters/state dict (so checkpoints and
    optimisers never see it) and follows the input's device lazily. Gradients still flow to the input."""

    def __init__(self, net: nn.Module):
        self.net = freeze(net)

    def __call__(self, img_BCHW: torch.Tensor) -> list[torch.Tensor]:
        feats = self.net(img_BCHW.to(self._move(img_BCHW.device)))
        return [feats] if isinstance(feats, torch.Tensor) else list(feats)

    def _move(self, device: torch.device) -> torch.dtype:
        ref = next(iter(self.net.parameters()), None)
        if ref is None:
            return torch.float32
        if ref.device != device:
            self.net.to(device)
        return ref.dtype
