"""Find and load the consolidated exports (model.safetensors + config.json) that training writes.

    key = export_prefix("tokenizer-tiny-2026-11-28-1a2b3c4d")        # runs/<run>/export
    tok, cfg = load_tokenizer(storage, "tokenizer-tiny-...")           # or "s3://bucket/runs/.../export"
    ar, cfg, uri = load_ar(storage, "ar-tiny-...")

runs/<run>/export is the export's ADDRESS (stage outputs, run tags and export configs name it; codes
are versioned by its run name); its bytes are stored once under exports/<digest>/ and the address
holds a pointer to them (platform/export_store.py). Every read here goes through that pointer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from detailflow.models.export import CONFIG_NAME, WEIGHTS_NAME, load_state_checked, read_config
from detailflow.platform.export_store import download_export_files, export_content, read_export_file


def export_prefix(run_name: str) -> str:
    return f"runs/{run_name}/export"


def resolve_export(storage, ref: str) -> tuple[str, str]:
    """RUN_NAME | s3://bucket/key | key -> (key prefix, version name used for codes)."""
    if ref.startswith("s3://"):
        bucket, _, key = ref[5:].partition("/")
        if bucket != storage.bucket:
            raise ValueError(f"export {ref} is not in the configured bucket {storage.bucket!r}")
        key = key.rstrip("/")
    elif "/" in ref:
        key = ref.rstrip("/")
    else:
        key = export_prefix(ref)
    if export_content(storage, key) is None:
        raise FileNotFoundError(f"no export at {storage.uri(key)} (no pointer to its weights, no "
                                f"{WEIGHTS_NAME}); train the stage first (its export is written when "
                                "training finishes)")
    parts = key.split("/")
    version = parts[-2] if parts[-1] == "export" and len(parts) >= 2 else parts[-1]
    return key, version


def download_export(storage, key: str, directory) -> Path:
    """The export at address `key` (resolve_export) as a local folder, files sha256-checked."""
    return download_export_files(storage, key, directory, (WEIGHTS_NAME, CONFIG_NAME))


def export_config(storage, key: str) -> dict:
    """An export's config.json (no weights read)."""
    import json

    return json.loads(read_export_file(storage, key, CONFIG_NAME))


def load_export(storage, ref: str, kind: str, load, device="cpu"):
    """(module in eval mode, export config, export URI): download the export of a run name or URI,
    refuse one of another kind, load(directory, config) the module."""
    key, _ = resolve_export(storage, ref)
    with tempfile.TemporaryDirectory(prefix=f"df-{kind}-") as d:
        download_export(storage, key, d)
        model, config = load_export_dir(d, kind, load, where=storage.uri(key))
    return model.to(device).eval(), config, storage.uri(key)


def load_export_dir(directory, kind: str, load, where: str | None = None):
    """(module, config) from a local export folder; refuses an export of another kind."""
    config = read_config(directory)
    if config.get("kind") != kind:
        raise ValueError(f"{where or directory} holds a {config.get('kind')!r} export, not a {kind} export")
    return load(directory, config), config


def _checked(build):
    def load(directory, config):
        model = build(config)
        load_state_checked(model, directory)
        return model
    return load


def load_tokenizer(storage, ref: str, device="cpu"):
    """(DetailFlowTokenizer in eval mode, export config) from a tokenizer run name or URI: the
    INFERENCE tokenizer (platform.checkpoints.load_inference_tokenizer) - no teacher, perceptual or
    discriminator network and no encoder init is built or read, whatever the training config named."""
    from detailflow.platform.checkpoints import load_inference_tokenizer

    model, config, _ = load_export(storage, ref, "tokenizer", load_inference_tokenizer, device)
    return model, config


def load_ar(storage, ref: str, device="cpu"):
    """(DetailFlowGPT in eval mode, export config, export URI) from an AR run name or s3:// URI."""
    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import ARConfig

    return load_export(storage, ref, "ar", _checked(lambda c: DetailFlowGPT(ARConfig(**c["ar"]))), device)
