"""The ``detailflow`` command.

    detailflow --help
    detailflow services up | status | logs mlflow | down
    detailflow config show [--json]          # resolved settings, secrets masked
    detailflow --config my.yaml config show  # settings from a YAML file (env still wins)
    eval "$(detailflow config env)"          # export the S3/MLflow env vars into a shell

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.

Stage groups (data, train, eval, registry, serve, generate, pipeline, weights) live in their own modules
and are loaded lazily from PLUGIN_GROUPS, so a module being written cannot break the rest of the
CLI. A plugin command gets the resolved settings with
``detailflow.platform.cli_settings.get_settings()`` (never from this module: layers import one way).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import click

from detailflow.platform.cli_settings import get_settings
from detailflow.platform.runtime import apply_runtime_env

# name -> (module, attribute, one-line help). The module defines a click group/command.
PLUGIN_GROUPS: dict[str, tuple[str, str, str]] = {
    "data": ("detailflow.pipelines.data.cli", "data", "Datasets: synthesise, import, ingest to S3, show."),
    "train": ("detailflow.pipelines.train.cli", "train", "Train the tokenizer / AR model (Ray + DeepSpeed)."),
    "extract-codes": ("detailflow.pipelines.train.cli", "extract_codes", "Extract AR code triplets."),
    "eval": ("detailflow.pipelines.evaluate.cli", "eval", "Evaluate tokenizers and generators."),
    "registry": ("detailflow.pipelines.registry.cli", "registry", "Registry: list, promote, rollback."),
    "serve": ("detailflow.platform.serving.cli", "serve", "Ray Serve generation endpoint."),
    "generate": ("detailflow.platform.serving.cli", "generate",
                 "Sample images from the endpoint (or --local)."),
    "pipeline": ("detailflow.pipelines.runner.cli", "pipeline",
                 "Run a pipeline file end to end (resumable)."),
    "infra": ("detailflow.platform.infra_cli", "infra",
              "Render KubeRay manifests (RayCluster/Job/CronJob/Service)."),
    "weights": ("detailflow.pipelines.registry.weights_cli", "weights",
                "Import released DetailFlow checkpoints; convert SigLIP2 towers to the encoder init."),
}


def _placeholder(name: str, module: str, help_text: str) -> click.Group:
    @click.group(name=name, help=f"{help_text} (not available yet: {module} is not installed)",
                 invoke_without_command=True)
    @click.pass_context
    def group(ctx):
        if ctx.invoked_subcommand is None:
            click.echo(f"'detailflow {name}' is not available yet ({module} does not exist).", err=True)
            ctx.exit(1)

    return group


def _module_exists(module: str) -> bool:
    """Whether a detailflow.* module's file is there, without importing it (or its packages)."""
    parts = module.split(".")
    base = Path(__file__).resolve().parent.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


