"""Registry configs build the AR model with the spec's sizes (spec §0, §2.1, §2.2, §6.3-§6.5)."""

import pytest
import torch

from detailflow.models.ar import DetailFlowGPT
from detailflow.models.configs import MODEL_CONFIGS, ARConfig, get_model_config


def expected_ar_params(c: ARConfig) -> int:
    """Blocks (qkv+out 4d^2, SwiGLU 3*d*h, two norms) + token table + head + class table + queries + norm."""
    block = 4 * c.dim**2 + 3 * c.dim * c.ffn_hidden + 2 * c.dim
    return (c.depth * block + 2 * c.vocab_size * c.dim + (c.num_classes + 1) * c.dim
            + (c.group_size - 1) * c.dim + c.dim)


def count_on_meta(c: ARConfig) -> int:
    with torch.device("meta"):
        model = DetailFlowGPT(c)
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,passes", [("detailflow-16", 23), ("detailflow-32", 39), ("detailflow-64", 71)])
def test_paper_ar_configs(name, passes):
    ar = get_model_config(name).ar
    assert (ar.depth, ar.dim, ar.heads, ar.ffn_hidden, ar.vocab_size) == (24, 1024, 16, 2816, 8192)
    n = count_on_meta(ar)
    assert n == expected_ar_params(ar)
    # spec §2.1: 24 x 12.85M blocks + 2 x 8.4M embedding/head + 1.0M class table = 326M (paper Table 1)
    assert abs(n - 326e6) / 326e6 < 0.005
    assert abs(n - (24 * 12.85e6 + 2 * 8.39e6 + 1.0e6)) / n < 0.005
    assert ar.forward_passes == passes == ar.causal_num + ar.num_groups - 1


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_every_registry_ar_config_builds(name):
    ar = get_model_config(name).ar
    assert count_on_meta(ar) == expected_ar_params(ar)


def test_small_configs_forward_passes():
    assert get_model_config("tiny").ar.forward_passes == 11  # spec §6.3
    assert get_model_config("tiny64").ar.forward_passes == 15  # spec §6.4
    assert get_model_config("smoke").ar.forward_passes == 7  # spec §6.5
