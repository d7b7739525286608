"""Register a trained tokenizer + AR pair: `<name>-tokenizer` and `<name>-generator` (the pyfunc).

    detailflow registry register --name smoke --ar <AR run name | run id | s3://.../export> \
        [--tokenizer <tokenizer run name | run id | s3://.../export>]

    from detailflow.pipelines.registry.register import register
    out = register(settings, "smoke", ar="ar-smoke-2026-11-28-1a2b3c4d")
    out["generator_version"], out["tokenizer_version"], out["created"]

Where each part comes from:
  * a reference is resolved to its training run when MLflow knows one (by run id, by the
    deterministic run name, or by the export's config.json "run_name") and to its S3 export
    (the run's tag detailflow.export.uri, else runs/<run>/export); without --tokenizer, the AR
    export's own config names the tokenizer it was trained on (a different one is refused);
  * `<name>-tokenizer`: registered from the tokenizer run's logged export model (source = the
    training run) when the training stage logged it; otherwise the export is logged here first;
  * `<name>-generator`: no training run owns both parts, so the bundle is logged on a registration
    run (experiment "detailflow-registry") whose tags link both training runs and both exports.
Lineage: both versions carry detailflow.lineage.* tags read from the training runs' logged
configs: the dataset and its version, the code version, and the upstream training run ids
(`detailflow registry show NAME/VERSION` prints them).
Versions carry the sha256 of what they bundle; registering the same pair again returns the
existing versions (created False), so a resubmitted pipeline does not pile up copies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
from pathlib import Path

from detailflow.models.export import CONFIG_NAME, WEIGHTS_NAME, read_config
from detailflow.platform.registry import Registry, generator_name, tokenizer_name

EXPERIMENT = "detailflow-registry"
EXPORT_URI_TAG = "detailflow.export.uri"  # on training runs, written by tracking.Tracker.log_export
EXPORT_MODEL_TAG = "detailflow.export.model_uri"  # ditto: "models:/<model_id>" of the logged export
BUNDLE_TAG = "detailflow.bundle_sha256"  # on generator versions: sha256 over both exports
WEIGHTS_TAG = "detailflow.weights_sha256"  # on tokenizer versions: sha256 of model.safetensors
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclasses.dataclass
class ExportRef:
    kind: str  # "tokenizer" | "ar"
    export_uri: str  # s3://<bucket>/<key> of the export folder
    directory: Path  # local copy of model.safetensors + config.json
    config: dict  # the export's config.json
    sha256: str  # of model.safetensors
    config_sha256: str  # of config.json
    run_id: str | None  # the training run, when MLflow knows it
    model_uri: str | None  # that run's logged export model, when the stage logged one


def _sha(path: Path) -> str:
    from detailflow.platform.storage import sha256_file

    return sha256_file(path)


def _find_run(client, ref: str):
    from mlflow.exceptions import MlflowException

    from detailflow.platform.tracking import find_run_id

    if ref.startswith("s3://") or "/" in ref:
        return None
    if _RUN_ID.match(ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            pass
    run_id = find_run_id(client, ref)
    return client.get_run(run_id) if run_id else None


def resolve_ref(client, storage, ref: str, kind: str, directory) -> ExportRef:
    """A run id, run name, s3:// URI or key -> ExportRef with the export downloaded into directory."""
    from detailflow.pipelines.train.exports import download_export, export_prefix, resolve_export
    from detailflow.platform.tracking import RUN_NAME_TAG

    run = _find_run(client, ref)
    if run is not None:
        tags = run.data.tags
        ref = tags.get(EXPORT_URI_TAG) or export_prefix(tags.get(RUN_NAME_TAG) or run.info.run_name)
    key, _ = resolve_export(storage, ref)
    directory = download_export(storage, key, directory)
    config = read_config(directory)
    if config.get("kind") != kind:
        raise ValueError(f"{storage.uri(key)} is a {config.get('kind')!r} export, expected {kind!r}")
    if run is None and config.get("run_name"):
        run = _find_run(client, str(config["run_name"]))
    uri = storage.uri(key)
    model_uri = None
    if run is not None and run.data.tags.get(EXPORT_URI_TAG, "").rstrip("/") == uri:
        model_uri = run.data.tags.get(EXPORT_MODEL_TAG)
    return ExportRef(kind, uri, directory, config, _sha(directory / WEIGHTS_NAME),
                     _sha(directory / CONFIG_NAME), run.info.run_id if run is not None else None, model_uri)


def _registration_run(client, name: str, bundle: str, tok: ExportRef, ar: ExportRef) -> str:
    from detailflow.platform.tracking import RUN_NAME_TAG, find_run_id

    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    run_name = f"register-{name}-{bundle[:8]}"
    run_id = find_run_id(client, run_name, [exp_id])  # a crashed registration is reused
    if run_id is None:
        tags = {RUN_NAME_TAG: run_name, BUNDLE_TAG: bundle, "detailflow.registered_name": name,
                "detailflow.tokenizer.export_uri": tok.export_uri, "detailflow.ar.export_uri": ar.export_uri,
                **({"detailflow.tokenizer.run_id": tok.run_id} if tok.run_id else {}),
                **({"detailflow.ar.run_id": ar.run_id} if ar.run_id else {})}
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    return run_id


