"""MLflow model-registry adapter: the generator pyfunc, versions, aliases, tags, the promotion lock,
the champion history and rollback. Policy (what gets evaluated, the gate) lives in
pipelines/registry/promote.py; this module only talks to MLflow.

    reg = Registry(settings.mlflow_tracking_uri)
    model_id = log_generator(tok_dir, ar_dir, run_id=run_id, tags={...})     # pyfunc on a run
    mv = reg.create_version(generator_name("smoke"), f"models:/{model_id}", tags={...})
    gen = load_generator("models:/smoke-generator@champion")     # thread-safe pyfunc load
    reg.champion("smoke-generator")                  # "3" or None (read from the model, never search)
    with reg.lock("smoke-generator"):                # server-side mutex: compare-and-set of the alias
        if reg.champion("smoke-generator") == expected:
            reg.move_champion("smoke-generator", "4", by="promote", reason="fid 12.1 < 13.0")
    reg.rollback("smoke-generator", reason="artefacts in class 7")   # previous champion back

Names: `<name>-generator` (tokenizer + AR pyfunc) and `<name>-tokenizer`. Aliases `champion` and
`challenger`. The champion history is a JSON list in the registered model's tag
detailflow.champion.history (oldest first); rollback pops the current champion off it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

CHAMPION, CHALLENGER = "champion", "challenger"
KIND_TAG = "detailflow.kind"  # on registered models: "generator" | "tokenizer"
HISTORY_TAG = "detailflow.champion.history"  # JSON [{version, at, by, reason}], oldest first
LAST_ROLLBACK_TAG = "detailflow.champion.last_rollback"  # JSON {from, to, at, reason}
_LOAD_LOCK = threading.Lock()  # see load_generator
LOCK_SUFFIX = ".promotion-lock"  # registered model used as a mutex (its name is unique server-side)
MAX_HISTORY = 50  # entries kept (a tag value holds at most ~5000 characters)
MAX_TAG_LEN = 5000


class RegistryError(RuntimeError):
    """A registry operation cannot proceed (no champion to roll back to, lock not acquired, ...)."""


def generator_name(name: str) -> str:
    return f"{name}-generator"


def tokenizer_name(name: str) -> str:
    return f"{name}-tokenizer"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def tag_json(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    if len(text) > MAX_TAG_LEN:
        raise ValueError(f"tag value of {len(text)} characters exceeds {MAX_TAG_LEN}")
    return text


# ---- the generator pyfunc ----------------------------------------------------------------------
# What the pyfunc imports, pinned to the installed versions (export_model.export_requirements).
GENERATOR_PACKAGES = ("mlflow", "torch", "safetensors", "einops", "numpy")


def generator_signature(tok_config: dict, ar_config: dict):
    """class ids (-1,) int64 -> images (-1, 3, -1, -1) uint8 (R x R with all tokens); the params."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    params = [ParamSpec("seed", "long", 0), ParamSpec("cfg_scale", "double", 1.5),
              ParamSpec("num_tokens", "long", 0), ParamSpec("temperature", "double", 1.0),
              ParamSpec("top_k", "long", 0), ParamSpec("top_p", "double", 1.0)]
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.int64), (-1,), "class_ids")]),
                          outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, -1, -1), "images")]),
                          params=ParamSchema(params))


def bundle_model_code(directory) -> str:
    """Copy `detailflow/__init__.py` + `detailflow/models/` (pure torch) into directory/detailflow;
    logged as code_paths, so the pyfunc loads where the package is not installed."""
    import detailflow

    src = Path(detailflow.__file__).parent
    dst = Path(directory) / "detailflow"
    (dst / "models").mkdir(parents=True)
    shutil.copy2(src / "__init__.py", dst / "__init__.py")
    for f in sorted((src / "models").glob("*.py")):
        shutil.copy2(f, dst / "models" / f.name)
    return str(dst)


def log_generator(tok_dir, ar_dir, *, run_id: str, tracking_uri: str, tags: dict | None = None,
                  storage=None) -> str:
    """Log the generator pyfunc (artefacts: both export folders, their weights published to S3 and
    linked, tracking_links.py: no weight byte goes through the tracking server) on `run_id`;
    returns the model id. The run's status is left as it was."""
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    from detailflow.models.export import read_config
    from detailflow.platform import export_model, pyfunc_generator
    from detailflow.platform.storage import configured_storage
    from detailflow.platform.tracking_links import link_export

    storage = configured_storage(storage)

    tok_config, ar_config = read_config(tok_dir), read_config(ar_dir)
    pyfunc_generator.check_pair(tok_config["tokenizer"], ar_config["ar"])
    client = MlflowClient(tracking_uri)
    status = client.get_run(run_id).info.status
    from detailflow.platform.tracking import fluent_run

    with tempfile.TemporaryDirectory(prefix="df-gen-code-") as code, fluent_run(tracking_uri, run_id):
        links = {k: str(link_export(storage, src, f"{code}/links/{k}")) for k, src in
                 (("tokenizer", tok_dir), ("ar", ar_dir))}
        info = mlflow.pyfunc.log_model(
            name="generator", python_model=pyfunc_generator.__file__, artifacts=links,
            code_paths=[bundle_model_code(code)], signature=generator_signature(tok_config, ar_config),
            pip_requirements=export_model.export_requirements(GENERATOR_PACKAGES),
            model_type="detailflow-generator",
            tags={KIND_TAG: "generator", **{k: str(v) for k, v in (tags or {}).items()}})
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)
    return info.model_id


