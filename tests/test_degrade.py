"""Prefix sampler and degrade op (spec §1.6, §6.6 check 2)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from detailflow.models.configs import get_model_config
from detailflow.models.degrade import degrade_to_prefix, prefix_probabilities, sample_prefix_len
from detailflow.models.resolution import ResolutionMap


def _rmap(name):
    return ResolutionMap.from_config(get_model_config(name).tokenizer)


@pytest.mark.parametrize("name", ["smoke", "tiny", "tiny64", "detailflow-16"])
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_exact_probabilities(name, p):
    rmap = _rmap(name)
    n, g, cn = rmap.num_tokens, rmap.group_size, rmap.causal_num
    probs = prefix_probabilities(rmap, p)
    expected_support = list(range(1, cn + 1)) + list(range(cn + g, n - g + 1, g)) + [n]
    assert list(probs) == expected_support
    assert sum(probs.values()) == pytest.approx(1.0)
    for t in range(1, cn + 1):
        assert probs[t] == pytest.approx(p / (n - g))
    for t in range(cn + g, n, g):
        assert probs[t] == pytest.approx(p * g / (n - g))
    assert probs[n] == pytest.approx(1 - p)


@pytest.mark.parametrize("name", ["smoke", "tiny", "detailflow-16"])
def test_sampler_chi_square(name):
    rmap = _rmap(name)
    p = 0.2
    rng = np.random.default_rng(1234)
    draws = np.array([sample_prefix_len(rmap, p, rng) for _ in range(100_000)])
    probs = prefix_probabilities(rmap, p)
    support = np.array(list(probs))
    assert set(np.unique(draws)) <= set(support.tolist())
    observed = np.array([(draws == t).sum() for t in support])
    expected = np.array([probs[int(t)] for t in support]) * len(draws)
    _, pval = stats.chisquare(observed, expected)
    assert pval > 1e-3, (observed, expected)


def test_sampler_edge_probs():
    rmap = _rmap("smoke")
    rng = np.random.default_rng(0)
    assert {sample_prefix_len(rmap, 0.0, rng) for _ in range(200)} == {rmap.num_tokens}
    assert rmap.num_tokens not in {sample_prefix_len(rmap, 1.0, rng) for _ in range(500)}
    with pytest.raises(ValueError):
        sample_prefix_len(rmap, 1.5, rng)


@pytest.mark.parametrize("name", ["smoke", "tiny", "tiny64"])
def test_shapes_every_admissible_t(name):
    rmap = _rmap(name)
    img = torch.rand(2, 3, rmap.image_size, rmap.image_size) * 2 - 1
    for t in rmap.admissible:
        out = degrade_to_prefix(img, t, rmap)
        c = rmap.canvas_size(t)
        assert out.shape == (2, 3, c, c)
        assert out.dtype == img.dtype
    assert degrade_to_prefix(img, rmap.num_tokens, rmap) is img


def test_area_down_bicubic_up_semantics():
    rmap = _rmap("tiny")  # R=32, f=4: t=8 -> r=10, c=12; t=16 -> r=c=20
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    low = F.adaptive_avg_pool2d(img, 10)
    want = F.interpolate(low, size=(12, 12), mode="bicubic", align_corners=False)
    torch.testing.assert_close(degrade_to_prefix(img, 8, rmap), want)
    # r == c: area only, no upsampling step
    torch.testing.assert_close(
        degrade_to_prefix(img, 16, rmap), F.interpolate(img, size=(20, 20), mode="area")
    )
    # a constant image stays constant (area averages, bicubic interpolates)
    const = torch.full((1, 3, 32, 32), 0.3)
    torch.testing.assert_close(degrade_to_prefix(const, 4, rmap), torch.full((1, 3, 8, 8), 0.3))
    # area downsampling by an integer factor is the block mean (smoke, t=8: r=19 is not, t=1: r=1 is)
    smoke = _rmap("smoke")
    torch.testing.assert_close(
        degrade_to_prefix(img, 1, smoke), img.mean(dim=(2, 3), keepdim=True).expand(1, 3, 8, 8)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtype_and_device_preserved(dtype):
    rmap = _rmap("smoke")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        img = (torch.rand(2, 3, 32, 32) * 2 - 1).to(device=dev, dtype=dtype)
        out = degrade_to_prefix(img, 8, rmap)
        assert out.dtype == dtype and out.device.type == dev
        ref = degrade_to_prefix(img.float(), 8, rmap)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


def test_bad_inputs():
    rmap = _rmap("smoke")
    with pytest.raises(TypeError):
        degrade_to_prefix(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 8, rmap)
    with pytest.raises(ValueError):
        degrade_to_prefix(torch.zeros(1, 3, 32, 16), 8, rmap)
    with pytest.raises(ValueError):
        degrade_to_prefix(torch.zeros(3, 32, 32), 8, rmap)
    with pytest.raises(ValueError, match="not admissible"):
        degrade_to_prefix(torch.zeros(1, 3, 32, 32), 5, rmap)
