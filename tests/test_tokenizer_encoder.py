"""Encoder mask and causality (spec §1.2, §6.6 check 3)."""

import pytest
import torch

from detailflow.models.configs import get_model_config
from detailflow.models.masks import encoder_mask, latent_block_ids
from detailflow.models.tokenizer import Encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mask_rules_paper_geometry():
    p, n, c, g = 6, 24, 8, 8
    m = encoder_mask(p, n, c, g)
    assert m[:p, :p].all() and m[p:, :p].all() and not m[:p, p:].any()
    lat = m[p:, p:]
    for i in range(n):
        for j in range(n):
            want = j <= i if i < c else (j // g) <= (i // g)
            assert bool(lat[i, j]) == want, (i, j)


@pytest.mark.parametrize("n,c,g", [(16, 4, 4), (32, 8, 4), (16, 4, 2)])
def test_block_ids(n, c, g):
    ids = latent_block_ids(n, c, g)
    assert ids[:c].tolist() == list(range(c))
    assert ids[c:].tolist() == [c + (i - c) // g for i in range(c, n)]


def _encoder(name):
    cfg = get_model_config(name).tokenizer
    torch.manual_seed(0)
    return Encoder(cfg).eval(), cfg


@pytest.mark.parametrize("name", ["smoke", "tiny"])
def test_changing_a_block_leaves_earlier_blocks_bit_identical(name):
    enc, cfg = _encoder(name)
    img = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    slots = enc.latent_queries.detach().expand(2, -1, -1).clone()
    ids = latent_block_ids(cfg.num_tokens, cfg.causal_num, cfg.group_size)
    with torch.no_grad():
        base, base_patches = enc(img, slots, return_patches=True)
        for k in sorted(set(ids.tolist()))[1:]:
            changed = slots.clone()
            changed[:, ids == k] += torch.randn_like(changed[:, ids == k])
            out, patches = enc(img, changed, return_patches=True)
            assert torch.equal(out[:, ids < k], base[:, ids < k]), f"block {k} leaked backwards"
            assert not torch.isclose(out[:, ids == k], base[:, ids == k]).all(dim=-1).any()
            assert torch.equal(patches, base_patches), "latents reached patch tokens"


@pytest.mark.parametrize("name", ["smoke", "tiny"])
def test_pixels_change_every_latent(name):
    enc, cfg = _encoder(name)
    img = torch.rand(1, 3, cfg.image_size, cfg.image_size) * 2 - 1
    img2 = img.clone()
    img2[..., : cfg.patch_size, : cfg.patch_size] += 0.5  # one patch only
    with torch.no_grad():
        a, b = enc(img), enc(img2)
    assert (a - b).abs().amax(dim=-1).min() > 0  # every latent moved
