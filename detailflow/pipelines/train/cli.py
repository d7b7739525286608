"""CLI: `detailflow train tokenizer|ar` and `detailflow extract-codes`.

    detailflow train tokenizer --config configs/tokenizer-tiny.yaml [key=value ...]
    detailflow train ar --config configs/ar-tiny.yaml tokenizer=<tokenizer run> [key=value ...]
    detailflow train show tokenizer --config configs/tokenizer-tiny.yaml   # resolved config + run name
    detailflow train checkpoints <run name> [--json]   # MLflow: status, checkpoints, exports
    detailflow extract-codes --tokenizer <tokenizer run | s3://.../export> --dataset shapes

Overrides are stage-config fields (see the dataclasses in train_tokenizer.py / train_ar.py), e.g.
`steps=50 num_workers=0 zero_stage=3`, or one entry of a dict field: `model_overrides.disc_net_path=...`.
Resubmitting the same config on the same day resumes the run.

Exit codes: 2 = the config or an override is wrong (a paper recipe without its weight files
included); 1 = the run failed: the message names the stage, the run, the error, where the worker
logs are and the MLflow run (marked FAILED with the error as a tag).
"""

from __future__ import annotations

import dataclasses
import json

import click

from detailflow.platform.cli_settings import get_settings
from detailflow.platform.raytrain import ensure_ray


def _load(kind: str, config_file, overrides):
    from detailflow.pipelines.train.stage_config import load_stage_config

    if kind == "tokenizer":
        from detailflow.pipelines.train.tokenizer import TokenizerStageConfig as cls
    else:
        from detailflow.pipelines.train.ar import ARStageConfig as cls
    try:
        return load_stage_config(cls, config_file, list(overrides))
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from exc


@click.group(name="train")
def train():
    """Train the tokenizer or the AR model (Ray Train + DeepSpeed)."""


def _stage_command(kind: str):
    @click.command(name=kind, help=f"Train the {kind} stage: --config FILE then key=value overrides.")
    @click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="Stage YAML (configs/*.yaml).")
    @click.argument("overrides", nargs=-1)
    def command(config_file, overrides):
        cfg = _load(kind, config_file, overrides)
        settings = get_settings()
        ensure_ray(settings)
        if kind == "tokenizer":
            from detailflow.pipelines.train.tokenizer import run
        else:
            from detailflow.pipelines.train.ar import run
        try:
            info = run(cfg, settings)
        except Exception as exc:  # the config loaded: what fails now is the run (exit 1), not usage (2)
            raise click.ClickException(_failure(kind, cfg, settings, exc)) from exc
        click.echo(json.dumps(info, default=str))

    return command


def _as_run(kind: str, cfg, settings):
    """The config as the run named it: batch resolved, the tokenizer's dataset version pinned (best
    effort: a failure before that point named no run)."""
    from detailflow.pipelines.train.loop_common import resolve_batch

    try:
        cfg = resolve_batch(cfg)
        if kind == "tokenizer":
            from detailflow.pipelines.train.tokenizer import pin_dataset_version
            from detailflow.platform.storage import Storage

            cfg, _ = pin_dataset_version(cfg, Storage(settings))
    except Exception:  # noqa: BLE001 - the name of a run that may never have started
        pass
    return cfg


def _failure(kind: str, cfg, settings, exc: Exception, limit: int = 2000) -> str:
    """The stage, the run, the error (its tail: Ray puts the root cause last) and where to look."""
    from detailflow.pipelines.train.stage_config import run_name
    from detailflow.platform.raytrain import logs_hint

    text = f"{type(exc).__name__}: {exc}"
    if len(text) > limit:
        text = "..." + text[-limit:]
    name = run_name(kind, cfg.name, cfg.date, dataclasses.asdict(_as_run(kind, cfg, settings)))
    return (f"stage 'train {kind}' failed (run {name}):\n{text}\n"
            f"  worker logs: {logs_hint()}\n"
            f"  MLflow: {settings.mlflow_tracking_uri}, experiment {cfg.experiment!r}, run {name} "
            "(tag detailflow.error)\n"
            f"  resubmitting the same command resumes from the last complete checkpoint")


train.add_command(_stage_command("tokenizer"))
train.add_command(_stage_command("ar"))


@train.command(name="show")
@click.argument("kind", type=click.Choice(["tokenizer", "ar"]))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None)
@click.argument("overrides", nargs=-1)
def show(kind, config_file, overrides):
    """Print the resolved stage config and its deterministic run name."""
    from detailflow.pipelines.train.stage_config import run_name

    cfg = _load(kind, config_file, overrides)
    resolved = dataclasses.asdict(cfg)
    click.echo(json.dumps({"run_name": run_name(kind, cfg.name, cfg.date, resolved), "config": resolved},
                          indent=2))


@train.command(name="checkpoints")
@click.argument("run_name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def checkpoints_cmd(run_name, as_json):
    """What MLflow recorded for a training run: status, every checkpoint (step, URI, metrics), exports.

    RUN_NAME is the deterministic run name the stage printed (`detailflow train show` tells it)."""
    from mlflow.tracking import MlflowClient

    from detailflow.platform.tracking import ERROR_TAG, find_run_id, list_checkpoints, list_exports

    settings = get_settings()
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    run_id = find_run_id(client, run_name)
    if run_id is None:
        raise click.ClickException(f"no MLflow run tagged with run name {run_name!r} at "
                                   f"{settings.mlflow_tracking_uri}")
    run = client.get_run(run_id)
    info = {"run_name": run_name, "run_id": run_id, "status": run.info.status,
            "url": f"{settings.mlflow_tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}"
                   f"/runs/{run_id}",
            "error": run.data.tags.get(ERROR_TAG), "checkpoints": list_checkpoints(client, run_id),
            "exports": list_exports(client, run_id)}
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"{run_name}  {info['status']}  {info['url']}")
    if info["error"]:
        click.echo(f"  error: {info['error'][-500:]}")
    for c in info["checkpoints"]:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(c["metrics"].items()))
        click.echo(f"  checkpoint step {c['step']:>7}  {c['uri']}  {metrics}")
    for e in info["exports"]:
        click.echo(f"  export ({e['kind']})  {e['uri']}  {e['model_uri']}")
    if not info["checkpoints"]:
        click.echo("  no checkpoint recorded yet")


@click.command(name="extract-codes")
@click.option("--tokenizer", required=True, help="Tokenizer run name or s3:// export URI.")
@click.option("--dataset", required=True, help="Dataset name under s3://<bucket>/datasets/.")
@click.option("--split", default="train", show_default=True)
@click.option("--views", default="tiny", show_default=True, type=click.Choice(["tiny", "tencrop"]))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--num-actors", default=1, show_default=True, type=click.IntRange(1))
@click.option("--gpu", "use_gpu", is_flag=True, help="One GPU per actor.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Re-extract even if the codes are already published.")
def extract_codes(tokenizer, dataset, split, views, batch_size, num_actors, use_gpu, seed, force):
    """Extract clean/input/target code triplets with a frozen tokenizer (spec §2.3)."""
    from detailflow.pipelines.train.extract_codes import ExtractConfig
    from detailflow.pipelines.train.extract_codes import extract_codes as run

    settings = get_settings()
    ensure_ray(settings)
    info = run(ExtractConfig(tokenizer=tokenizer, dataset=dataset, split=split, views=views,
                             batch_size=batch_size, num_actors=num_actors, use_gpu=use_gpu, seed=seed,
                             force=force), settings)
    click.echo(json.dumps(info, default=str))
