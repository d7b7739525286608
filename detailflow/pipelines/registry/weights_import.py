"""Bring public weights into the platform: the authors' released DetailFlow tokenizer + GPT checkpoints,
and SigLIP2 vision towers as the tokenizer's encoder init.

    out = import_detailflow(storage, tokenizer="/ckpts/DetailFlow-16/checkpoints/tok.pt",
                            generator="s3://bucket/released/gpt-l/checkpoints/0300000.pt", name="df16")
    # -> runs/df16-tokenizer/export and runs/df16-ar/export (model.safetensors + config.json), the
    #    same exports training writes: `registry register --name df16 --ar df16-ar` takes them
    convert_siglip2_file("siglip2.safetensors", "s3://bucket/init/enc.safetensors", tok_cfg, storage)

Released files are torch checkpoints {"model": state dict, "ema": state dict} read with
torch.load(weights_only=True) only (anything that needs arbitrary unpickling is refused), next to a
`config.json` (model arguments) and `config.yaml` (training options), found in the checkpoint's folder or
the two above it (the authors' loaders look two levels up). Key mapping and refused options:
models/convert_released.py; SigLIP2 rules: models/convert_siglip2.py.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import tempfile
from pathlib import Path

import torch

from detailflow.models.convert_siglip2 import WeightsFormatError

WEIGHT_CHOICES = ("ema", "model")  # which state dict of a released checkpoint to import


def _fetch(storage, ref: str, directory: Path) -> Path:
    """A local path as is, or an s3:// URI downloaded into directory (nothing else is fetched)."""
    if ref.startswith("s3://"):
        if storage is None:
            raise ValueError(f"{ref}: an s3:// source needs the platform's storage settings")
        bucket, _, key = ref[5:].partition("/")
        if bucket != storage.bucket:
            raise ValueError(f"{ref} is not in the configured bucket {storage.bucket!r}")
        return storage.download_file(key, directory / Path(key).name)
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"{ref} not found (nothing is downloaded)")
    return path


def _configs(storage, ref: str, local: Path, directory: Path) -> tuple[dict, dict]:
    """config.json + config.yaml beside the checkpoint or up to two folders above it."""
    import yaml

    if ref.startswith("s3://"):
        bucket, _, key = ref[5:].partition("/")
        parts = key.split("/")[:-1]
        for up in range(3):
            base = "/".join(parts[: len(parts) - up]) if up <= len(parts) else None
            if base is None:
                break
            prefix = f"{base}/" if base else ""
            if storage.exists(f"{prefix}config.json") and storage.exists(f"{prefix}config.yaml"):
                sub = directory / f"cfg{up}"
                cj = storage.download_file(f"{prefix}config.json", sub / "config.json")
                cy = storage.download_file(f"{prefix}config.yaml", sub / "config.yaml")
                return json.loads(Path(cj).read_text()), yaml.safe_load(Path(cy).read_text()) or {}
    else:
        for folder in (local.parent, local.parent.parent, local.parent.parent.parent):
            if (folder / "config.json").is_file() and (folder / "config.yaml").is_file():
                return (json.loads((folder / "config.json").read_text()),
                        yaml.safe_load((folder / "config.yaml").read_text()) or {})
    raise FileNotFoundError(f"no config.json + config.yaml beside {ref} or in the two folders above it "
                            "(the released files ship them next to the checkpoints folder)")


def read_state(path: Path, weights: str | None = None) -> dict:
    """A state dict from a .safetensors file, or from a torch checkpoint read with weights_only=True
    (a plain state dict, or {"model": ..., "ema": ...} where `weights` picks one)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as exc:
        raise WeightsFormatError(
            f"{path}: not a plain torch checkpoint of tensors (refused by torch.load(weights_only=True); "
            f"arbitrary pickles are never executed): {str(exc).splitlines()[0][:300]}") from None
    if not isinstance(obj, dict):
        raise WeightsFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if weights is None or weights not in obj:
        have = sorted(k for k, v in obj.items() if isinstance(v, dict))
        raise WeightsFormatError(f"{path}: no {weights!r} state dict in the checkpoint (it has {have}); "
                                 f"choose one of {list(WEIGHT_CHOICES)}")
    state = obj[weights]
    if not isinstance(state, dict):
        raise WeightsFormatError(f"{path}: {weights!r} is a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsFormatError(f"{path}: {weights!r} is not a state dict of tensors (e.g. {bad[:3]})")
    return state


def check_fits(module: torch.nn.Module, state: dict, what: str) -> None:
    """Every parameter/buffer of module filled, nothing extra, shapes equal; else name them."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        raise WeightsFormatError(f"{what}: converted weights do not fit the module: missing={missing[:10]} "
                                 f"extra={extra[:10]} shape mismatches={shapes[:10]}")
    module.load_state_dict(state, strict=True)


def _upload(storage, module, config: dict, key: str) -> dict:
    from detailflow.models.export import WEIGHTS_NAME
    from detailflow.platform.checkpoints import uploaded_export
    from detailflow.platform.storage import sha256_file

    with uploaded_export(storage, module, config, key) as d:
        sha = sha256_file(Path(d) / WEIGHTS_NAME)
    return {"uri": storage.uri(key), "sha256": sha}


def _source(ref: str, path: Path, weights: str) -> dict:
    from detailflow.platform.storage import sha256_file

    return {"released": ref, "sha256": sha256_file(path), "weights": weights}


