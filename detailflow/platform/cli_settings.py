"""The resolved Settings of one CLI invocation, for every command module.

The root command (``detailflow/cli.py``) stores ``--config`` in the click context; command modules
(pipelines' CLIs, serving's) call :func:`get_settings` from here, so they depend on the platform
layer and never on the top-level CLI module.
"""

from __future__ import annotations

import click

from detailflow.platform.settings import Settings, SettingsError, load_settings


def get_settings(ctx: click.Context | None = None) -> Settings:
    """Resolved Settings for this invocation (``--config`` + env), loaded once per invocation."""
    ctx = (ctx or click.get_current_context()).find_root()
    ctx.ensure_object(dict)
    if "settings" not in ctx.obj:
        try:
            ctx.obj["settings"] = load_settings(ctx.obj.get("config_file"))
        except SettingsError as exc:
            raise click.UsageError(str(exc), ctx) from exc
    return ctx.obj["settings"]
