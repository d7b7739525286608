"""The promote stage: register -> alias `challenger` -> evaluate -> gate -> move `champion` -> record.

    detailflow registry promote --config configs/promote-smoke.yaml ar=<AR run | s3://.../export>
    detailflow registry promote --config configs/promote-tiny.yaml version=4 margin=0.5
    python -m detailflow.pipelines.registry.promote --config configs/promote-smoke.yaml ar=...   # same thing

    from detailflow.pipelines.registry.promote import PromoteConfig, promote
    decision = promote(PromoteConfig(name="smoke", ar="ar-smoke-..."), settings)   # evaluator injectable
    decision["decision"]        # "promoted" | "rejected" | "failed" | "already-champion"

Steps: (1) register the pair unless `version` is given (pipelines/registry/register.py); (2) point
`challenger` at the version; (3) evaluate it, and the champion too unless the champion already
has a complete evaluation with the same spec (dataset, split, seed, sample count, CFG, evaluator);
(4) the gate: pass when there is no champion yet, or the challenger's `metric` beats the champion's
by more than 0 and by at least `margin`; (5) under the registry lock, re-read `champion`: if it
moved since step 3 the gate runs again against the new champion, else the alias moves (pass) or
stays (fail), and (6) the decision is written as version tags `detailflow.promotion.*` (both
versions' metrics, the gate, the time, the evaluation run ids). Evaluations are recorded as tags
`detailflow.eval.<spec key>` on each version and reused by later promotions.

An evaluation counts only when its MLflow run is complete (evaluate/tracking.py: FINISHED, tag
eval.complete = "true", results.json; read back with read_complete). One that raises, ends
partial or lacks the metric is a "failed" decision: the champion stays where it was.

The evaluator is any callable (EvalRequest) -> {"mlflow_run_id": ..., ...}; the default runs
`detailflow eval generator` (pipelines/evaluate/generator_eval.py) on the registered version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
from collections.abc import Callable

from detailflow.platform.registry import (
    CHALLENGER,
    MAX_TAG_LEN,
    Registry,
    RegistryError,
    generator_name,
    now_iso,
    tag_json,
)

EVAL_TAG = "detailflow.eval."  # + spec key: JSON {status, run_id, metrics, spec, at[, error]}
DECISION_TAG = "detailflow.promotion."  # + decision, decided_at, reason, gate, ...
LAST_DECISION_TAG = "detailflow.promotion.last"  # on the registered model: the newest decision


@dataclasses.dataclass
class PromoteConfig:
    name: str = "smoke"  # registered base name: <name>-generator and <name>-tokenizer
    version: str = ""  # generator version to promote; empty = register `ar` (+ `tokenizer`) first
    ar: str = ""  # AR run name | run id | s3:// export, registered when `version` is empty
    tokenizer: str = ""  # tokenizer ref; empty = the tokenizer the AR export names
    metric: str = "fid"  # gate metric, read from the evaluation's results.json
    higher_is_better: bool = False  # fid / kid: lower is better; precision / recall / IS: higher
    margin: float = 0.0  # required improvement over the champion, in metric units (0 = any)
    eval_dataset: str = "shapes"  # evaluation reference set (a dataset name on S3)
    eval_split: str = "val"  # its split
    eval_seed: int = 0  # sampling seed: the champion is compared on the same samples
    eval_samples: int = 1000  # generated samples per evaluation
    eval_cfg_scale: float = 1.5  # classifier-free guidance scale while sampling
    eval_options: dict = dataclasses.field(default_factory=dict)  # extra evaluator fields (e.g. inception)
    evaluator: str = "detailflow.pipelines.registry.promote:default_evaluator"  # module:function
    max_regates: int = 3  # gate re-runs allowed when the champion moves during a promotion
    lock_wait_s: float = 120.0  # how long to wait for another promotion's decision to finish

    def spec(self) -> dict:
        """What makes two evaluations comparable; hashed into the version tag's key."""
        return {"dataset": self.eval_dataset, "split": self.eval_split, "seed": self.eval_seed,
                "samples": self.eval_samples, "cfg_scale": self.eval_cfg_scale,
                "options": self.eval_options, "evaluator": self.evaluator}

    def gate(self) -> dict:
        return {"metric": self.metric, "higher_is_better": self.higher_is_better, "margin": self.margin}


@dataclasses.dataclass
class EvalRequest:
    model: str  # registered model name, <name>-generator
    version: str  # its version number
    model_uri: str  # models:/<model>/<version> (loadable with mlflow.pyfunc.load_model)
    tokenizer_export: str  # s3:// export folder of the tokenizer part
    ar_export: str  # s3:// export folder of the AR part
    spec: dict  # PromoteConfig.spec()
    settings: object  # platform Settings


class EvaluationFailed(RuntimeError):
    """The evaluation raised, ended incomplete, or lacks the gate metric."""