@dataclasses.dataclass
class Released:
    """A converted released pair, ready to export."""

    tokenizer: torch.nn.Module  # DetailFlowTokenizer (eval), released weights loaded
    tokenizer_cfg: object  # its TokenizerConfig
    ar: torch.nn.Module  # DetailFlowGPT (eval), released weights loaded
    ar_cfg: object  # its ARConfig
    sources: dict  # "tokenizer"/"ar" -> {released, sha256, weights}
    notes: list  # what was dropped or rebuilt, for the user


def load_released(storage, tokenizer: str, generator: str, generator_weights: str = "ema",
                  tokenizer_weights: str = "model", heads: dict | None = None) -> Released:
    """Read, check and convert a released tokenizer + GPT pair into this project's modules."""
    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.convert_released import (
        ar_config_from_release,
        convert_ar,
        convert_tokenizer,
        tokenizer_config_from_release,
    )
    from detailflow.models.tokenizer import DetailFlowTokenizer

    for w in (generator_weights, tokenizer_weights):
        if w not in WEIGHT_CHOICES:
            raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {w!r}")
    with tempfile.TemporaryDirectory(prefix="df-release-") as tmp:
        d = Path(tmp)
        tok_path, ar_path = _fetch(storage, tokenizer, d / "tok"), _fetch(storage, generator, d / "ar")
        tok_state = read_state(tok_path, tokenizer_weights)
        tok_cfg, notes = tokenizer_config_from_release(*_configs(storage, tokenizer, tok_path, d / "tok"),
                                                       tok_state, heads)
        tok = DetailFlowTokenizer(tok_cfg).eval()
        check_fits(tok, convert_tokenizer(tok_state, tok_cfg), f"tokenizer {tokenizer}")
        ar_state = read_state(ar_path, generator_weights)
        ar_cfg, ar_notes = ar_config_from_release(*_configs(storage, generator, ar_path, d / "ar"), ar_state)
        for field, a, t in (("vocab_size/codebook_size", ar_cfg.vocab_size, tok_cfg.codebook_size),
                            ("block_size/num_latent_tokens", ar_cfg.num_tokens, tok_cfg.num_tokens),
                            ("group_size", ar_cfg.group_size, tok_cfg.group_size),
                            ("causal_num", ar_cfg.causal_num, tok_cfg.causal_num)):
            if a != t:
                raise ValueError(f"generator and tokenizer do not belong together: {field} {a} vs {t}")
        ar = DetailFlowGPT(ar_cfg).eval()
        check_fits(ar, convert_ar(ar_state, ar_cfg), f"generator {generator}")
        sources = {"tokenizer": _source(tokenizer, tok_path, tokenizer_weights),
                   "ar": _source(generator, ar_path, generator_weights)}
    return Released(tok, tok_cfg, ar, ar_cfg, sources, notes + ar_notes)


def import_detailflow(storage, tokenizer: str, generator: str, name: str, generator_weights: str = "ema",
                      tokenizer_weights: str = "model", heads: dict | None = None) -> dict:
    """Convert a released tokenizer + GPT pair and write both as platform exports under runs/<name>-*/export.
    Returns {"tokenizer": {uri, sha256}, "ar": {uri, sha256}, "notes": [...]}."""
    from detailflow.pipelines.train.exports import export_prefix

    rel = load_released(storage, tokenizer, generator, generator_weights, tokenizer_weights, heads)
    tok_run, ar_run = f"{name}-tokenizer", f"{name}-ar"
    tok_out = _upload(storage, rel.tokenizer, {"kind": "tokenizer", "model": name, "run_name": tok_run,
                                               "tokenizer": dataclasses.asdict(rel.tokenizer_cfg),
                                               "source": rel.sources["tokenizer"]}, export_prefix(tok_run))
    ar_out = _upload(storage, rel.ar, {"kind": "ar", "model": name, "run_name": ar_run,
                                       "weights": "ema" if generator_weights == "ema" else "raw",
                                       "tokenizer": tok_out["uri"], "ar": dataclasses.asdict(rel.ar_cfg),
                                       "source": rel.sources["ar"]}, export_prefix(ar_run))
    return {"tokenizer": tok_out, "ar": ar_out, "notes": rel.notes}


def convert_siglip2_file(src: str, dst: str, tok_cfg, storage=None, seed: int = 0) -> dict:
    """A SigLIP2 vision tower file (safetensors / torch state dict) -> the encoder init file for tok_cfg
    (safetensors, at a local path or an s3:// URI). Returns {"path", "sha256", "keys"}."""
    from safetensors.torch import save_file

    from detailflow.models.convert_siglip2 import siglip2_to_encoder_init
    from detailflow.models.tokenizer import Encoder
    from detailflow.platform.storage import sha256_file

    with tempfile.TemporaryDirectory(prefix="df-siglip2-") as tmp:
        state = read_state(_fetch(storage, src, Path(tmp)))
        init = siglip2_to_encoder_init(state, tok_cfg.enc_depth, tok_cfg.num_tokens, tok_cfg.grid_size, seed)
        check_fits(Encoder(tok_cfg), init, f"encoder init from {src}")
        out = Path(tmp) / "encoder_init.safetensors" if dst.startswith("s3://") else Path(dst)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(init, str(out), metadata={"format": "pt", "source": "siglip2"})
        sha = sha256_file(out)
        if dst.startswith("s3://"):
            bucket, _, key = dst[5:].partition("/")
            if storage is None or bucket != storage.bucket:
                raise ValueError(f"{dst}: not in the configured bucket")
            storage.upload_file(out, key)
    return {"path": dst, "sha256": sha, "keys": len(init)}
