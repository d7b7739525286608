"""Codes -> uint8 images and prefix previews (spec §3.9) with the smoke tokenizer."""

import pytest
import torch

from detailflow.models.configs import get_model_config
from detailflow.models.generator import codes_to_uint8, prefix_previews, to_uint8
from detailflow.models.tokenizer import DetailFlowTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return DetailFlowTokenizer(get_model_config("smoke").tokenizer)


def test_to_uint8_formula():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 64, 128, 255, 255, 255]
    assert to_uint8(x).dtype == torch.uint8


def test_codes_to_uint8(tokenizer):
    cfg = tokenizer.cfg
    codes = torch.randint(cfg.codebook_size, (3, cfg.num_tokens))
    tokenizer.train()
    img = codes_to_uint8(tokenizer, codes)
    assert tokenizer.training  # mode restored
    assert img.shape == (3, 3, cfg.image_size, cfg.image_size) and img.dtype == torch.uint8
    tokenizer.eval()
    with torch.no_grad():
        ref = tokenizer.decode(codes)
    assert torch.equal(img, (127.5 * ref + 128).clamp(0, 255).to(torch.uint8))
    with pytest.raises(ValueError, match="expected codes"):
        codes_to_uint8(tokenizer, codes[:, :4])


def test_prefix_previews(tokenizer):
    cfg = tokenizer.cfg
    codes = torch.randint(cfg.codebook_size, (2, cfg.num_tokens))
    previews = prefix_previews(tokenizer, codes)
    assert len(previews) == len(tokenizer.rmap.admissible)
    for t, img in zip(tokenizer.rmap.admissible, previews, strict=True):
        c = tokenizer.rmap.canvas_size(t)
        assert img.shape == (2, 3, c, c) and img.dtype == torch.uint8
    # a preview only depends on its prefix
    other = codes.clone()
    other[:, 4:] = (other[:, 4:] + 1) % cfg.codebook_size
    assert torch.equal(prefix_previews(tokenizer, other, [4])[0], prefix_previews(tokenizer, codes, [4])[0])
    assert torch.equal(previews[-1], codes_to_uint8(tokenizer, codes))
    with pytest.raises(ValueError, match="admissible"):
        prefix_previews(tokenizer, codes, [5])