def _part_tags(prefix: str, ref: ExportRef) -> dict:
    tags = {f"{prefix}.export_uri": ref.export_uri, f"{prefix}.sha256": ref.sha256,
            f"{prefix}.config_sha256": ref.config_sha256}
    if ref.run_id:
        tags[f"{prefix}.run_id"] = ref.run_id
    return tags


LINEAGE_PREFIX = "detailflow.lineage."


def lineage_tags(client, tok: ExportRef, ar: ExportRef) -> dict:
    """Dataset + version, code version and upstream run ids, from the training runs' params."""
    def params(ref):
        return client.get_run(ref.run_id).data.params if ref.run_id else {}

    tp, ap = params(tok), params(ar)

    def known(v):
        return v not in (None, "", "None")

    code = ap.get("code_version") if known(ap.get("code_version")) else tp.get("code_version")
    out = {"dataset": tp.get("dataset"), "dataset_version": tp.get("dataset_version"), "code_version": code,
           "tokenizer_run_id": tok.run_id, "ar_run_id": ar.run_id,
           "codes_version": ap.get("codes_version") or tok.config.get("run_name"),
           "upstream_runs": json.dumps({"tokenizer": tok.run_id, "ar": ar.run_id})}
    return {LINEAGE_PREFIX + k: str(v) if known(v) else "unknown" for k, v in out.items()}


def register(settings, name: str, ar: str, tokenizer: str | None = None) -> dict:
    """Register `<name>-tokenizer` and `<name>-generator`; see the module docstring. Returns
    {generator, generator_version, tokenizer, tokenizer_version, registration_run_id, created}."""
    from detailflow.platform.pyfunc_generator import check_pair
    from detailflow.platform.storage import Storage
    from detailflow.platform.tracking import Tracker

    reg, storage = Registry(settings.mlflow_tracking_uri), Storage(settings)
    gen_model, tok_model = generator_name(name), tokenizer_name(name)
    with tempfile.TemporaryDirectory(prefix="df-register-") as d:
        ar_ref = resolve_ref(reg.client, storage, ar, "ar", Path(d) / "ar")
        trained_on = str(ar_ref.config.get("tokenizer") or "").rstrip("/")
        if not (tokenizer or trained_on):
            raise ValueError(f"{ar_ref.export_uri} does not name its tokenizer; pass --tokenizer")
        tok_ref = resolve_ref(reg.client, storage, tokenizer or trained_on, "tokenizer", Path(d) / "tok")
        if trained_on and trained_on != tok_ref.export_uri:
            raise ValueError(f"the AR model {ar_ref.export_uri} was trained on the codes of {trained_on}, "
                             f"not of {tok_ref.export_uri}; register it with the tokenizer it was trained on")
        check_pair(tok_ref.config["tokenizer"], ar_ref.config["ar"])
        bundle = hashlib.sha256(":".join([tok_ref.sha256, tok_ref.config_sha256, ar_ref.sha256,
                                          ar_ref.config_sha256]).encode()).hexdigest()
        reg.ensure_model(gen_model, "generator", "DetailFlow tokenizer + AR model as one pyfunc: class ids "
                         "-> uint8 images. Promote with `detailflow registry promote`.")
        reg.ensure_model(tok_model, "tokenizer", "DetailFlow 1D tokenizer export (images <-> codes).")
        tok_version = reg.find_version(tok_model, WEIGHTS_TAG, tok_ref.sha256)
        gen_version = reg.find_version(gen_model, BUNDLE_TAG, bundle)
        created = gen_version is None
        lineage = lineage_tags(reg.client, tok_ref, ar_ref)
        run_id = None
        if tok_version is None or gen_version is None:
            run_id = _registration_run(reg.client, name, bundle, tok_ref, ar_ref)
        if tok_version is None:
            source = tok_ref.model_uri
            if source is None:  # the training stage did not log its export: log it here
                tracker = Tracker.attach(settings.mlflow_tracking_uri, run_id)
                source = "models:/" + tracker.log_export(str(tok_ref.directory), tok_ref.config,
                                                         uri=tok_ref.export_uri, storage=storage)
            tok_version = reg.create_version(tok_model, source, tags={
                WEIGHTS_TAG: tok_ref.sha256, **_part_tags("detailflow.tokenizer", tok_ref), **lineage})
        if gen_version is None:
            tags = {BUNDLE_TAG: bundle, "detailflow.registration_run_id": run_id,
                    "detailflow.tokenizer.version": tok_version,
                    "detailflow.model": ar_ref.config.get("model", ""), **lineage,
                    **_part_tags("detailflow.tokenizer", tok_ref), **_part_tags("detailflow.ar", ar_ref)}
            model_id = reg.log_generator_model(tok_ref.directory, ar_ref.directory, run_id=run_id, tags=tags,
                                               storage=storage)
            gen_version = reg.create_version(gen_model, f"models:/{model_id}", tags=tags, description=(
                f"tokenizer {tok_ref.export_uri} + AR {ar_ref.export_uri}"))
        if run_id is not None:
            reg.client.set_tag(run_id, "detailflow.generator.version", gen_version)
            reg.client.set_tag(run_id, "detailflow.tokenizer.version", tok_version)
            reg.client.set_terminated(run_id, "FINISHED")
    return {"generator": gen_model, "generator_version": gen_version, "tokenizer": tok_model,
            "tokenizer_version": tok_version, "registration_run_id": run_id, "created": created,
            "tokenizer_export": tok_ref.export_uri, "ar_export": ar_ref.export_uri}
