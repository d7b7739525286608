"""Real models and a real (cheap) evaluation for the registry tests (imported by tests/test_registry*.py).

Models: one random-init smoke tokenizer and three smoke AR models trained, in-process with plain
torch, for 0 / 60 / 300 steps to emit one fixed code sequence per class ("targets"). So the models
differ measurably: the more trained, the closer its samples are to the class's reference image
(the tokenizer's decoding of the targets). Exports are written with save_pretrained to S3 exactly
where and how the training stages write theirs; the tokenizer's training run is an MLflow run with
the export logged on it by tracking.Tracker.log_export (what the tokenizer stage does).

Evaluation (PixelEval): loads the registered version with mlflow.pyfunc, samples a class-balanced
set with the spec's seed and CFG scale, and reports `pixel_rmse` (0-255 units) against each
class's reference image, through the evaluation module's completion protocol (EvalRun).
`expected_rmse` computes the same number directly from the torch models, without MLflow.
"""

from __future__ import annotations

import dataclasses
import tempfile
import types
import uuid

import numpy as np
import torch

AR_STEPS = {"worst": 0, "mid": 60, "best": 300}
EVAL_EXPERIMENT = "test-registry-eval"


def upload_export(storage, module, config: dict, key: str) -> str:
    from detailflow.platform.checkpoints import uploaded_export

    with uploaded_export(storage, module, config, key):
        pass
    return storage.uri(key)


