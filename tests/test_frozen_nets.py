"""Frozen feature networks as users ship them (issue 18): TorchScript files written here, loaded onto
their device, probed at the TRAINING batch size (a trace that baked the probe's batch is refused at load,
naming the file and the batch), fp32 on CPU unless autocast is asked for."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow.models.align import build_teacher
from detailflow.models.configs import get_model_config
from detailflow.models.featurenets import FrozenNet, FrozenPlacement, load_feature_net
from detailflow.models.losses import Discriminator, PerceptualLoss
from detailflow.models.tokenizer import DetailFlowTokenizer

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")]


class TokenNet(nn.Module):
    """Patchify conv -> tokens B x C x L, twice (a tiny ViT-like feature net)."""

    def __init__(self, baked_batch: bool = False):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Conv1d(8, 8, 1)
        self.baked_batch = baked_batch

    def forward(self, x):
        f = self.embed(x)
        # int(...) makes the trace keep the probe's batch as a constant (a common tracing accident)
        b = int(f.shape[0]) if self.baked_batch else f.shape[0]
        tok = f.reshape(b, 8, -1)
        return [tok, self.mix(tok)]


class BroadcastNet(nn.Module):
    """Adds a tensor built from the traced shape: at another batch size the graph itself fails."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        f = self.embed(x).flatten(2)
        return [f + torch.zeros(int(x.shape[0]), 8, f.shape[-1])]


def _trace(net: nn.Module, path, batch: int = 2, size: int = 32) -> str:
    torch.manual_seed(0)
    traced = torch.jit.trace(net.eval(), torch.randn(batch, 3, size, size), check_trace=False)
    torch.jit.save(traced, str(path))
    return str(path)


def _cfg(**changes):
    base = dict(random_feature_nets=False, image_size=32)
    return dataclasses.replace(get_model_config("smoke").tokenizer, **{**base, **changes})


@pytest.mark.parametrize("make", [lambda: TokenNet(baked_batch=True), BroadcastNet],
                         ids=["reshape", "broadcast"])
def test_a_trace_with_the_probe_batch_baked_in_is_refused_at_the_training_batch(tmp_path, make):
    path = _trace(make(), tmp_path / "dino_traced_b2.pt", batch=2)
    load_feature_net(path, FrozenPlacement(batch=2), 32, (2,))  # the probe's batch alone passes
    with pytest.raises(ValueError, match=r"dino_traced_b2\.pt.*training batch size 4"):
        load_feature_net(path, FrozenPlacement(batch=4), 32, (4,))
    cfg = _cfg(gan_weight=0.2, disc_net_path=path, perceptual_weight=1.0, perceptual_net_path=path,
               align_teacher="siglip2", align_weight=1.0, align_teacher_path=path)
    where = FrozenPlacement(batch=4)
    for build in (lambda: Discriminator(cfg, where=where), lambda: PerceptualLoss(cfg, where),
                  lambda: build_teacher(cfg, where), lambda: DetailFlowTokenizer(cfg, where)):
        with pytest.raises(ValueError, match=r"dino_traced_b2\.pt.*training batch size 4"):
            build()


def test_perceptual_net_is_probed_at_twice_the_micro_batch(tmp_path):
    """Self-correction decodes 2B images at once: a net good at B but not 2B must not load."""
    path = _trace(TokenNet(baked_batch=True), tmp_path / "lpips_b4.pt", batch=4)
    cfg = _cfg(perceptual_weight=1.0, perceptual_net_path=path)
    with pytest.raises(ValueError, match=r"lpips_b4\.pt.*training batch size 8"):
        PerceptualLoss(cfg, FrozenPlacement(batch=4))


def test_a_dynamic_trace_loads_and_matches_the_eager_net(tmp_path):
    eager = TokenNet().eval()
    torch.manual_seed(0)
    traced = torch.jit.trace(eager, torch.randn(2, 3, 32, 32))
    path = tmp_path / "teacher.pt"
    torch.jit.save(traced, str(path))
    where = FrozenPlacement(device="cpu", batch=4)
    net = load_feature_net(str(path), where, 32, where.batches(1, 2))
    assert all(p.device.type == "cpu" and not p.requires_grad for p in net.parameters())
    x = torch.randn(5, 3, 32, 32)
    got, want = FrozenNet(net, where)(x), eager(x)
    assert [g.dtype for g in got] == [torch.float32] * 2  # CPU: fp32 unless autocast is asked for
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-6)
    cfg = _cfg(align_teacher="siglip2", align_weight=1.0, align_teacher_path=str(path))
    teacher = build_teacher(cfg, where)
    pooled = F.normalize(want[-1].mean(-1), dim=-1)  # mean over tokens, l2-normalised (align.py's doc)
    assert torch.allclose(teacher(x), pooled.detach(), atol=1e-6)


