"""Logged values to Python floats in ONE device-to-host transfer.

The loss code (losses.discriminator_step, ...) returns its logs as detached 0-dim tensors so a training
step never waits on the device; the training loop converts them when it logs (once per progress line):

    logs = host_floats(logs)    # {name: float}; non-tensor entries pass through unchanged
"""

from __future__ import annotations

from typing import Any

import torch


def host_floats(logs: dict[str, Any]) -> dict[str, Any]:
    """`logs` with every tensor entry (one element each) as a float: stacked on the first tensor's
    device and transferred with a single .tolist(); other entries kept as they are. Key order kept."""
    keys = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(logs)
    device = logs[keys[0]].device
    for k in keys:
        if logs[k].numel() != 1:
            raise ValueError(f"log entry {k!r} must hold one value, got shape {tuple(logs[k].shape)}")
    values = torch.stack([logs[k].detach().reshape(()).to(device, torch.float32) for k in keys]).tolist()
    host = dict(zip(keys, values, strict=True))
    return {k: host.get(k, v) for k, v in logs.items()}
