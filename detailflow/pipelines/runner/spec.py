"""Pipeline files: a YAML list of stages with inputs from earlier stages, schema-validated.

Usage:
    spec = load_pipeline("configs/pipelines/tiny.yaml")          # PipelineError naming the bad field
    params = resolve(stage.params, outputs)                       # ${stages.<name>.<key>} filled in

File format (configs/pipelines/*.yaml):
    name: tiny                         # pipeline name: state under s3://<bucket>/pipelines/<name>/
    description: ...
    stages:
      - name: data                     # unique; later stages refer to its outputs
        kind: ingest                   # one of runner.stages.KINDS
        params: {src: out/shapes, name: demo-shapes, split: train}
      - name: tokenizer
        kind: train-tokenizer
        params: {config: configs/tokenizer-tiny.yaml, overrides: {dataset: "${stages.data.name}"}}
        resources: {num_workers: 2, gpus_per_worker: 0, cpus_per_worker: 0.5}

A `${stages.X.key}` reference must point to an EARLIER stage and a key its kind outputs; the
reference also orders the stages (inputs before outputs) and is part of the stage's content hash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REF = re.compile(r"\$\{stages\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)\}")

SCHEMA = {
    "type": "object",
    "required": ["name", "stages"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"},
        "description": {"type": "string"},
        "stages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "kind"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"},
                    "kind": {"type": "string"},
                    "params": {"type": "object"},
                    "resources": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "num_workers": {"type": "integer", "minimum": 0},
                            "gpus_per_worker": {"type": "number", "minimum": 0},
                            "cpus_per_worker": {"type": "number", "exclusiveMinimum": 0},
                            "data_cpus": {"type": "number", "exclusiveMinimum": 0},
                            "num_actors": {"type": "integer", "minimum": 1},
                        },
                    },
                },
            },
        },
    },
}


class PipelineError(ValueError):
    """A pipeline file that cannot run: the message names the file, the stage and the field."""


@dataclass
class Stage:
    name: str  # unique stage name
    kind: str  # what runs (runner.stages.KINDS)
    params: dict = field(default_factory=dict)  # the kind's parameters (may hold ${stages...} refs)
    resources: dict = field(default_factory=dict)  # workers / GPUs / CPUs for distributed kinds


@dataclass
class PipelineSpec:
    name: str  # pipeline name
    stages: list[Stage]  # in execution order
    description: str = ""  # one line for `pipeline status`
    path: str = ""  # the file it came from

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


def refs(obj) -> list[tuple[str, str]]:
    if isinstance(obj, str):
        return REF.findall(obj)
    if isinstance(obj, dict):
        return [r for v in obj.values() for r in refs(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in refs(v)]
    return []


def load_pipeline(path: str | Path, kinds: dict | None = None) -> PipelineSpec:
    """Parse + validate a pipeline file (schema, unique names, known kinds, backward references)."""
    import jsonschema

    from detailflow.pipelines.runner.stages import KINDS

    kinds = KINDS if kinds is None else kinds
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"pipeline file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PipelineError(f"{path}: not valid YAML: {e}") from e
    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.path) or "(top level)"
        raise PipelineError(f"{path}: {where}: {e.message}")
    stages = [
        Stage(s["name"], s["kind"], s.get("params", {}), s.get("resources", {})) for s in data["stages"]
    ]
    seen: dict[str, Stage] = {}
    for i, st in enumerate(stages):
        if st.name in seen:
            raise PipelineError(f"{path}: stages/{i}/name: duplicate stage name {st.name!r}")
        if st.kind not in kinds:
            raise PipelineError(
                f"{path}: stages/{i}/kind: unknown kind {st.kind!r}; known: {', '.join(kinds)}"
            )
        for ref_stage, key in refs(st.params):
            if ref_stage not in seen:
                raise PipelineError(
                    f"{path}: stages/{i} ({st.name}): ${{stages.{ref_stage}.{key}}} refers to "
                    f"a stage that does not come before it"
                )
            produced = kinds[seen[ref_stage].kind].outputs
            if key not in produced:
                raise PipelineError(
                    f"{path}: stages/{i} ({st.name}): stage {ref_stage!r} "
                    f"({seen[ref_stage].kind}) has no output {key!r}; it has "
                    f"{', '.join(produced)}"
                )
        seen[st.name] = st
    return PipelineSpec(data["name"], stages, data.get("description", ""), str(path))


def resolve(obj, outputs: dict[str, dict]):
    """Fill ${stages.X.key} from earlier stages' outputs (a whole-string ref keeps its type)."""
    if isinstance(obj, str):
        whole = REF.fullmatch(obj)
        if whole:
            return outputs[whole.group(1)][whole.group(2)]
        return REF.sub(lambda m: str(outputs[m.group(1)][m.group(2)]), obj)
    if isinstance(obj, dict):
        return {k: resolve(v, outputs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve(v, outputs) for v in obj]
    return obj
