"""Defects the rehearsal (tests/test_rehearsal.py) exposed, each pinned by a test that fails on the code
before its fix (the commit that fixed it names the test)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from detailflow.models.configs import get_model_config
from detailflow.models.featurenets import FrozenPlacement

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")]


class BakedBatchTokens(nn.Module):
    """Patch tokens B x C x L, with the traced batch size turned into a constant (a tracing accident)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, x):
        f = self.embed(x)
        return [f.reshape(int(f.shape[0]), 8, -1)]


def _smoke(**changes):
    return dataclasses.replace(get_model_config("smoke").tokenizer, **changes)


def test_discriminator_backbone_is_probed_at_the_self_corrected_batch(tmp_path):
    """With self-correction the D step and the generator's adversarial term see the decoded batch 2B
    (model.last_target / last_reconstruction hold both halves): a backbone good at B only must be
    refused when it loads, not at the first GAN step (step 40,000 of the paper run)."""
    from detailflow.models.losses import Discriminator
    from detailflow.models.tokenizer import DetailFlowTokenizer

    micro = 2
    path = tmp_path / "dino_b2.pt"
    torch.jit.save(torch.jit.trace(BakedBatchTokens().eval(), torch.randn(micro, 3, 32, 32)), str(path))
    cfg = _smoke(gan_weight=0.2, disc_start=0, disc_net_path=str(path))
    with pytest.raises(ValueError, match=r"dino_b2\.pt.*training batch size 4"):
        Discriminator(cfg, where=FrozenPlacement(batch=micro))
    # the batch the loop really gives D: a self-corrected training step's targets
    model = DetailFlowTokenizer(_smoke())
    img = torch.rand(micro, 3, 32, 32) * 2 - 1
    model.training_step(img, img, cfg.num_tokens, 0)
    assert model.last_target.shape[0] == 2 * micro