class RootGroup(click.Group):
    """Built-in groups plus lazily imported plugin groups; maps errors to exit codes.

    `--help` lists only the plugins whose module exists; a missing one still answers by name with
    a "not available yet" message (exit 1)."""

    def list_commands(self, ctx):
        present = {name for name, (module, _, _) in PLUGIN_GROUPS.items() if _module_exists(module)}
        return sorted(set(super().list_commands(ctx)) | present)

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in PLUGIN_GROUPS:
            return cmd
        module, attr, help_text = PLUGIN_GROUPS[name]
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only "this plugin module does not exist (yet)"; a missing dependency inside it is a real error.
            if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
                return _placeholder(name, module, help_text)
            raise
        return getattr(mod, attr)

    def format_commands(self, ctx, formatter):
        # List plugins from the table so `--help` never imports (slow, possibly half-written) modules.
        rows = []
        for name in self.list_commands(ctx):
            if name in PLUGIN_GROUPS:
                rows.append((name, PLUGIN_GROUPS[name][2]))
            else:
                rows.append((name, super().get_command(ctx, name).get_short_help_str(80)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        from detailflow.platform.services import ServiceError
        from detailflow.platform.settings import SettingsError
        from detailflow.platform.storage import ChecksumMismatch

        try:
            return super().invoke(ctx)
        except SettingsError as exc:
            raise click.UsageError(str(exc), ctx) from exc
        except (ServiceError, ChecksumMismatch, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=RootGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML settings file (default: $DETAILFLOW_CONFIG). Env vars override it.")
@click.version_option(package_name="detailflow")
@click.pass_context
def main(ctx, config_file):
    """DetailFlow platform: data on S3, Ray + DeepSpeed training, MLflow registry, Ray Serve."""
    apply_runtime_env()
    ctx.ensure_object(dict)
    ctx.obj["config_file"] = config_file


# ---- services ----------------------------------------------------------------------------------
@main.group()
def services():
    """Local SeaweedFS (S3) + MLflow server: up, down, status, logs."""


def _print_status(status: dict) -> None:
    for name, st in status.items():
        state = "healthy" if st["healthy"] else ("running, NOT healthy" if st["running"] else "stopped")
        pid = f" pid {st['pid']}" if st["pid"] else ""
        click.echo(f"{name:10s} {state:22s} {st['url']}{pid}")


@services.command("up")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def services_up(as_json):
    """Start the local services (idempotent) and create the bucket."""
    from detailflow.platform.services import LocalServices

    settings = get_settings()
    status = LocalServices(settings).up()
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    _print_status(status)
    click.echo(f"S3 bucket   s3://{settings.s3_bucket} at {settings.s3_endpoint_url}")
    click.echo(f"MLflow UI   {settings.mlflow_tracking_uri}")
    click.echo(f"state dir   {settings.state_dir}")


@services.command("down")
def services_down():
    """Stop exactly the services `up` started (takes ~16 s: SeaweedFS stops gracefully)."""
    from detailflow.platform.services import LocalServices

    for name, was in LocalServices(get_settings()).down().items():
        click.echo(f"{name:10s} {'stopped' if was else 'was not running'}")


@services.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def services_status(as_json):
    """Show whether each service runs and answers; exit 1 unless all are healthy."""
    from detailflow.platform.services import LocalServices

    status = LocalServices(get_settings()).status()
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        _print_status(status)
    if not all(st["healthy"] for st in status.values()):
        sys.exit(1)


@services.command("init-bucket")
@click.option("--retries", default=30, show_default=True, help="Attempts, 2 s apart, while S3 starts.")
def services_init_bucket(retries):
    """Create the configured bucket on the configured S3 endpoint (compose / external S3)."""
    import time

    from detailflow.platform.storage import Storage

    settings = get_settings()
    for attempt in range(1, retries + 1):
        try:
            Storage(settings).ensure_bucket()
            break
        except Exception as exc:  # connection refused while the store starts, etc.
            if attempt == retries:
                raise click.ClickException(f"cannot create s3://{settings.s3_bucket} at "
                                           f"{settings.s3_endpoint_url}: {exc}") from exc
            time.sleep(2)
    click.echo(f"bucket s3://{settings.s3_bucket} ready at {settings.s3_endpoint_url}")


@services.command("logs")
@click.argument("name", type=click.Choice(["seaweedfs", "mlflow"]))
@click.option("-n", "--lines", default=50, show_default=True, help="How many lines.")
def services_logs(name, lines):
    """Print the last lines of a service's log."""
    from detailflow.platform.services import LocalServices

    click.echo(LocalServices(get_settings()).logs(name, lines))


# ---- config ------------------------------------------------------------------------------------
@main.group()
def config():
    """Show the resolved settings."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def config_show(as_json):
    """Print resolved settings (env > config file > defaults), secrets masked."""
    shown = get_settings().masked()
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    width = max(map(len, shown))
    for key, value in shown.items():
        click.echo(f"{key:{width}s}  {value}")


@config.command("env")
def config_env():
    """Print `export` lines (UNMASKED credentials) for S3/MLflow clients: eval "$(detailflow config env)"."""
    import shlex

    from detailflow.platform.storage import storage_env

    settings = get_settings()
    for key, value in {**settings.to_env(), **storage_env(settings)}.items():
        click.echo(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