def train_ar(ar_cfg, targets_CN: torch.Tensor, steps: int, seed: int):
    from detailflow.models.ar import DetailFlowGPT

    torch.manual_seed(seed)
    model = DetailFlowGPT(ar_cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    classes = torch.arange(targets_CN.shape[0]).repeat(4)
    model.train()
    for _ in range(steps):
        loss = model.loss(targets_CN[classes], targets_CN[classes], classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


_BUILT: dict = {}


def build_models(services, storage, prefix: str):
    """Upload the smoke tokenizer (with its MLflow training run) and the three AR exports; built once
    per pytest process and services stack (both registry test modules share them)."""
    key = (services.s3_endpoint_url, services.mlflow_tracking_uri)
    if key not in _BUILT:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors on a shared 2-core box: one thread is much faster
        try:
            _BUILT[key] = _build(services, storage, prefix)
        finally:
            torch.set_num_threads(threads)
    return _BUILT[key]


def _build(services, storage, prefix: str):
    from detailflow.models.configs import get_model_config
    from detailflow.models.export import save_pretrained
    from detailflow.models.generator import codes_to_uint8
    from detailflow.models.tokenizer import DetailFlowTokenizer
    from detailflow.platform.tracking import Tracker

    mc = get_model_config("smoke")
    torch.manual_seed(0)
    tok = DetailFlowTokenizer(mc.tokenizer).eval()
    targets = torch.randint(0, mc.ar.vocab_size, (mc.ar.num_classes, mc.ar.num_tokens),
                            generator=torch.Generator().manual_seed(1))
    references = codes_to_uint8(tok, targets)
    tok_run_name = f"tokenizer-smoke-{prefix.replace('/', '-')}"
    tok_config = {"kind": "tokenizer", "model": "smoke", "run_name": tok_run_name,
                  "tokenizer": dataclasses.asdict(mc.tokenizer)}
    tok_uri = upload_export(storage, tok, tok_config, f"{prefix}/tok/export")
    tracker = Tracker.start(services.mlflow_tracking_uri, experiment="test-registry-train",
                            run_name=tok_run_name)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(tok, tok_config, d)
        tok_model_id = tracker.log_export(d, tok_config, uri=tok_uri)
    tracker.finish()
    ars, ar_uris = {}, {}
    for i, (label, steps) in enumerate(AR_STEPS.items()):
        ars[label] = train_ar(mc.ar, targets, steps, seed=10 + i)
        config = {"kind": "ar", "model": "smoke", "run_name": f"ar-{label}-{uuid.uuid4().hex[:6]}",
                  "tokenizer": tok_uri, "ar": dataclasses.asdict(mc.ar)}
        ar_uris[label] = upload_export(storage, ars[label], config, f"{prefix}/ar-{label}/export")
    return types.SimpleNamespace(mc=mc, tokenizer=tok, targets=targets, references=references,
                                 tok_uri=tok_uri, tok_run_id=tracker.run_id, tok_model_id=tok_model_id,
                                 ars=ars, ar_uris=ar_uris)


def eval_classes(samples: int, num_classes: int) -> np.ndarray:
    return (np.arange(samples) % num_classes).astype(np.int64)  # class-balanced, fixed order


def rmse(images_uint8: np.ndarray, classes: np.ndarray, references_uint8: np.ndarray) -> float:
    diff = images_uint8.astype(np.float64) - references_uint8[classes].astype(np.float64)
    return float(np.sqrt(np.mean(diff ** 2)))


def expected_images(models, label: str, classes: np.ndarray, seed: int, cfg_scale: float) -> np.ndarray:
    """What the generator pyfunc must return, computed from the torch modules directly."""
    from detailflow.models.generator import codes_to_uint8
    from detailflow.models.sampler import sample

    codes = sample(models.ars[label], torch.as_tensor(classes), cfg_scale=cfg_scale,
                   generator=torch.Generator().manual_seed(seed))
    return codes_to_uint8(models.tokenizer, codes).numpy()


def expected_rmse(models, label: str, spec: dict) -> float:
    classes = eval_classes(spec["samples"], models.mc.ar.num_classes)
    images = expected_images(models, label, classes, spec["seed"], spec["cfg_scale"])
    return rmse(images, classes, models.references.numpy())


class PixelEval:
    """Evaluator for pipelines.registry.promote: see the module docstring. fail_halfway raises after the
    first half is scored (the run ends FAILED, partial metric logged); leave_partial returns the id
    of a run that never completed. `calls` records (version, run_id) per call."""

    def __init__(self, settings, models, *, fail_halfway=False, leave_partial=False, after_eval=None):
        self.settings, self.models = settings, models
        self.fail_halfway, self.leave_partial, self.after_eval = fail_halfway, leave_partial, after_eval
        self.calls: list[tuple[str, str]] = []

    def __call__(self, request) -> dict:
        from detailflow.pipelines.evaluate.tracking import EvalRun
        from detailflow.platform.registry import load_generator

        spec = request.spec
        classes = eval_classes(spec["samples"], self.models.mc.ar.num_classes)
        refs = self.models.references.numpy()
        ev = EvalRun.start(self.settings, kind="generator", subject=request.ar_export,
                           experiment=EVAL_EXPERIMENT, params={"model_uri": request.model_uri, **spec})
        self.calls.append((request.version, ev.run_id))
        if self.leave_partial:  # metrics logged, never completed: RUNNING with eval.complete=false
            ev.log_metrics({"pixel_rmse": 0.0})
            return {"mlflow_run_id": ev.run_id, "pixel_rmse": 0.0}
        with ev:
            model = load_generator(request.model_uri)  # threads: MLflow's loader is not thread-safe
            images = model.predict(classes, params={"seed": spec["seed"], "cfg_scale": spec["cfg_scale"]})
            half = len(classes) // 2
            ev.log_metrics({"pixel_rmse_first_half": rmse(images[:half], classes[:half], refs)})
            if self.fail_halfway:
                raise RuntimeError("evaluation killed halfway")
            value = rmse(images, classes, refs)
            ev.log_metrics({"pixel_rmse": value})
            ev.complete({"pixel_rmse": value, "samples": len(classes)})
        if self.after_eval is not None:
            self.after_eval(request)
        return {"mlflow_run_id": ev.run_id, "pixel_rmse": value}


def promote_config(name: str, **kw):
    """A PromoteConfig gated on PixelEval's pixel_rmse (lower is better, no margin, 20 samples); kw
    override any field."""
    from detailflow.pipelines.registry.promote import PromoteConfig

    base = dict(name=name, metric="pixel_rmse", higher_is_better=False, margin=0.0, eval_samples=20,
                eval_seed=0, eval_cfg_scale=1.5, evaluator="registry_models:PixelEval")
    return PromoteConfig(**{**base, **kw})


def register_version(services, name: str, models, label: str) -> str:
    """Register the `label` AR model (with its tokenizer) as a new `<name>-generator` version."""
    from detailflow.pipelines.registry.register import register

    return register(services, name, models.ar_uris[label])["generator_version"]
