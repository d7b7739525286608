"""The served model: resolve `<name>-generator@alias` in MLflow, download that version, build its modules.

    version = resolve_version(tracking_uri, "smoke-generator", "champion")        # "3"
    served = load_served_model(tracking_uri, "smoke-generator", "3", device="cpu")
    served.info()                       # what GET /v1/models shows
    served.check(class_ids=[3], tokens=8)   # [] or [("tokens", "must be one of [...]")]

The Generator does not call the pyfunc per request: it downloads the registered version's artefacts once
(the tokenizer and AR exports the pyfunc bundles, each model.safetensors + config.json) and builds the
modules with the pyfunc's own builders, so what is served is exactly what is registered.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ModelNotFound(RuntimeError):
    """The registered model, alias or version does not exist (yet)."""


def resolve_version(tracking_uri: str, registered_model: str, alias: str) -> str:
    """The version `alias` points at (read from the registered model itself, never from search)."""
    from mlflow.exceptions import MlflowException

    from detailflow.platform.registry import Registry

    try:
        version = Registry(tracking_uri).alias(registered_model, alias)
    except MlflowException as exc:
        raise ModelNotFound(f"registered model {registered_model} not found at {tracking_uri}: "
                            f"{exc}") from exc
    if version is None:
        raise ModelNotFound(f"{registered_model} has no alias {alias!r}; promote a version first "
                            "(detailflow registry promote)")
    return version


def _artifact_dirs(model_dir: Path) -> dict[str, Path]:
    """{"tokenizer": dir, "ar": dir} from the downloaded pyfunc's MLmodel."""
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    arts = (mlmodel.get("flavors", {}).get("python_function", {}) or {}).get("artifacts", {}) or {}
    out = {}
    for key in ("tokenizer", "ar"):
        if key not in arts:
            raise ModelNotFound(f"{model_dir}: the pyfunc has no {key!r} artefact "
                                "(not a detailflow generator)")
        out[key] = model_dir / arts[key]["path"]
    return out


@dataclass
class ServedModel:
    registered_model: str  # e.g. smoke-generator
    version: str  # registered version number
    tokenizer: object  # DetailFlowTokenizer (eval, on device)
    ar: object  # DetailFlowGPT (eval, on device)
    device: str  # torch device string
    tok_config: dict = field(repr=False)  # the tokenizer export's config.json
    ar_config: dict = field(repr=False)  # the AR export's config.json
    load_s: float = 0.0  # seconds to download + build
    loaded_at: float = field(default_factory=time.time)  # unix time

    @property
    def num_tokens(self) -> int:
        return self.ar.cfg.num_tokens

    @property
    def admissible(self) -> list[int]:
        return list(self.tokenizer.rmap.admissible)

    def info(self) -> dict:
        rmap, cfg = self.tokenizer.rmap, self.ar.cfg
        return {"model": self.registered_model, "version": self.version, "device": self.device,
                "num_classes": cfg.num_classes, "num_tokens": cfg.num_tokens, "group_size": cfg.group_size,
                "causal_num": cfg.causal_num, "image_size": rmap.image_size,
                "forward_passes": cfg.forward_passes,
                "tokens": [{"tokens": t, "content": r, "canvas": c} for t, r, c in rmap.table()],
                "family": self.ar_config.get("model", ""), "loaded_at": self.loaded_at,
                "load_s": round(self.load_s, 3)}

    def check(self, class_ids: list[int], tokens: int) -> list[tuple[str, str]]:
        """Model-dependent request rules: [(field, rule)] that fail (empty = fine)."""
        errors = []
        n_cls = self.ar.cfg.num_classes
        bad = [c for c in class_ids if not 0 <= c < n_cls]
        if bad:
            errors.append(("class_ids", f"each class id must be in [0, {n_cls - 1}] for "
                                        f"{self.registered_model} v{self.version} (got {bad[:5]})"))
        if tokens and tokens not in self.tokenizer.rmap.admissible:
            errors.append(("tokens", f"must be 0 (all {self.num_tokens}) or one of {self.admissible} "
                                     f"(got {tokens})"))
        return errors


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_served_model(tracking_uri: str, registered_model: str, version: str, *, device: str = "auto",
                      ar_dtype: str = "float32") -> ServedModel:
    """Download version `version` of `registered_model` and build its tokenizer and AR modules."""
    import mlflow
    import torch
    from mlflow.exceptions import MlflowException

    from detailflow.platform.pyfunc_generator import build_ar, build_tokenizer, check_pair

    t0 = time.perf_counter()
    device = pick_device(device)
    with tempfile.TemporaryDirectory(prefix="df-serve-model-") as d:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{registered_model}/{version}",
                                                        dst_path=d, tracking_uri=tracking_uri)
        except MlflowException as exc:
            raise ModelNotFound(f"cannot download {registered_model} version {version}: {exc}") from exc
        dirs = _artifact_dirs(Path(local))
        tokenizer, tok_config = build_tokenizer(dirs["tokenizer"])
        ar, ar_config = build_ar(dirs["ar"])
    check_pair(tok_config["tokenizer"], ar_config["ar"])
    tokenizer.to(device).eval()
    ar.to(device=device, dtype=getattr(torch, ar_dtype)).eval()
    return ServedModel(registered_model, str(version), tokenizer, ar, device, tok_config, ar_config,
                       load_s=time.perf_counter() - t0)
