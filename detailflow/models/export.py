"""Save and load model weights as `model.safetensors` + `config.json` (no pickle anywhere).

Usage:
    from detailflow.models.export import save_pretrained, load_state_checked, read_config
    save_pretrained(model, {"name": "tiny", ...}, "out/ar")   # writes out/ar/model.safetensors, config.json
    cfg = read_config("out/ar")                                # build the model from cfg first, then
    load_state_checked(model, "out/ar")                        # strict load; clear error on any mismatch
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class StateDictMismatch(ValueError):
    """The weights on disk do not fit the module; the message lists every difference."""

    def __init__(self, directory: Path, missing: dict, unexpected: dict, mismatched: dict):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"weights in {directory} do not match the module:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + _fmt(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + _fmt(unexpected))
        if mismatched:
            shown = ", ".join(f"{k} file {tuple(a)} vs module {tuple(b)}" for k, (a, b) in mismatched.items())
            lines.append(f"  shape mismatches ({len(mismatched)}): {shown}")
        super().__init__("\n".join(lines))


def _fmt(shapes: dict) -> str:
    return ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage (tied weights) and non-contiguous views:
    # every entry gets its own contiguous CPU copy.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_pretrained(module: nn.Module, config: dict, directory) -> None:
    """Write the module's state dict and its JSON-serialisable config into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"config for {out} is not JSON-serialisable: {e}") from e
    # Write to temporary names first so a crash never leaves a half-written pair behind.
    tmp_weights, tmp_config = out / (WEIGHTS_NAME + ".tmp"), out / (CONFIG_NAME + ".tmp")
    save_file(_plain_state(module), str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(config_text + "\n")
    tmp_weights.replace(out / WEIGHTS_NAME)
    tmp_config.replace(out / CONFIG_NAME)


def read_config(directory) -> dict:
    """The config dict saved next to the weights."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_state_checked(module: nn.Module, directory, select=None) -> dict:
    """Strictly load `directory`'s weights (or select(weights): the entries to keep) into `module`;
    returns the saved config.

    Raises StateDictMismatch (listing missing keys, unexpected keys and shape mismatches with
    their shapes) before touching any parameter, so a failed load leaves the module unchanged.
    """
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    config = read_config(directory)
    state = load_file(str(path))
    if select is not None:
        state = select(state)
    expected = module.state_dict()
    missing = {k: v.shape for k, v in expected.items() if k not in state}
    unexpected = {k: v.shape for k, v in state.items() if k not in expected}
    mismatched = {
        k: (state[k].shape, v.shape) for k, v in expected.items() if k in state and state[k].shape != v.shape
    }
    if missing or unexpected or mismatched:
        raise StateDictMismatch(directory, missing, unexpected, mismatched)
    module.load_state_dict(state, strict=True)
    return config
