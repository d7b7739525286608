"""`detailflow registry ...`: the MLflow model registry of the platform.

    detailflow registry list                                   # models, their aliases and versions
    detailflow registry show smoke [--version 3] [--json]      # versions, decisions, evaluations, history
    detailflow registry register --name smoke --ar <AR run | run id | s3://.../export> [--tokenizer REF]
    detailflow registry promote --config configs/promote-smoke.yaml [key=value ...]   # e.g. version=3
    detailflow registry rollback smoke --reason "artefacts in class 7" [--to 2]

NAME is the base name ("smoke": models smoke-generator and smoke-tokenizer) or a full registered
model name. promote exits 0 when promoted (or already champion), 3 when the gate rejected the
challenger, 1 when an evaluation failed; the champion never moves in the last two cases.
"""

from __future__ import annotations

import json

import click

from detailflow.platform.cli_settings import get_settings


def _registry():
    from detailflow.platform.registry import Registry

    return Registry(get_settings().mlflow_tracking_uri)


def _model_name(reg, name: str) -> str:
    from mlflow.exceptions import MlflowException

    from detailflow.platform.registry import generator_name

    for candidate in (name, generator_name(name)):
        try:
            reg.client.get_registered_model(candidate)
            return candidate
        except MlflowException:
            continue
    raise click.ClickException(f"no registered model {name!r} or {generator_name(name)!r}")


@click.group(name="registry")
def registry():
    """MLflow registry: list, show, register, promote (gated), rollback."""


@registry.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_models(as_json):
    """Registered models with their aliases and version counts."""
    reg = _registry()
    rows = []
    for m in reg.models():
        versions = reg.versions(m.name)
        rows.append({"name": m.name, "kind": m.tags.get("detailflow.kind"), "aliases": reg.aliases(m.name),
                     "versions": len(versions), "latest": versions[0].version if versions else None})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no registered models yet (detailflow registry register --name NAME --ar REF)")
    for r in rows:
        aliases = " ".join(f"@{a}=v{v}" for a, v in sorted(r["aliases"].items())) or "-"
        click.echo(f"{r['name']:32s} {r['kind'] or '':10s} {r['versions']:3d} versions "
                   f"(latest v{r['latest']})  {aliases}")


def _version_row(v, aliases: dict) -> dict:
    tags = dict(v.tags)
    evals = {k.removeprefix("detailflow.eval."): json.loads(t) for k, t in tags.items()
             if k.startswith("detailflow.eval.")}
    return {"version": v.version, "aliases": sorted(a for a, n in aliases.items() if n == str(v.version)),
            "created": v.creation_timestamp, "decision": tags.get("detailflow.promotion.decision"),
            "reason": tags.get("detailflow.promotion.reason"),
            "evaluations": {k: {f: e.get(f) for f in ("status", "run_id", "metrics", "error")}
                            for k, e in evals.items()},
            "rolled_back": tags.get("detailflow.rollback.reason"), "tags": tags,
            "lineage": {k.removeprefix("detailflow.lineage."): t for k, t in tags.items()
                        if k.startswith("detailflow.lineage.")}}


