"""GPU-shaped efficiency of the training step that CPU tests can pin (issue 18 item 5), besides the host
conversion counts in tests/test_loss_host_syncs.py: ZeRO's gradient reduction overlaps the backward pass
on GPUs, the client Adam is the fused CUDA kernel when its parameters are on a GPU, and the log line of a
training step (step_logs) is one host transfer that equals the values it converts."""

from __future__ import annotations

import pytest
import torch

from detailflow.pipelines.train.loop_common import DeviceSums, step_logs
from detailflow.platform import deepspeed_glue as dsg


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_overlaps_the_gradient_reduction_on_gpu_only(stage):
    gpu = dsg.build_ds_config(micro_batch=4, zero_stage=stage, device="cuda")["zero_optimization"]
    cpu = dsg.build_ds_config(micro_batch=4, zero_stage=stage, device="cpu")["zero_optimization"]
    assert gpu["overlap_comm"] is True  # NCCL on its own stream beside the backward
    assert cpu["overlap_comm"] is False  # gloo: nothing to overlap with, and extra buffers
    assert "overlap_comm" not in dsg.build_ds_config(micro_batch=4, zero_stage=0)["zero_optimization"]


def test_adam_is_not_fused_for_cpu_parameters():
    params = [torch.nn.Parameter(torch.zeros(3))]
    for kind in ("adam", "adamw"):
        assert not dsg.make_optimizer(params, lr=1e-3, kind=kind).defaults["fused"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adam_is_fused_for_cuda_parameters():
    params = [torch.nn.Parameter(torch.zeros(3, device="cuda"))]
    for kind in ("adam", "adamw"):
        assert dsg.make_optimizer(params, lr=1e-3, kind=kind).defaults["fused"] is True
        groups = [{"params": params, "lr_scale": 0.5}]
        assert dsg.make_optimizer(groups, lr=1e-3, kind=kind).defaults["fused"] is True


class _Engine:
    """Stands in for a DeepSpeed engine's one read-only accessor used by the log line (a real engine
    is exercised in tests/test_loss_host_syncs.py::test_one_full_tokenizer_step_converts_once...)."""

    def __init__(self, norm):
        self.norm = norm

    def get_global_grad_norm(self):
        return self.norm


@pytest.mark.parametrize("norm", [torch.tensor(2.5), 1.25, None])
def test_log_line_means_and_grad_norm_in_one_transfer(monkeypatch, norm):
    from test_loss_host_syncs import count_host_conversions

    sums = DeviceSums()
    losses = [0.5, 1.0, 3.0]
    for v in losses:
        sums.add({"loss": torch.tensor(v), "mse": torch.tensor(2 * v)})
    calls = count_host_conversions(monkeypatch)
    line = step_logs(sums, _Engine(norm), lr=0.1, images_per_s=7.0)
    assert calls == ["tolist"]  # no float()/bool() of the norm beside the means' one transfer
    want_norm = 0.0 if norm is None else float(norm)
    assert line == pytest.approx({"loss": sum(losses) / 3, "mse": 2 * sum(losses) / 3, "grad_norm": want_norm,
                                  "lr": 0.1, "images_per_s": 7.0})
    assert sums.means() == {}  # the interval is reset


def test_the_ar_ema_is_serialised_on_rank_0_only(monkeypatch):
    """Issue 18: every rank serialised the whole EMA (1.3 GB for DetailFlow-16's AR) for a checkpoint
    only rank 0 writes extra files of. Rank 1 builds nothing; rank 0's bytes hold the EMA as
    EMA.state_dict lays it out (values, decay, update count equal to what went in)."""
    from types import SimpleNamespace

    import safetensors.torch
    from safetensors.torch import load

    from detailflow.pipelines.train.ar import EMA_FILE, ema_checkpoint_files

    saves = []
    original = safetensors.torch.save
    monkeypatch.setattr(safetensors.torch, "save", lambda *a, **k: saves.append(1) or original(*a, **k))
    full = {"tok_emb.weight": torch.arange(6.0).reshape(2, 3), "head.bias": torch.tensor([0.5, -1.0])}
    ema = SimpleNamespace(decay=0.999, num_updates=7)
    assert ema_checkpoint_files(full, ema, rank=1) is None and saves == []
    files = ema_checkpoint_files(full, ema, rank=0)
    assert list(files) == [EMA_FILE] and saves == [1]
    state = load(files[EMA_FILE])
    for name, value in full.items():
        assert torch.equal(state[f"shadow.{name}"], value)
    assert float(state["decay"]) == 0.999 and int(state["num_updates"]) == 7
