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

Variables: values a user supplies per run (weight URIs, their sha256) without editing the file:
    vars:                              # name -> default; null = required (the run refuses without it)
      teacher_uri: null
    stages: [... params: {overrides: {model_overrides.align_teacher_path: "${vars.teacher_uri}"}} ...]
    detailflow pipeline run FILE --set teacher_uri=s3://bucket/weights/siglip2.pt2
    load_pipeline(path, variables={"teacher_uri": "s3://..."})
`${vars.x}` is filled in at load time (a whole-string reference keeps the value's type), so the value
is part of the stage's params and of its content hash: another URI or sha256 is another run.
Resources take variables too: `resources: {num_workers: "${vars.WORKERS}"}` with `--set WORKERS=64`;
the text becomes the number the field takes (int for num_workers / num_actors, int or float for
CPUs and GPUs) and is checked like a written number; one that does not parse names stage, field, value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REF = re.compile(r"\$\{stages\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)\}")
VAR = re.compile(r"\$\{vars\.([A-Za-z0-9_]+)\}")

VAR_TEXT = {"type": "string", "pattern": r"\$\{vars\.[A-Za-z0-9_]+\}"}  # a number given by a variable

# A stage's resources, as Ray and the stages take them (after ${vars.x} is filled and converted).
RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "num_workers": {"type": "integer", "minimum": 0},
        "gpus_per_worker": {"type": "number", "minimum": 0},
        "cpus_per_worker": {"type": "number", "exclusiveMinimum": 0},
        "data_cpus": {"type": "number", "exclusiveMinimum": 0},
        "num_actors": {"type": "integer", "minimum": 1},
        # the stage's own Ray task (runner/stages.py "Where work runs")
        "cpus": {"type": "number", "exclusiveMinimum": 0},
        "gpus": {"type": "number", "minimum": 0},
        "accelerator": {
            "type": "object",
            "additionalProperties": {"type": "number", "exclusiveMinimum": 0},
        },
    },
}


def _or_var(prop: dict) -> dict:
    """A resource's schema as written in the file: its number, or a string holding ${vars.x}."""
    if prop.get("type") == "object":
        return {**prop, "additionalProperties": _or_var(prop["additionalProperties"])}
    return {"anyOf": [prop, VAR_TEXT]}


SCHEMA = {
    "type": "object",
    "required": ["name", "stages"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"},
        "description": {"type": "string"},
        "vars": {"type": "object", "propertyNames": {"pattern": "^[A-Za-z0-9_]+$"}},
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
                    "resources": {**RESOURCES, "properties": {
                        k: _or_var(v) for k, v in RESOURCES["properties"].items()}},
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


def substitute(obj, pattern: re.Pattern, value):
    """Replace every match of `pattern` in the strings of obj by value(match); a string that IS one
    reference takes the value itself (its type kept)."""
    if isinstance(obj, str):
        whole = pattern.fullmatch(obj)
        if whole:
            return value(whole)
        return pattern.sub(lambda m: str(value(m)), obj)
    if isinstance(obj, dict):
        return {k: substitute(v, pattern, value) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, pattern, value) for v in obj]
    return obj


def fill_vars(obj, values: dict):
    """Substitute ${vars.x}."""
    return substitute(obj, VAR, lambda m: values[m.group(1)])


def _var_values(path: Path, data: dict, given: dict) -> dict:
    """The file's vars with the given values applied; unknown or missing (null, not given) ones refuse."""
    declared = data.get("vars") or {}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise PipelineError(f"{path}: --set {', '.join(unknown)}: no such variable; the file declares "
                            f"{', '.join(sorted(declared)) or 'none'}")
    values = {**declared, **given}
    used = sorted({n for s in data["stages"] for part in ("params", "resources")
                   for n in VAR.findall(str(s.get(part, {})))})
    undeclared = [n for n in used if n not in declared]
    if undeclared:
        raise PipelineError(f"{path}: ${{vars.{undeclared[0]}}} is used but not declared under vars:")
    missing = [n for n in used if values[n] is None]
    if missing:
        raise PipelineError(f"{path}: variable(s) {', '.join(missing)} have no value: give them with "
                            + " ".join(f"--set {n}=..." for n in missing))
    return values


INTEGER = re.compile(r"[+-]?\d+")


def _number(text: str, integer: bool):
    """A resource value from a variable's text: int for integer fields, int or float otherwise
    (`4` stays 4, so a value written in the file and the same value given by --set hash alike)."""
    text = text.strip()
    if INTEGER.fullmatch(text):
        return int(text)
    if integer:
        raise ValueError("not an integer")
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("not a finite number")
    return value


def _fill_resources(path: Path, i: int, stage: dict, values: dict) -> dict:
    """The stage's resources with ${vars.x} filled and converted to the numbers each field takes,
    then checked against RESOURCES (minimums too); a value that does not fit names stage, field, value."""
    import jsonschema

    raw = stage.get("resources", {})
    where = f"{path}: stages/{i} ({stage['name']}): resources"

    def convert(field: str, written, integer: bool):
        value = fill_vars(written, values)
        if isinstance(value, float) and integer and value.is_integer():
            return int(value)
        if not isinstance(value, str):
            return value
        try:
            return _number(value, integer)
        except ValueError as exc:
            given = f" (from {written!r})" if written != value else ""
            raise PipelineError(f"{where}/{field}: {value!r}{given} is {exc}") from None

    out = {}
    for name, written in raw.items():
        if name == "accelerator":
            out[name] = {k: convert(f"{name}/{k}", v, False) for k, v in written.items()}
        else:
            out[name] = convert(name, written, RESOURCES["properties"][name]["type"] == "integer")
    errors = sorted(jsonschema.Draft202012Validator(RESOURCES).iter_errors(out), key=lambda e: list(e.path))
    if errors:
        field = "/".join(str(p) for p in errors[0].path)
        written = raw
        for part in errors[0].path:
            written = written[part]
        given = f" (from {written!r})" if VAR.search(str(written)) else ""
        raise PipelineError(f"{where}/{field}: {errors[0].message}{given}")
    return out


def load_pipeline(path: str | Path, kinds: dict | None = None, variables: dict | None = None) -> PipelineSpec:
    """Parse + validate a pipeline file (schema, unique names, known kinds, backward references);
    `variables` fill its ${vars.x} references (see the module docstring)."""
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
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        if e.validator == "anyOf" and isinstance(e.instance, str):  # a resource: a number or a variable
            raise PipelineError(f"{path}: {where}: {e.instance!r} is neither a number nor a ${{vars.NAME}}")
        e = jsonschema.exceptions.best_match([e])  # inside an anyOf: the number's own complaint
        raise PipelineError(f"{path}: {where}: {e.message}")
    values = _var_values(path, data, dict(variables or {}))
    stages = [
        Stage(s["name"], s["kind"], fill_vars(s.get("params", {}), values),
              _fill_resources(path, i, s, values))
        for i, s in enumerate(data["stages"])
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
    return substitute(obj, REF, lambda m: outputs[m.group(1)][m.group(2)])