def test_cpu_autocast_only_when_asked():
    net = TokenNet().eval()
    x = torch.randn(2, 3, 32, 32)
    assert FrozenNet(net, FrozenPlacement(device="cpu"))(x)[0].dtype == torch.float32
    feats = FrozenNet(net, FrozenPlacement(device="cpu", autocast=True))(x)
    assert feats[0].dtype == torch.bfloat16  # the conv ran under bf16 autocast
    want = net(x)[0]
    assert (feats[0].float() - want).abs().max() < 0.05 * want.abs().max()  # bf16 precision, same net
    assert FrozenPlacement(device="cuda:0").use_autocast() and not FrozenPlacement().use_autocast()


def test_gradient_reaches_the_input_through_the_placed_net():
    net = TokenNet().eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    FrozenNet(net, FrozenPlacement(device="cpu", batch=2))(x)[-1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_torch_export_archives_static_batch_refused_dynamic_loads(tmp_path):
    """A .pt2 exported at batch 2 without a dynamic batch dim is refused at the training batch; one
    exported with Dim('batch') loads (moved by move_to_device_pass) and matches the eager net."""
    eager = TokenNet().eval()
    example = (torch.randn(2, 3, 32, 32),)
    static, dynamic = tmp_path / "static.pt2", tmp_path / "dynamic.pt2"
    torch.export.save(torch.export.export(eager, example), str(static))
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(eager, example, dynamic_shapes=({0: batch},)), str(dynamic))
    where = FrozenPlacement(device="cpu", batch=4)
    with pytest.raises(ValueError, match=r"static\.pt2.*training batch size 4"):
        load_feature_net(str(static), where, 32, where.batches())
    net = load_feature_net(str(dynamic), where, 32, where.batches(1, 2))
    x = torch.randn(4, 3, 32, 32)
    for got, want in zip(FrozenNet(net, where)(x), eager(x), strict=True):
        assert torch.allclose(got, want, atol=1e-5)


@pytest.fixture
def tf32_flags():
    """TF32 off before the test; the process's flags put back after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_a_cuda_placement_turns_tf32_on_and_a_cpu_one_leaves_it(tf32_flags):
    """Issue 18: the frozen nets ran in fp32 with TF32 off. Placing one on a CUDA device (no GPU needed
    to place it: nothing runs here) turns TF32 matmuls and convolutions on, with bf16 autocast."""
    FrozenNet(TokenNet(), FrozenPlacement(device="cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    where = FrozenPlacement(device="cuda:0")
    FrozenNet(TokenNet(), where)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert where.use_autocast()


@pytest.mark.parametrize("fmt", ["torchscript", "torch_export"])
def test_files_are_loaded_straight_onto_the_placement_device(tmp_path, monkeypatch, fmt):
    """Issue 18: the nets were loaded on the CPU and moved after (a traced graph keeps its CPU
    constants). The loader must ask torch for the placement's device itself: the TorchScript loader's
    map_location, torch.export's move_to_device_pass. Spied here (no GPU): the device asked for is
    recorded and the CPU used in its place, so the file still loads."""
    import torch.export.passes as passes

    asked = []
    if fmt == "torchscript":
        path = _trace(TokenNet(), tmp_path / "teacher.pt")
        original = torch.jit.load

        def spy(f, map_location=None, **kw):
            asked.append(torch.device(map_location) if map_location is not None else None)
            return original(f, map_location="cpu", **kw)
        monkeypatch.setattr(torch.jit, "load", spy)
    else:
        path = str(tmp_path / "teacher.pt2")
        batch = torch.export.Dim("batch", min=1, max=64)
        torch.export.save(torch.export.export(TokenNet().eval(), (torch.randn(2, 3, 32, 32),),
                                              dynamic_shapes=({0: batch},)), path)
        original = passes.move_to_device_pass

        def spy(ep, location):
            asked.append(torch.device(location))
            return original(ep, "cpu")
        monkeypatch.setattr(passes, "move_to_device_pass", spy)
    net = load_feature_net(path, FrozenPlacement(device="cuda:1", batch=2))
    assert asked == [torch.device("cuda:1")]
    assert all(not p.requires_grad for p in net.parameters())
