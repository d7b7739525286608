"""A tiny random AR model shared by the sampler and engine tests (the output head is re-initialised:
its zero init would give uniform logits, under which every sampler agrees trivially)."""

from __future__ import annotations

import torch

from detailflow.models.ar import DetailFlowGPT
from detailflow.models.configs import ARConfig


def make_model(n=16, g=4, c=4, seed=0, **kw) -> DetailFlowGPT:
    cfg = ARConfig(**{**dict(vocab_size=48, num_classes=6, num_tokens=n, group_size=g, causal_num=c, dim=32,
                             depth=2, heads=2, ffn_multiple_of=16), **kw})
    torch.manual_seed(seed)
    model = DetailFlowGPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, 0.0, 0.5)  # zero-init head would give uniform logits
    return model
