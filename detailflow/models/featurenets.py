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

Placement (FrozenPlacement): a file is loaded straight onto its device (map_location / safetensors
device; a torch.export program is moved by torch.export's move_to_device_pass, device constants
included), then probed there at the TRAINING batch sizes: a graph that fails there, or answers with
another batch size (a trace that baked the probe's batch), is refused at load, naming the file and batch.
On CUDA the nets run under bf16 autocast with TF32 matmuls; on CPU in fp32 unless autocast is asked for.

Usage:
    net = ViTFeatureNet(image_size=32, patch_size=4, width=32, depth=2, heads=2, mlp=64)
    save_feature_net(net, "teacher.safetensors"); net2 = load_feature_net("teacher.safetensors")
    where = FrozenPlacement(device="cuda:0", batch=32)        # the worker's device and micro-batch
    net3 = load_feature_net("dino.pt", where, image_size=224, batches=where.batches())
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class FrozenPlacement:
    """Where the frozen nets live and the batch sizes training calls them with."""

    device: str = "cpu"  # loaded straight onto it (map_location) and run there ("cuda:0", "cpu")
    batch: int = 2  # the training micro-batch: every net is probed at it at load (2 = the old probe only)
    autocast: bool | None = None  # bf16 autocast; None: on for CUDA, off (fp32) for CPU

    def batches(self, *factors: int) -> tuple[int, ...]:
        """The batch sizes to probe: the micro-batch times each factor (1 when none given)."""
        return tuple(sorted({self.batch * f for f in (factors or (1,))}))

    def use_autocast(self) -> bool:
        return torch.device(self.device).type == "cuda" if self.autocast is None else self.autocast


def _build(arch: str, config: dict, state: dict, path: str, device: torch.device) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"{path}: unknown feature-net arch {arch!r}; known: {sorted(ARCHS)}")
    with device:  # built on its device: no CPU copy of the weights
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


def _load(path: str, device: torch.device) -> nn.Module:
    if path.endswith(".pt2"):  # torch.export archive (fixed input shape unless exported with dynamic dims)
        from torch.export.passes import move_to_device_pass

        return move_to_device_pass(torch.export.load(path), device).module()
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
        if "arch" not in meta:
            raise ValueError(
                f"{path}: safetensors metadata lacks 'arch'/'config' (write it with save_feature_net)"
            )
        state = load_file(path, device=str(device))
        return _build(meta["arch"], json.loads(meta.get("config", "{}")), state, path, device)
    try:
        return torch.jit.load(path, map_location=device)
    except Exception:  # not TorchScript: a plain torch weights file
        pass
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: neither a torch weights file nor a TorchScript archive") from exc
    if not isinstance(obj, dict) or not {"arch", "config", "state_dict"} <= set(obj):
        raise ValueError(f"{path}: torch file must hold a dict with 'arch', 'config', 'state_dict'")
    return _build(obj["arch"], obj["config"], obj["state_dict"], path, device)


def load_feature_net(
    path: str,
    where: FrozenPlacement | None = None,
    image_size: int | None = None,
    batches: tuple[int, ...] = (),
) -> nn.Module:
    """Load a frozen feature network from a local file (formats: module docstring) onto where.device;
    with image_size, probe it there at each batch size in `batches` (see check_batches)."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"feature network file not found: {path!r} (nothing is downloaded)")
    where = where or FrozenPlacement()
    net = freeze(_load(path, torch.device(where.device)))
    if image_size is not None and batches:
        check_batches(FrozenNet(net, where), path, image_size, batches)
    return net


def check_batches(net: FrozenNet, path: str, image_size: int, batches: tuple[int, ...]) -> None:
    """Run `net` on zeros at every batch size; refuse a net that fails or returns another batch size
    (a traced graph keeps the batch size it was traced with wherever it was turned into a constant)."""
    for b in batches:
        try:
            with torch.no_grad():
                feats = net(torch.zeros(b, 3, image_size, image_size, device=net.where.device))
        except Exception as exc:
            raise ValueError(f"{path}: the network fails at the training batch size {b} "
                             f"({image_size}x{image_size} images on {net.where.device}): {exc}") from exc
        wrong = [tuple(f.shape) for f in feats if f.shape[0] != b]
        if wrong:
            raise ValueError(f"{path}: at the training batch size {b} the network returns features of "
                             f"shapes {wrong} (batch dim != {b}): was it traced at a fixed batch size? "
                             "Export it with a dynamic batch dimension")


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
    optimisers never see it). Runs on where.device (bf16 autocast + TF32 on CUDA; fp32 on CPU unless
    where.autocast asks), moving an input from elsewhere there and the features back; without a
    placement it follows the input's device. Gradients still flow to the input."""

    def __init__(self, net: nn.Module, where: FrozenPlacement | None = None):
        self.net = freeze(net)
        self.where = where
        if where is not None and torch.device(where.device).type == "cuda":
            _tf32_on()

    def __call__(self, img_BCHW: torch.Tensor) -> list[torch.Tensor]:
        where = self.where or self._follow(img_BCHW.device)
        device = torch.device(where.device)
        x = img_BCHW.to(device=device, dtype=self._dtype())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=where.use_autocast()):
            feats = self.net(x)
        feats = [feats] if isinstance(feats, torch.Tensor) else list(feats)
        return [f.to(img_BCHW.device) for f in feats]

    def _follow(self, device: torch.device) -> FrozenPlacement:
        ref = next(iter(self.net.parameters()), None)
        if ref is not None and ref.device != device:
            self.net.to(device)
            if device.type == "cuda":
                _tf32_on()
        return FrozenPlacement(device=str(device))

    def _dtype(self) -> torch.dtype:
        ref = next(iter(self.net.parameters()), None)
        return torch.float32 if ref is None else ref.dtype


def _tf32_on() -> None:
    """TF32 matmuls/convolutions (the spec's training setting) for whatever autocast leaves in fp32."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
