"""An export's bytes are stored once on the real local S3 (platform/export_store.py): training's upload,
the MLflow link and a second run with the same weights all land on one exports/<digest>/ prefix; the
run's address runs/<run>/export holds only a pointer, and every reader goes through it (checked
against the sha256s it lists). An export written before pointers existed still loads."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration


def objects_with_bytes(storage, data: bytes) -> list[str]:
    """Every key in the bucket whose object is exactly `data` (listed, same size, then compared)."""
    pages = storage.client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket)
    same_size = [o["Key"] for page in pages for o in page.get("Contents", []) if o["Size"] == len(data)]
    read = lambda k: storage.client.get_object(Bucket=storage.bucket, Key=k)["Body"].read()  # noqa: E731
    return [k for k in same_size if read(k) == data]


def _ar(seed: int):
    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.configs import get_model_config

    cfg = dataclasses.replace(get_model_config("smoke").ar, dim=64, depth=1, heads=2)
    torch.manual_seed(seed)
    return DetailFlowGPT(cfg).eval(), cfg


def test_an_export_is_stored_once_and_read_through_its_pointer(services, storage, tmp_path):
    from detailflow.models.export import WEIGHTS_NAME
    from detailflow.pipelines.runner.stages import StageContext, _export_exists
    from detailflow.pipelines.train.exports import download_export, export_config, export_prefix, load_ar
    from detailflow.platform.checkpoints import uploaded_export
    from detailflow.platform.export_store import POINTER_NAME, export_content, pointer_key
    from detailflow.platform.storage import ChecksumMismatch
    from detailflow.platform.tracking import Tracker

    tag = uuid.uuid4().hex[:8]
    net, cfg = _ar(int(tag, 16))  # weights no other test wrote
    runs = [f"store-{tag}-a", f"store-{tag}-b"]
    tracker = Tracker.start(services.mlflow_tracking_uri, experiment=f"export-store-{tag}", run_name=runs[0])
    for run in runs:  # a second export of the same files (a resubmitted run, a re-import)
        export_cfg = {"kind": "ar", "model": "smoke", "run_name": runs[0], "ar": dataclasses.asdict(cfg)}
        address = export_prefix(run)
        with uploaded_export(storage, net, export_cfg, address) as d:
            weights = Path(d, WEIGHTS_NAME).read_bytes()
            if run == runs[0]:  # what training does: the export logged on its MLflow run (a link to S3)
                tracker.log_export(d, export_cfg, uri=storage.uri(address), step=1, storage=storage)
    tracker.finish()

    (key,) = objects_with_bytes(storage, weights)  # once in the whole bucket
    prefix, files = export_content(storage, export_prefix(runs[0]))
    assert key == f"{prefix}/{WEIGHTS_NAME}" and prefix.startswith("exports/")
    assert export_content(storage, export_prefix(runs[1]))[0] == prefix
    weights_uri = tracker.client.get_run(tracker.run_id).data.tags["detailflow.export.weights_uri"]
    assert weights_uri == storage.uri(key)  # the MLflow link names the same object
    for run in runs:  # the run's address holds the pointer only
        assert storage.list_keys(export_prefix(run) + "/") == [pointer_key(export_prefix(run))]
    assert storage.read_manifest(prefix)["files"] == files

    # every reader goes through the pointer
    got = download_export(storage, export_prefix(runs[1]), tmp_path / "dl")
    assert (got / WEIGHTS_NAME).read_bytes() == weights
    assert export_config(storage, export_prefix(runs[1]))["ar"] == dataclasses.asdict(cfg)
    model, _, uri = load_ar(storage, runs[1])
    assert uri == storage.uri(export_prefix(runs[1]))  # the address stays the name
    for (name, a), b in zip(model.state_dict().items(), net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    ctx = StageContext(services, "p", "s", "id", {})
    assert _export_exists({"export_uri": storage.uri(export_prefix(runs[0]))}, ctx)
    assert not _export_exists({"export_uri": storage.uri(f"runs/store-{tag}-none/export")}, ctx)
    # ... and checks what it reads against the sha256 the pointer lists
    pointer = storage.get_json(pointer_key(export_prefix(runs[1])))
    pointer["files"][WEIGHTS_NAME]["sha256"] = "0" * 64
    storage.put_json(f"{export_prefix(runs[1])}/{POINTER_NAME}", pointer)
    with pytest.raises(ChecksumMismatch):
        download_export(storage, export_prefix(runs[1]), tmp_path / "bad")


def test_an_export_written_before_pointers_still_loads(storage, tmp_path):
    from detailflow.models.export import CONFIG_NAME, WEIGHTS_NAME, save_pretrained
    from detailflow.pipelines.train.exports import export_config, export_prefix, load_ar, resolve_export

    run = f"store-old-{uuid.uuid4().hex[:8]}"
    net, cfg = _ar(1)
    export_cfg = {"kind": "ar", "model": "smoke", "run_name": run, "ar": dataclasses.asdict(cfg)}
    save_pretrained(net, export_cfg, tmp_path)
    for name in (WEIGHTS_NAME, CONFIG_NAME):  # the layout every run had before export_store.py
        storage.upload_file(tmp_path / name, f"{export_prefix(run)}/{name}")
    assert resolve_export(storage, run) == (export_prefix(run), run)
    assert export_config(storage, export_prefix(run))["run_name"] == run
    model, _, _ = load_ar(storage, storage.uri(export_prefix(run)))
    torch.testing.assert_close(model.state_dict(), net.state_dict(), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no export at"):
        resolve_export(storage, f"{run}-missing")
