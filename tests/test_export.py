"""Round trip and error messages of detailflow.models.export (safetensors + JSON, no pickle)."""

import pytest
import torch
from torch import nn

from detailflow.models.export import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    StateDictMismatch,
    load_state_checked,
    read_config,
    save_pretrained,
)


class Tied(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6, extra: int = 0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim + extra, bias=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # shared storage: safetensors needs a private copy
        self.register_buffer("scale", torch.arange(3.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(tmp_path, dtype):
    torch.manual_seed(0)
    src = Tied().to(dtype)
    with torch.no_grad():
        src.scale.mul_(1.7)
    cfg = {"name": "x", "dims": [1, 2], "nested": {"a": 0.5}}
    save_pretrained(src, cfg, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and (tmp_path / CONFIG_NAME).is_file()
    assert not list(tmp_path.glob("*.tmp"))
    dst = Tied().to(dtype)
    assert load_state_checked(dst, tmp_path) == cfg == read_config(tmp_path)
    for k, v in src.state_dict().items():
        w = dst.state_dict()[k]
        assert w.dtype == v.dtype and torch.equal(w.view(torch.uint8), v.view(torch.uint8)), k
    assert dst.head.weight.data_ptr() == dst.emb.weight.data_ptr()  # tie survives loading


def test_shape_mismatch_lists_names_and_shapes(tmp_path):
    save_pretrained(Tied(), {}, tmp_path)
    dst = Tied(extra=2)
    before = dst.proj.weight.clone()
    with pytest.raises(StateDictMismatch) as err:
        load_state_checked(dst, tmp_path)
    msg = str(err.value)
    assert "proj.weight file (6, 6) vs module (8, 6)" in msg and "shape mismatches (1)" in msg
    assert torch.equal(dst.proj.weight, before)  # nothing loaded on failure


def test_missing_and_unexpected_keys(tmp_path):
    save_pretrained(Tied(), {}, tmp_path)
    dst = Tied()
    dst.extra = nn.Linear(2, 3, bias=False)
    del dst.proj
    with pytest.raises(StateDictMismatch) as err:
        load_state_checked(dst, tmp_path)
    msg = str(err.value)
    assert "missing keys (1): extra.weight (3, 2)" in msg
    assert "unexpected keys (1): proj.weight (6, 6)" in msg
    assert err.value.missing.keys() == {"extra.weight"}


def test_missing_files_and_bad_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_state_checked(Tied(), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_config(tmp_path)
    with pytest.raises(TypeError, match="JSON"):
        save_pretrained(Tied(), {"bad": object()}, tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_config(tmp_path)
