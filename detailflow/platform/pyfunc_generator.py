"""MLflow "models from code" file of the registered `<name>-generator`: tokenizer + AR in one pyfunc.

MLflow stores THIS FILE with the model and executes it at load time (no pickle). The model's
artefacts are the two consolidated exports, "tokenizer" and "ar", each `config.json` +
`model.safetensors.link.json`: the weights stay on S3 (tracking_links.py) and are read from there
at load time (build_tokenizer / build_ar, also used by serving's model_store; S3 as the
settings name it). `detailflow.models` travels with the model as code (code_paths), so a fresh
Python process with torch, safetensors, einops, numpy, mlflow and the detailflow package loads it:

    import mlflow, numpy as np
    gen = mlflow.pyfunc.load_model("models:/smoke-generator@champion")
    imgs = gen.predict(np.array([0, 1, 2], dtype=np.int64),
                       params={"seed": 0, "cfg_scale": 1.5, "num_tokens": 0})
    imgs.shape, imgs.dtype     # (3, 3, R, R) uint8 in [0, 255]; num_tokens=t < N gives the coarse
                               # image of the first t tokens at its canvas c(t) (sampling stops at t)

Params: seed (one torch.Generator per call: the same input and params give the same images),
cfg_scale (>= 1; 1 = no guidance), num_tokens (0 = all N; otherwise an admissible prefix t),
temperature, top_k, top_p (the sampler's). Device: `model_config={"device": "cuda"}` at load
time; default cuda when available, else cpu. registry.py logs this file (log_generator).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

# The inference tokenizer (training-only fields and entries off): one loader, shared with the export.
from detailflow.platform.checkpoints import load_inference_tokenizer
from detailflow.platform.tracking_links import resolve_links


def build_tokenizer(directory):
    """DetailFlowTokenizer (eval mode) for decoding, from an export folder: the inference tokenizer
    (training-only fields off, their entries dropped; checkpoints.load_inference_tokenizer), strict on
    everything else."""
    from detailflow.models.export import read_config

    config = read_config(resolve_links(directory))
    if config.get("kind") != "tokenizer":
        raise ValueError(f"{directory}: expected a tokenizer export, got kind {config.get('kind')!r}")
    return load_inference_tokenizer(directory, config).eval(), config


def build_ar(directory):
    """DetailFlowGPT (eval mode) from an AR export folder (strict load)."""
    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import ARConfig
    from detailflow.models.export import load_state_checked, read_config

    config = read_config(resolve_links(directory))
    if config.get("kind") != "ar":
        raise ValueError(f"{directory}: expected an AR export, got kind {config.get('kind')!r}")
    model = DetailFlowGPT(ARConfig(**config["ar"]))
    load_state_checked(model, directory)
    return model.eval(), config


def check_pair(tok_cfg: dict, ar_cfg: dict) -> None:
    """The AR model must speak the tokenizer's codes: same N, group geometry and vocabulary."""
    pairs = [("num_tokens", "num_tokens"), ("group_size", "group_size"), ("causal_num", "causal_num"),
             ("codebook_size", "vocab_size")]
    bad = [f"tokenizer {a}={tok_cfg[a]} vs AR {b}={ar_cfg[b]}" for a, b in pairs if tok_cfg[a] != ar_cfg[b]]
    if bad:
        raise ValueError("tokenizer and AR model do not fit: " + "; ".join(bad))


class _Enough(Exception):
    """Raised from the sampler's per-pass hook once the requested prefix exists."""


class GeneratorModel(PythonModel):
    """Class ids (B,) int64 -> uint8 images B x 3 x c(t) x c(t) (t = num_tokens, default all N = R)."""

    def load_context(self, context):
        import torch

        device = (context.model_config or {}).get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer, self.tok_config = build_tokenizer(context.artifacts["tokenizer"])
        self.ar, self.ar_config = build_ar(context.artifacts["ar"])
        check_pair(self.tok_config["tokenizer"], self.ar_config["ar"])
        self.tokenizer.to(self.device)
        self.ar.to(self.device)

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        from detailflow.models.generator import to_uint8
        from detailflow.models.sampler import sample

        if isinstance(model_input, dict):
            model_input = model_input["class_ids"]
        if hasattr(model_input, "to_numpy"):  # a pandas DataFrame / Series
            model_input = model_input.to_numpy()
        class_ids = torch.as_tensor(np.asarray(model_input).reshape(-1).astype(np.int64))
        p = params or {}
        n = self.ar.cfg.num_tokens
        t = int(p.get("num_tokens") or n)
        self.tokenizer.rmap.check_admissible(t)  # fail before sampling anything
        gen = torch.Generator().manual_seed(int(p.get("seed", 0)))
        kept = {}

        def stop_at_t(start, stop, codes_Bt):
            if stop >= t:
                kept["codes"] = codes_Bt[:, :t].clone()
                raise _Enough

        with torch.no_grad():
            try:
                codes = sample(self.ar, class_ids.to(self.device), cfg_scale=float(p.get("cfg_scale", 1.5)),
                               temperature=float(p.get("temperature", 1.0)), top_k=int(p.get("top_k", 0)),
                               top_p=float(p.get("top_p", 1.0)), generator=gen,
                               on_pass=stop_at_t if t < n else None)
            except _Enough:
                codes = kept["codes"]
            images = to_uint8(self.tokenizer.decode(codes, t))
        return images.cpu().numpy()


mlflow.models.set_model(GeneratorModel())
