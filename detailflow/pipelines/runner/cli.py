"""`detailflow pipeline run | submit | status | validate`: one file runs the whole life of a model.

Usage:
    detailflow pipeline validate configs/pipelines/tiny.yaml
    detailflow pipeline run configs/pipelines/tiny.yaml                  # skips what is done
    detailflow pipeline run configs/pipelines/tiny.yaml --force tokenizer  # a new attempt (+ all after)
    detailflow pipeline run configs/pipelines/tiny.yaml --from ar          # ar and every stage after
    detailflow pipeline run configs/pipelines/rehearsal.yaml --set teacher_uri=s3://... --set ...
        # --set NAME=VALUE fills the file's ${vars.NAME} (validate/run/status/submit take it too)
    detailflow pipeline history tiny                                     # past invocations
    detailflow pipeline status configs/pipelines/tiny.yaml               # state, time, MLflow link
    detailflow pipeline submit configs/pipelines/detailflow-16.yaml --address http://head:8265
        # a Ray Job (working dir = this checkout, or --no-working-dir when the image has the code),
        # following its logs; Ctrl-C stops following, not the job
"""

from __future__ import annotations

import json
import sys

import click

from detailflow.platform.cli_settings import get_settings
from detailflow.platform.raytrain import ensure_ray


def _load(path: str, sets: tuple[str, ...] = ()):
    from detailflow.pipelines.runner.spec import PipelineError, load_pipeline

    bad = [s for s in sets if "=" not in s]
    if bad:
        raise click.UsageError(f"--set {bad[0]!r}: expected NAME=VALUE")
    try:
        return load_pipeline(path, variables=dict(s.split("=", 1) for s in sets))
    except PipelineError as exc:
        raise click.UsageError(str(exc)) from exc


set_option = click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
                          help="value of the pipeline file's ${vars.NAME} (repeatable)")


@click.group()
def pipeline():
    """Pipelines: ingest -> tokenizer -> codes -> AR -> evaluate -> promote -> deploy, resumable."""


@pipeline.command("validate")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@set_option
def validate(file, sets):
    """Check a pipeline file (schema, stage kinds, references) without running it."""
    spec = _load(file, sets)
    for i, s in enumerate(spec.stages, 1):
        click.echo(f"{i}. {s.name:<20} {s.kind:<20} {json.dumps(s.params, default=str)[:80]}")
        if s.resources:  # as the stage will get them (${vars.x} filled, converted to numbers)
            click.echo(f"   {'':<20} {'resources':<20} {json.dumps(s.resources)}")
    click.echo(f"{spec.path}: {len(spec.stages)} stages, valid")


@pipeline.command("run")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--force", multiple=True,
              help="stage to run as a new attempt (new run name) even if done; stages after it follow")
@click.option("--from", "from_stage", default=None, help="re-run this stage and every stage after it")
@set_option
def run(file, force, from_stage, sets):
    """Run FILE against the current settings; finished stages with the same identity are skipped."""
    from detailflow.pipelines.runner.lease import LeaseHeld
    from detailflow.pipelines.runner.runner import StageFailed, Terminated, run_pipeline

    spec = _load(file, sets)
    unknown = (set(force) | ({from_stage} if from_stage else set())) - {s.name for s in spec.stages}
    if unknown:
        raise click.UsageError(f"--force/--from: no stage named {sorted(unknown)} in {file}")
    settings = get_settings()
    ensure_ray(settings)
    try:
        summary = run_pipeline(spec, settings, force=tuple(force), from_stage=from_stage,
                               log=lambda m: click.echo(m, err=True))
    except (StageFailed, LeaseHeld) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except (Terminated, KeyboardInterrupt) as exc:
        click.echo(f"error: stopped by {exc or 'SIGINT'}; the stage is recorded failed, re-run to resume",
                   err=True)
        sys.exit(143 if isinstance(exc, Terminated) else 130)
    click.echo(json.dumps({k: v["status"] for k, v in summary.items()}))


@pipeline.command("status")
@click.argument("file_or_name")
@click.option("--json", "as_json", is_flag=True, help="machine-readable")
@set_option
def status(file_or_name, as_json, sets):
    """Each stage's state, timing and MLflow link (FILE_OR_NAME: the file or the pipeline name)."""
    from pathlib import Path

    from detailflow.pipelines.runner.runner import read_state, status_rows
    from detailflow.platform.storage import Storage

    spec = _load(file_or_name, sets) if Path(file_or_name).is_file() else None
    name = spec.name if spec else file_or_name
    settings = get_settings()
    state = read_state(Storage(settings), name)
    rows = status_rows(state, spec, settings.mlflow_tracking_uri)
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"pipeline {name}: {len(state.get('runs', []))} run(s) recorded")
    for r in rows:
        secs = f"{r['seconds']:.0f}s" if isinstance(r["seconds"], int | float) else ""
        click.echo(f"  {r['stage']:<20} {r['kind']:<20} {r['status']:<8} {secs:>7}  {r['mlflow']}")
        if r["error"]:
            click.echo(f"      error: {r['error'][:200]}")
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)


@pipeline.command("history")
@click.argument("file_or_name")
@click.option("--limit", default=20, show_default=True, help="newest first")
@click.option("--json", "as_json", is_flag=True, help="machine-readable")
def history(file_or_name, limit, as_json):
    """Past invocations of a pipeline (who, when, code version, what ran, how it ended)."""
    from pathlib import Path

    from detailflow.pipelines.runner.events import list_history
    from detailflow.platform.storage import Storage

    name = _load(file_or_name).name if Path(file_or_name).is_file() else file_or_name
    rows = list_history(Storage(get_settings()), name, limit)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        ran = ",".join(k for k, v in r.get("stages", {}).items() if v != "skipped") or "-"
        click.echo(f"{r['started']}  {r['status']:<8} {r['host']}:{r['pid']}  code {r['code_version']}  "
                   f"ran: {ran}" + (f"  error: {r['error'][:120]}" if r.get("error") else ""))


@pipeline.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--address", required=True, help="Ray dashboard / Jobs address, e.g. http://127.0.0.1:8265")
@click.option("--working-dir/--no-working-dir", default=True, show_default=True,
              help="upload this checkout as the job's working dir (off: the image already has the code)")
@click.option("--follow/--no-follow", default=True, show_default=True, help="stream the job's logs")
@set_option
def submit(file, address, working_dir, follow, sets):
    """Submit FILE as a Ray Job that runs `detailflow pipeline run FILE` on the cluster."""
    import asyncio
    import datetime as dt
    import shlex

    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = _load(file, sets)
    client = JobSubmissionClient(address)
    runtime_env = {"env_vars": {"DETAILFLOW_RAY_ADDRESS": "auto"}}
    if working_dir:
        runtime_env["working_dir"] = "."
        runtime_env["excludes"] = [".venv", ".git", "out", ".detailflow", "*.pyc"]
    entrypoint = shlex.join(["detailflow", "pipeline", "run", file, *(a for s in sets for a in ("--set", s))])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                               submission_id=f"pipeline-{spec.name}-{dt.datetime.now():%Y%m%d-%H%M%S}",
                               metadata={"detailflow.pipeline": spec.name})
    click.echo(f"submitted {job_id} to {address}")
    if not follow:
        return

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            click.echo(lines, nl=False)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the job goes on: ray job status {job_id} --address {address}")
        return
    final = client.get_job_status(job_id)
    click.echo(f"job {job_id}: {final}")
    sys.exit(0 if final == JobStatus.SUCCEEDED else 1)