@registry.command("show")
@click.argument("name")
@click.option("--version", "version", default=None, help="Show one version with all its tags.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def show(name, version, as_json):
    """A model's aliases, champion history and versions (decisions, evaluations, lineage).
    NAME/VERSION (or --version) shows one version with all its tags."""
    if "/" in name and version is None:
        name, version = name.rsplit("/", 1)
    reg = _registry()
    model = _model_name(reg, name)
    aliases = reg.aliases(model)
    if version is not None:
        row = _version_row(reg.version(model, version.removeprefix("v")), aliases)
        if as_json:
            click.echo(json.dumps(row, indent=2, default=str))
            return
        click.echo(f"{model} v{row['version']}  {' '.join('@' + a for a in row['aliases']) or ''}")
        click.echo(f"  decision: {row['decision'] or 'undecided'} {row['reason'] or ''}")
        for key, value in sorted(row["lineage"].items()):
            click.echo(f"  {key:18s} {value}")
        for key, value in sorted(row["tags"].items()):
            if not key.startswith(("detailflow.lineage.", "detailflow.eval.")):
                click.echo(f"  tag {key} = {value[:120]}")
        return
    data = {"name": model, "aliases": aliases, "history": reg.history(model),
            "versions": [_version_row(v, aliases) for v in reg.versions(model)]}
    if as_json:
        for row in data["versions"]:
            row.pop("tags")
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(f"{model}  " + (" ".join(f"@{a}=v{v}" for a, v in sorted(aliases.items())) or "(no aliases)"))
    click.echo("champion history: " + (" -> ".join(f"v{h['version']}" for h in data["history"]) or "-"))
    for row in data["versions"]:
        mark = ",".join(row["aliases"])
        decision = row["decision"] or "undecided"
        click.echo(f"  v{row['version']:<4} {mark:20s} {decision:16s} {row['reason'] or ''}")
        if row["lineage"]:
            lin = row["lineage"]
            click.echo(f"        data {lin.get('dataset')}@{lin.get('dataset_version')}  code "
                       f"{lin.get('code_version')}  runs tok {lin.get('tokenizer_run_id')} "
                       f"ar {lin.get('ar_run_id')}")
        for key, e in row["evaluations"].items():
            metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted((e["metrics"] or {}).items())[:6])
            click.echo(f"        eval {key} {e['status']}: {metrics or e['error'] or ''}")
        if row["rolled_back"]:
            click.echo(f"        rolled back: {row['rolled_back']}")


@registry.command("register")
@click.option("--name", required=True, help="Base name: registers NAME-tokenizer and NAME-generator.")
@click.option("--ar", "ar", required=True, help="AR training run name, run id, or s3:// export URI.")
@click.option("--tokenizer", default=None, help="Tokenizer ref (default: the one the AR export names).")
def register_cmd(name, ar, tokenizer):
    """Register a tokenizer + AR pair (the generator pyfunc); re-registering returns the same versions."""
    from detailflow.pipelines.registry.register import register

    try:
        out = register(get_settings(), name, ar, tokenizer)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    state = "registered" if out["created"] else "already registered"
    click.echo(f"{state}: {out['generator']} v{out['generator_version']} "
               f"({out['tokenizer']} v{out['tokenizer_version']})")
    click.echo(f"  load: mlflow.pyfunc.load_model('models:/{out['generator']}/{out['generator_version']}')")


@registry.command("promote", context_settings={"ignore_unknown_options": True})
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="configs/promote-*.yaml (PromoteConfig fields).")
@click.argument("overrides", nargs=-1)
def promote_cmd(config_file, overrides):
    """Register (unless version=N) -> challenger -> evaluate -> gate -> champion; key=value overrides."""
    from detailflow.pipelines.registry.promote import PromoteConfig, exit_code, promote
    from detailflow.pipelines.train.stage_config import load_stage_config

    try:
        cfg = load_stage_config(PromoteConfig, config_file, list(overrides))
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from exc
    decision = promote(cfg, get_settings())
    click.echo(json.dumps(decision, indent=2, default=str))
    settings = get_settings()
    click.echo(f"MLflow UI: {settings.mlflow_tracking_uri}/#/models/{cfg.name}-generator")
    raise SystemExit(exit_code(decision))


@registry.command("rollback")
@click.argument("name")
@click.option("--reason", required=True, help="Why (recorded on both versions and on the model).")
@click.option("--to", "to", default=None, help="A specific earlier champion version (default: the previous).")
def rollback_cmd(name, reason, to):
    """Move `champion` back to the previous champion and record why."""
    from detailflow.platform.registry import RegistryError

    reg = _registry()
    model = _model_name(reg, name)
    try:
        record = reg.rollback(model, reason=reason, to=to)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{model}: champion v{record['from']} -> v{record['to']} ({reason})")
