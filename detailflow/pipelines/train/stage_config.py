"""Stage configs: typed dataclasses loaded from configs/*.yaml with CLI `key=value` overrides.

Usage:
    cfg = load_stage_config(TokenizerStageConfig, "configs/tokenizer-tiny.yaml", ["steps=50", "lr=1e-4"])
    cfg = load_stage_config(TokenizerStageConfig, "configs/tokenizer-detailflow-16.yaml",   # dotted key:
                            ["model_overrides.align_teacher_path=s3://bucket/weights/siglip2.pt2", ...])
    resolved = dataclasses.asdict(cfg)
    name = run_name("tokenizer", cfg.name, cfg.date, resolved)   # tokenizer-tiny-1a2b3c4d5e6f

The run name is deterministic: the same content (code, config, dataset version, world size and global
batch; see run_name) gives the same name on any day, which is what makes a resubmitted job find its
own checkpoints and MLflow run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path

import yaml


@dataclasses.dataclass
class DistributedStageConfig:
    """Fields every training stage shares: batch and ZeRO layout, devices, workers, fault tolerance."""

    micro_batch: int = 32  # samples per worker per step
    grad_accum: int = 1  # gradient accumulation steps
    grad_clip: float = 1.0  # gradient-norm clipping
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0..3
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 2  # Ray Train workers (0 = in-process)
    cpus_per_worker: float = 0.5  # fractional CPUs so Ray Data is never starved (pitfall 3)
    reader_cpus: float = 0.0  # CPUs of the rank's reader tasks (decode + crop, or code reads), reserved
    # in the rank's own placement-group bundle on its node (raytrain.worker_resources/reader_task_options):
    # a bundle asks cpus_per_worker + reader_cpus, and a GPU node's ranks must fit its pod's CPUs
    seed: int = 42  # model init / data / selection seed
    max_failures: int = 2  # worker-group restarts before the run fails
    num_to_keep: int = 2  # checkpoints kept in storage
    date: str | None = None  # optional label in a bare run's name (none: same content = same run)
    fail_at_step: int = -1  # fault injection for tests: rank 1 exits at this step on the first attempt
    fail_marker: str = ""  # file that makes the injected failure one-shot
    identity: str | None = None  # the pipeline stage's content identity: names the run (no date)
    dataset_version: str | None = None  # dataset version this run reads (lineage; names the run)
    code_version: str | None = None  # package@commit the pipeline ran (lineage; in the identity)

# Fields that change where/how a run executes, not what it computes: excluded from the run hash,
# so e.g. re-running with more workers or in-process still resumes the same run.
# code_version is lineage only (the pipeline identity already holds the code's tree, not the commit).
EXECUTION_FIELDS = frozenset({"num_workers", "in_process", "cpus_per_worker", "reader_cpus", "use_gpu",
                              "max_failures", "num_to_keep", "date", "fail_at_step", "fail_marker",
                              "code_version"})


def _coerce(text: str, annotation) -> object:
    """Parse a CLI override string into the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            return None
        return _coerce(text, args[0])
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    if annotation in (int, float, str):
        return annotation(text)
    return yaml.safe_load(text)  # lists / dicts


def load_stage_config(cls, path: str | Path | None = None, overrides: list[str] | tuple = ()):
    """Build `cls` from a YAML file then `key=value` overrides; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    values: dict = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of stage-config fields")
        values.update(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        if "." in key and key.split(".", 1)[0] in hints and hints[key.split(".", 1)[0]] is dict:
            # model_overrides.align_teacher_path=s3://... sets one entry of a dict field
            field, sub = key.split(".", 1)
            values[field] = {**values.get(field, {}), sub: yaml.safe_load(text) if text else None}
            continue
        if key not in hints:
            raise ValueError(f"unknown field {key!r} for {cls.__name__}; known: {', '.join(sorted(hints))}")
        values[key] = _coerce(text, hints[key])
    unknown = set(values) - set(hints)
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} in {path}; known: {', '.join(sorted(hints))}")
    for key, value in list(values.items()):  # YAML reads 1e-4 as a string
        if hints[key] is float and isinstance(value, str | int):
            values[key] = float(value)
    cfg = cls(**values)
    if hasattr(cfg, "validate"):  # e.g. a paper recipe's pretrained weight files (names the field)
        cfg.validate()
    return cfg


def config_hash(resolved: dict) -> str:
    """8 hex chars over the fields that define the computation."""
    core = {k: v for k, v in resolved.items() if k not in EXECUTION_FIELDS}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:8]


def checkpoint_layout(resolved: dict) -> dict:
    """The fields a checkpoint's shape depends on: world size and global batch."""
    world = max(1, int(resolved.get("num_workers") or 1))
    micro, accum = int(resolved.get("micro_batch") or 1), int(resolved.get("grad_accum") or 1)
    return {"world_size": world, "global_batch": micro * accum * world}


def run_name(stage: str, config_name: str, label: str | None, resolved: dict) -> str:
    """`<stage>-<config>-<12 hex>`, e.g. tokenizer-smoke-1a2b3c4d5e6f: the hash is over what the run
    computes: the pipeline `identity` (or, for a bare CLI run, the package's code tree), the config,
    the dataset version and the checkpoint layout (world size, global batch). Never the calendar: a
    resubmission on another day resumes, new data or code is a new run. `label` (the config's `date`
    field, default none) is put in a bare run's name only when given: a way to start a fresh run of
    the same content; a pipeline run ignores it."""
    identity = resolved.get("identity")
    if not identity:
        from detailflow.pipelines.runner.identity import code_version

        identity = {k: v for k, v in code_version().items() if k != "commit"}  # tree + image, as stages
    blob = json.dumps({"identity": identity, "config": config_hash(resolved),
                       "dataset_version": resolved.get("dataset_version"), **checkpoint_layout(resolved)},
                      sort_keys=True, default=str)
    tag = f"{label}-" if label and not resolved.get("identity") else ""
    return f"{stage}-{config_name}-{tag}{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