def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def load_evaluator(path: str) -> Callable[[EvalRequest], dict]:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def default_evaluator(request: EvalRequest) -> dict:
    """`detailflow eval generator` on the version's exports (same seed/set/count for every version)."""
    from detailflow.pipelines.evaluate.generator_eval import GeneratorEvalConfig, evaluate_generator

    s = request.spec
    unknown = set(s["options"]) - {f.name for f in dataclasses.fields(GeneratorEvalConfig)}
    if unknown:
        raise ValueError(f"eval_options {sorted(unknown)} are not GeneratorEvalConfig fields")
    return evaluate_generator(GeneratorEvalConfig(
        ar=request.ar_export, tokenizer=request.tokenizer_export, dataset=s["dataset"], split=s["split"],
        seed=s["seed"], n=s["samples"], cfg_scale=s["cfg_scale"], **s["options"]), request.settings)


def read_complete(client, run_id: str) -> dict | None:
    from detailflow.pipelines.evaluate.tracking import read_complete as read

    return read(client, run_id)


def scalar_metrics(results: dict) -> dict[str, float]:
    """The finite numeric top-level entries of an evaluation's results (what the gate can compare)."""
    return {k: float(v) for k, v in results.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}


def _fit_tag(record: dict, metric: str) -> dict:
    """Drop non-gate metrics until the JSON fits a tag value."""
    metrics = dict(record["metrics"])
    while len(tag_json({**record, "metrics": metrics})) > MAX_TAG_LEN and len(metrics) > 1:
        metrics.pop(next(k for k in sorted(metrics) if k != metric))
    return {**record, "metrics": metrics}


def evaluation(reg: Registry, model: str, version: str, cfg: PromoteConfig, settings,
               evaluator: Callable[[EvalRequest], dict]) -> dict:
    """{run_id, metrics} of a COMPLETE evaluation of `version` under cfg.spec(): reused from the
    version's tag when its run still reads complete, else run now. Raises EvaluationFailed (and
    tags the version with the failure) when the evaluation raises, is partial or lacks the metric."""
    spec, key = cfg.spec(), EVAL_TAG + spec_key(cfg.spec())
    tags = reg.version_tags(model, version)
    cached = json.loads(tags[key]) if key in tags else None
    if cached and cached.get("status") == "complete":
        results = read_complete(reg.client, cached["run_id"])
        if results is not None and cfg.metric in scalar_metrics(results):
            print(f"[promote] {model} v{version}: reusing evaluation {cached['run_id']}", flush=True)
            return {"run_id": cached["run_id"], "metrics": scalar_metrics(results)}
    request = EvalRequest(model, str(version), f"models:/{model}/{version}",
                          tags.get("detailflow.tokenizer.export_uri", ""),
                          tags.get("detailflow.ar.export_uri", ""), spec, settings)
    print(f"[promote] {model} v{version}: evaluating ({spec_key(spec)}: {json.dumps(spec)})", flush=True)
    record = {"spec": spec, "at": now_iso()}
    try:
        out = evaluator(request)
        run_id = (out or {}).get("mlflow_run_id")
        if not run_id:
            raise EvaluationFailed("the evaluator returned no mlflow_run_id")
        results = read_complete(reg.client, run_id)
        if results is None:
            raise EvaluationFailed(f"evaluation run {run_id} is not complete (no eval.complete=true "
                                   "+ results.json on a FINISHED run)")
        metrics = scalar_metrics(results)
        if cfg.metric not in metrics:
            raise EvaluationFailed(f"evaluation run {run_id} has no finite {cfg.metric!r} "
                                   f"(has {sorted(metrics)})")
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        reg.set_version_tags(model, version, {key: {**record, "status": "failed", "error": error[-2000:]}})
        raise EvaluationFailed(f"{model} v{version}: {error}") from exc
    reg.set_version_tags(model, version, {key: _fit_tag({**record, "status": "complete", "run_id": run_id,
                                                         "metrics": metrics}, cfg.metric)})
    return {"run_id": run_id, "metrics": metrics}


def apply_gate(gate: dict, challenger: dict[str, float], champion: dict[str, float] | None) -> dict:
    """{passed, reason, improvement}; see the module docstring for the rule."""
    metric = gate["metric"]
    if metric not in challenger or not math.isfinite(challenger[metric]):
        return {"passed": False, "reason": f"challenger has no finite {metric}", "improvement": None}
    if champion is None:
        return {"passed": True, "reason": "no champion yet", "improvement": None}
    if metric not in champion or not math.isfinite(champion[metric]):
        return {"passed": False, "reason": f"champion has no finite {metric}: cannot compare",
                "improvement": None}
    a, b = challenger[metric], champion[metric]
    improvement = a - b if gate["higher_is_better"] else b - a
    better = "higher" if gate["higher_is_better"] else "lower"
    passed = improvement > 0 and improvement >= gate["margin"]
    verb = "beats" if passed else "does not beat"
    return {"passed": passed, "improvement": improvement,
            "reason": f"{metric} {a:.6g} vs champion {b:.6g} ({better} is better): {verb} it by the "
                      f"margin {gate['margin']:g} (improvement {improvement:.6g})"}


