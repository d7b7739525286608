"""Serve a new champion without a redeploy: the ChampionWatcher pins the alias' version in the user_config.

    ChampionWatcher.bind(GENERATOR, poll_interval_s=10)        # app.build_app adds it (args.watch_alias)
    update_generator_config("detailflow", version="4")          # the same update by hand (CLI: serve pin)

Every poll_interval_s the watcher reads `<model>-generator@<alias>` from MLflow (the Generator's
user_config names both). When the alias points elsewhere than the user_config's `version`, it writes the
new version into the Generator's user_config through the Serve controller, as `serve deploy` with an
edited file would: only the user_config changes, so Serve calls reconfigure on the running replicas (a
lightweight update: no restart, requests keep flowing, the old model finishes what it started) and new
replicas start on the same version. The version, not the alias, goes into the config, so every replica
serves the same, known version and the config says which.

The application must have been deployed from a config (detailflow serve up, serve deploy, a
RayService): the controller keeps those configs, and an update re-submits all of them unchanged but for
this one field (submitting fewer would delete the others).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from detailflow.platform.serving.config import GENERATOR, WATCHER, GeneratorOptions

logger = logging.getLogger("ray.serve")


def _controller():
    from ray.serve.context import _get_global_client

    return _get_global_client()._controller


def app_configs() -> dict:
    """{app name: config dict (only the fields that were set)} of the running config-deployed applications.
    (The controller keeps the last submitted configs even for apps deleted since; those are left out.)"""
    import ray
    from ray import serve

    live = set(serve.status().applications)
    configs = ray.get(_controller().get_app_configs.remote())
    return {name: cfg.model_dump(exclude_unset=True) for name, cfg in configs.items() if name in live}


def apply_app_configs(apps: list[dict]) -> None:
    """Submit these application configs as the whole declarative state (what `serve deploy` does)."""
    import ray
    from ray.serve.schema import ServeDeploySchema

    details = ray.get(_controller().get_serve_instance_details.remote())
    schema = ServeDeploySchema.model_validate({"applications": apps,
                                               "target_capacity": details.get("target_capacity")})
    ray.get(_controller().apply_config.remote(schema))


def generator_user_config(app: dict, deployment: str = GENERATOR) -> dict:
    entry = next((d for d in app.get("deployments") or [] if d.get("name") == deployment), None)
    return dict((entry or {}).get("user_config") or {})


def update_generator_config(app_name: str, deployment: str = GENERATOR, **changes) -> dict:
    """Set fields of `deployment`'s user_config in the running config of `app_name`; returns the new one."""
    configs = app_configs()
    if app_name not in configs:
        raise RuntimeError(f"application {app_name!r} was not deployed from a config (deployed: "
                           f"{sorted(configs)}); deploy it with `detailflow serve up` or `serve deploy`")
    app = configs[app_name]
    deployments = app.setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == deployment), None)
    if entry is None:
        entry = {"name": deployment}
        deployments.append(entry)
    new = GeneratorOptions.from_dict({**GeneratorOptions().to_dict(), **(entry.get("user_config") or {}),
                                      **changes}).to_dict()
    entry["user_config"] = new
    apply_app_configs(list(configs.values()))
    return new


@serve.deployment(name=WATCHER, num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=8)
class ChampionWatcher:
    def __init__(self, generator_deployment: str = GENERATOR, poll_interval_s: float = 10.0):
        from detailflow.platform.settings import load_settings

        self.app_name = serve.get_replica_context().app_name
        self.deployment, self.poll_interval_s = generator_deployment, poll_interval_s
        self.tracking_uri = load_settings().mlflow_tracking_uri
        self.state = {"checks": 0, "updates": 0, "alias_version": None, "config_version": None,
                      "last_check": None, "last_error": None, "poll_interval_s": poll_interval_s,
                      "history": []}
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.check_once)
                self.state["last_error"] = None
            except Exception as exc:  # MLflow down, alias missing: keep serving what runs, retry later
                self.state["last_error"] = f"{type(exc).__name__}: {exc}"[:500]
                logger.warning("ChampionWatcher: %s", self.state["last_error"])
            await asyncio.sleep(self.poll_interval_s)

    def check_once(self) -> dict:
        from detailflow.platform.serving.model_store import resolve_version

        app = app_configs().get(self.app_name)
        if app is None:
            raise RuntimeError(f"application {self.app_name!r} was not deployed from a config; "
                               "the watcher cannot update it")
        opts = GeneratorOptions.from_dict(generator_user_config(app, self.deployment))
        alias_version = resolve_version(self.tracking_uri, opts.registered_model, opts.alias)
        self.state.update(checks=self.state["checks"] + 1, alias_version=alias_version,
                          config_version=opts.version or None, last_check=time.time())
        if alias_version != opts.version:
            logger.info("ChampionWatcher: %s@%s is v%s, user_config had %r: updating", opts.registered_model,
                        opts.alias, alias_version, opts.version)
            update_generator_config(self.app_name, self.deployment, version=alias_version)
            self.state["updates"] += 1
            self.state["config_version"] = alias_version
            entry = {"version": alias_version, "at": time.time()}
            self.state["history"] = (self.state["history"] + [entry])[-20:]
        return dict(self.state)

    def status(self) -> dict:
        return dict(self.state)