def load_generator(model_uri: str, device: str | None = None):
    """mlflow.pyfunc.load_model, serialised within this process. MLflow loads a models-from-code
    file through one process-global slot (mlflow.models.model.__mlflow_model__), so two threads
    loading at once can be handed the same instance and load both models into it (a concurrent
    evaluation would then score the wrong version). Use this wherever threads may load."""
    import mlflow

    with _LOAD_LOCK:
        return mlflow.pyfunc.load_model(model_uri, model_config={"device": device} if device else None)


# ---- versions, aliases, tags, lock, history ------------------------------------------------------
class Registry:
    """Thin, explicit wrapper over MlflowClient for the registry operations the platform needs."""

    def __init__(self, tracking_uri: str, client=None):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = client or MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # -- models and versions
    def log_generator_model(self, tok_dir, ar_dir, *, run_id: str, tags: dict | None = None,
                            storage=None) -> str:
        """log_generator on this registry's server; returns the logged model's id."""
        return log_generator(tok_dir, ar_dir, run_id=run_id, tracking_uri=self.tracking_uri, tags=tags,
                             storage=storage)

    def ensure_model(self, model: str, kind: str, description: str = "") -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(model, tags={KIND_TAG: kind}, description=description)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def create_version(self, model: str, source: str, *, run_id: str | None = None,
                       tags: dict | None = None, description: str = "") -> str:
        """A new version of `model` from `source` (e.g. "models:/<model_id>"); returns its number."""
        model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
        if model_id and run_id is None:  # a logged model: its run is the version's run
            run_id = self.client.get_logged_model(model_id).source_run_id
        mv = self.client.create_model_version(model, source, run_id=run_id, model_id=model_id,
                                              tags={k: str(v) for k, v in (tags or {}).items()},
                                              description=description)
        return str(mv.version)

    def find_version(self, model: str, tag: str, value: str) -> str | None:
        """The oldest version of `model` whose tag `tag` equals `value` (None if none or no model)."""
        found = self.client.search_model_versions(f"name = '{model}' AND tags.`{tag}` = '{value}'")
        return str(min(int(v.version) for v in found)) if found else None

    def version(self, model: str, version: str):
        return self.client.get_model_version(model, str(version))

    def version_tags(self, model: str, version: str) -> dict[str, str]:
        return dict(self.version(model, version).tags)

    def set_version_tags(self, model: str, version: str, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(model, str(version), key, value if isinstance(value, str)
                                              else tag_json(value))

    def versions(self, model: str) -> list:
        """Every version of `model`, newest first."""
        found = list(self.client.search_model_versions(f"name = '{model}'"))
        return sorted(found, key=lambda v: -int(v.version))

    def models(self) -> list:
        """Registered models of this platform (tag detailflow.kind), locks excluded."""
        out, token = [], None
        while True:
            page = self.client.search_registered_models(page_token=token)
            out += [m for m in page if KIND_TAG in (m.tags or {}) and not m.name.endswith(LOCK_SUFFIX)]
            token = page.token
            if not token:
                return sorted(out, key=lambda m: m.name)

    # -- aliases: always read from the registered model itself (search results omit them, mlflow#16734)
    def aliases(self, model: str) -> dict[str, str]:
        return {k: str(v) for k, v in self.client.get_registered_model(model).aliases.items()}

    def alias(self, model: str, alias: str) -> str | None:
        return self.aliases(model).get(alias)

    def champion(self, model: str) -> str | None:
        return self.alias(model, CHAMPION)

    def set_alias(self, model: str, alias: str, version: str, attempts: int = 6) -> None:
        """Point `alias` at `version`. MLflow's SQL store inserts a new alias row without an upsert,
        so two callers setting the same new alias at once collide on its unique key (seen: two
        promotions tagging `challenger`); the loser retries and then finds the row to update."""
        from mlflow.exceptions import MlflowException

        for attempt in range(attempts):
            try:
                self.client.set_registered_model_alias(model, alias, str(version))
                return
            except MlflowException as exc:
                text = str(exc).lower()
                if attempt == attempts - 1 or not ("unique constraint" in text or "integrityerror" in text):
                    raise
                time.sleep(0.05 * (attempt + 1))

    def delete_alias_if(self, model: str, alias: str, version: str) -> None:
        """Remove `alias` only while it still points at `version` (call under the lock)."""
        if self.alias(model, alias) == str(version):
            self.client.delete_registered_model_alias(model, alias)

    # -- the mutex: a registered model's name is unique in the registry's database, so creating it
    # succeeds for exactly one caller. It is held only around re-read + move (well under a second).
    @contextlib.contextmanager
    def lock(self, model: str, *, wait_s: float = 120.0, ttl_s: float = 60.0) -> Iterator[str]:
        from mlflow.exceptions import MlflowException

        name, token = model + LOCK_SUFFIX, uuid.uuid4().hex
        deadline, delay = time.monotonic() + wait_s, 0.05
        while True:
            try:
                self.client.create_registered_model(
                    name, tags={"detailflow.lock.owner": token, "detailflow.lock.host": os.uname().nodename,
                                "detailflow.lock.expires": str(time.time() + ttl_s)},
                    description=f"promotion lock of {model}; deleted when the decision is written")
                break
            except MlflowException as exc:
                # RESOURCE_DOES_NOT_EXIST: the insert met the holder's row, and the server, reading that
                # row back to word its "already exists", found it deleted by the holder's release in
                # between (seen in the full suite: 3 threads x 3 acquisitions). Free now: try again.
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                    raise
            self._break_if_stale(name)
            if time.monotonic() > deadline:
                raise RegistryError(f"could not acquire {name} within {wait_s:.0f} s (another promotion?)")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        try:
            yield token
        finally:
            with contextlib.suppress(MlflowException):
                if self.client.get_registered_model(name).tags.get("detailflow.lock.owner") == token:
                    self.client.delete_registered_model(name)

    def _break_if_stale(self, name: str) -> None:
        """A holder that died inside the critical section leaves the lock behind: past its expiry
        time it is deleted (and re-checked first, so a fresh holder is never removed)."""
        from mlflow.exceptions import MlflowException

        try:
            tags = self.client.get_registered_model(name).tags
            if float(tags.get("detailflow.lock.expires", "inf")) < time.time():
                again = self.client.get_registered_model(name).tags
                if again.get("detailflow.lock.owner") == tags.get("detailflow.lock.owner"):
                    self.client.delete_registered_model(name)
        except MlflowException:
            pass  # released meanwhile

    # -- champion history and moves (call under the lock)
    def history(self, model: str) -> list[dict]:
        return json.loads(self.client.get_registered_model(model).tags.get(HISTORY_TAG, "[]"))

    def _write_history(self, model: str, history: list[dict]) -> None:
        history = history[-MAX_HISTORY:]
        while len(text := tag_json(history)) > MAX_TAG_LEN:
            history = history[1:]
        self.client.set_registered_model_tag(model, HISTORY_TAG, text)

    def move_champion(self, model: str, version: str, *, by: str, reason: str) -> None:
        """Point `champion` at `version` and append it to the history."""
        self.set_alias(model, CHAMPION, version)
        history = self.history(model)
        history.append({"version": str(version), "at": now_iso(), "by": by, "reason": reason[:300]})
        self._write_history(model, history)

    def rollback(self, model: str, *, reason: str, to: str | None = None) -> dict:
        """Move `champion` back to the previous champion (or to version `to`, which must have been
        champion before) and record why on both versions and on the model. Returns {from, to}."""
        if not reason.strip():
            raise RegistryError("a rollback needs a reason (it is recorded on the versions)")
        with self.lock(model):
            current = self.champion(model)
            if current is None:
                raise RegistryError(f"{model} has no champion to roll back")
            history = self.history(model)
            while history and history[-1]["version"] == current:
                history.pop()
            if to is not None:
                while history and history[-1]["version"] != str(to):
                    history.pop()
            if not history:
                raise RegistryError(f"{model}: no previous champion to roll back to"
                                    + (f" (version {to} was never champion before {current})" if to else ""))
            target, at = history[-1]["version"], now_iso()
            self.set_alias(model, CHAMPION, target)
            self._write_history(model, history)
            record = {"from": current, "to": target, "at": at, "reason": reason}
            self.client.set_registered_model_tag(model, LAST_ROLLBACK_TAG, tag_json(record))
            self.set_version_tags(model, current, {"detailflow.rollback.at": at,
                                                   "detailflow.rollback.reason": reason[:MAX_TAG_LEN],
                                                   "detailflow.rollback.restored": target})
            self.set_version_tags(model, target, {"detailflow.restored.at": at,
                                                  "detailflow.restored.reason": reason[:MAX_TAG_LEN],
                                                  "detailflow.restored.from": current})
            return record