def _record(reg: Registry, model: str, version: str, decision: dict) -> dict:
    tags = {DECISION_TAG + k: v for k, v in decision.items() if v is not None and k != "version"}
    reg.set_version_tags(model, version, tags)
    reg.client.set_registered_model_tag(model, LAST_DECISION_TAG, tag_json(
        {k: decision.get(k) for k in ("version", "decision", "decided_at", "champion_version", "reason")}))
    print(f"[promote] {model} v{version}: {decision['decision']}: {decision['reason']}", flush=True)
    return decision


def promote(cfg: PromoteConfig, settings, evaluator: Callable[[EvalRequest], dict] | None = None) -> dict:
    """Run the promotion (module docstring) and return the decision record."""
    reg = Registry(settings.mlflow_tracking_uri)
    model = generator_name(cfg.name)
    evaluator = evaluator or load_evaluator(cfg.evaluator)
    version = str(cfg.version)
    if not version:
        if not cfg.ar:
            raise ValueError("set version=<generator version> or ar=<AR run / export> to register first")
        from detailflow.pipelines.registry.register import register

        version = register(settings, cfg.name, cfg.ar, cfg.tokenizer or None)["generator_version"]
    reg.version(model, version)  # fails early on an unknown version
    reg.set_alias(model, CHALLENGER, version)
    base = {"version": version, "gate": cfg.gate(), "eval_spec": cfg.spec()}
    try:
        chal = evaluation(reg, model, version, cfg, settings, evaluator)
    except EvaluationFailed as exc:
        return _record(reg, model, version, {**base, "decision": "failed", "decided_at": now_iso(),
                                             "reason": str(exc)[-1000:],
                                             "champion_version": reg.champion(model)})
    for _ in range(cfg.max_regates + 1):
        champ_version = reg.champion(model)
        champ = None
        if champ_version not in (None, version):
            try:
                champ = evaluation(reg, model, champ_version, cfg, settings, evaluator)
            except EvaluationFailed as exc:
                return _record(reg, model, version, {
                    **base, "decision": "failed", "decided_at": now_iso(), "champion_version": champ_version,
                    "challenger_metrics": chal["metrics"], "eval_run_ids": {"challenger": chal["run_id"]},
                    "reason": f"the champion could not be evaluated: {exc}"[-1000:]})
        gate = apply_gate(cfg.gate(), chal["metrics"], champ["metrics"] if champ else None)
        with reg.lock(model, wait_s=cfg.lock_wait_s):
            if reg.champion(model) != champ_version:  # another decision moved it: gate again
                print(f"[promote] {model}: champion moved from v{champ_version} to v{reg.champion(model)} "
                      "during the evaluation; re-running the gate", flush=True)
                continue
            if champ_version == version:
                outcome, reason = "already-champion", f"v{version} is the champion already"
            elif gate["passed"]:
                outcome, reason = "promoted", gate["reason"]
                reg.move_champion(model, version, by="promote", reason=reason)
                reg.delete_alias_if(model, CHALLENGER, version)
            else:
                outcome, reason = "rejected", gate["reason"]
            return _record(reg, model, version, {
                **base, "decision": outcome, "decided_at": now_iso(), "reason": reason,
                "champion_version": champ_version, "improvement": gate["improvement"],
                "challenger_metrics": chal["metrics"],
                "champion_metrics": champ["metrics"] if champ else None,
                "eval_run_ids": {"challenger": chal["run_id"],
                                 **({"champion": champ["run_id"]} if champ else {})}})
    raise RegistryError(f"{model}: the champion kept moving during {cfg.max_regates + 1} gate runs; "
                        f"v{version} was not promoted (run promote again)")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from detailflow.pipelines.train.stage_config import load_stage_config
    from detailflow.platform.runtime import apply_runtime_env
    from detailflow.platform.settings import load_settings

    apply_runtime_env()
    p = argparse.ArgumentParser(description="Promote a generator version through the evaluation gate.")
    p.add_argument("--config", help="configs/promote-*.yaml")
    p.add_argument("overrides", nargs="*", help="key=value PromoteConfig fields")
    args = p.parse_args(argv)
    decision = promote(load_stage_config(PromoteConfig, args.config, args.overrides), load_settings())
    print(json.dumps(decision, indent=2, default=str))
    return exit_code(decision)


def exit_code(decision: dict) -> int:
    """0 promoted / already champion, 3 rejected by the gate, 1 failed (evaluation broken)."""
    return {"promoted": 0, "already-champion": 0, "rejected": 3}.get(decision["decision"], 1)


if __name__ == "__main__":
    raise SystemExit(main())
