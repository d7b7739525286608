"""Registered smoke models for the serving tests (imported by tests/test_serving*.py, test_playground.py).

    version = register_smoke(services, storage, name, seed=1, champion=True)

The random-init smoke tokenizer + AR(seed) pair (platform.serving.testing.smoke_modules) is exported
to S3 where the training stages write theirs and registered through pipelines.registry.register, the
registry's own path, so the Generator loads it exactly as it loads trained models.
"""

from __future__ import annotations

import dataclasses

from registry_models import upload_export

from detailflow.platform.serving.testing import promote_now, smoke_modules


def register_smoke(settings, storage, name: str, seed: int, champion: bool = False) -> str:
    """Upload a smoke tokenizer + AR(seed) export pair, register `<name>-generator`; returns the version."""
    from detailflow.pipelines.registry.register import register

    mc, tok, ar = smoke_modules(seed)
    prefix = f"tests/serving/{name}"
    tok_config = {"kind": "tokenizer", "model": "smoke", "run_name": f"tok-{name}",
                  "tokenizer": dataclasses.asdict(mc.tokenizer)}
    tok_uri = upload_export(storage, tok, tok_config, f"{prefix}/tok/export")
    ar_uri = upload_export(storage, ar, {"kind": "ar", "model": "smoke", "run_name": f"ar-{name}-{seed}",
                                         "tokenizer": tok_uri, "ar": dataclasses.asdict(mc.ar)},
                           f"{prefix}/ar-{seed}/export")
    version = register(settings, name, ar=ar_uri, tokenizer=tok_uri)["generator_version"]
    if champion:
        promote_now(settings, name, version)
    return version
