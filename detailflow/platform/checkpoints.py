"""DeepSpeed checkpoints through Ray Train, resume, and the consolidated (safetensors) export.

Usage (inside a train loop, all ranks):
    state = checkpoints.restore(engines, checkpoints.resume_checkpoint(config))   # {} when fresh
    ...
    checkpoints.save_and_report(engines, metrics, client_state={"step": step, ...}, config=config)

    # driver, after fit():
    checkpoints.export_consolidated(result_checkpoint, build_model, model_config, storage, key_prefix)

Layout of one checkpoint folder: `<tag>/...` per engine (DeepSpeed's files, every rank's shards merged
by Ray), `latest`, and `client_state.json` (step, data position, MLflow run id, resolved config).
`resume_from_checkpoint` raises in Ray Train V2, so a resubmitted run finds its latest checkpoint
in its own storage path (find_latest) and passes it in train_loop_config["resume_checkpoint"].
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

CLIENT_STATE_FILE = "client_state.json"
_CKPT_DIR = re.compile(r"^checkpoint_(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}\.\d+)$")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def save_and_report(engines: dict[str, Any], metrics: dict, *, client_state: dict, config: dict,
                    extra_files: dict[str, bytes] | None = None) -> None:
    """All ranks: save every engine under its tag, then report the folder to Ray Train.

    extra_files (name -> bytes, e.g. EMA weights) are written by rank 0 next to client_state.json.

    In-process runs (config["_in_process"]) have no Ray storage sync: the folder is copied to the
    run's storage path here, so resume works the same way."""
    import ray.train

    tmpdir = tempfile.mkdtemp(prefix="df-ckpt-")
    try:
        for tag, engine in engines.items():
            engine.save_checkpoint(tmpdir, tag=tag, client_state=client_state)
        if _rank() == 0:
            for name, data in (extra_files or {}).items():
                with open(os.path.join(tmpdir, name), "wb") as f:
                    f.write(data)
            with open(os.path.join(tmpdir, CLIENT_STATE_FILE), "w") as f:  # last: marks completeness
                json.dump(client_state, f, default=str)
        _barrier()
        checkpoint = ray.train.Checkpoint.from_directory(tmpdir)
        if config.get("_in_process"):
            checkpoint = _persist_in_process(tmpdir, config)
        ray.train.report(metrics, checkpoint=checkpoint)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _persist_in_process(local_dir: str, config: dict):
    """Copy a checkpoint to <storage_path>/<run_name>/checkpoint_<time> (what Ray does for workers)."""
    import datetime as dt

    import pyarrow.fs as pafs
    import ray.train

    fs = _storage_fs(config)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
    dest = f"{config['_storage_path']}/{config['_run_name']}/checkpoint_{stamp}"
    pafs.copy_files(local_dir, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return ray.train.Checkpoint(dest, filesystem=fs)


def _storage_fs(config: dict):
    from detailflow.platform.storage import Storage

    return Storage(config["_settings"]).filesystem()


def find_latest(fs, storage_path: str, run_name: str):
    """The newest complete checkpoint folder of a run in storage, or None."""
    import pyarrow.fs as pafs
    import ray.train

    base = f"{storage_path}/{run_name}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return None
    dirs = sorted(i.path for i in infos
                  if i.type == pafs.FileType.Directory and _CKPT_DIR.match(i.base_name))
    for path in reversed(dirs):  # a folder without client_state.json was cut off mid-upload
        if fs.get_file_info(f"{path}/{CLIENT_STATE_FILE}").type == pafs.FileType.File:
            return ray.train.Checkpoint(path, filesystem=fs)
    return None


def resume_checkpoint(config: dict):
    """The newest of: Ray's latest checkpoint, the newest complete one in the run's storage folder, the
    one found at submit time. Storage is checked too because a worker that dies right after a report
    can beat the controller's registration of that checkpoint."""
    import ray.train

    candidates = [ray.train.get_checkpoint(), config.get("resume_checkpoint")]
    if config.get("_settings") is not None and config.get("_run_name"):
        candidates.append(find_latest(_storage_fs(config), config["_storage_path"], config["_run_name"]))
    found = [c for c in candidates if c is not None]
    return max(found, key=lambda c: c.path.rstrip("/").rsplit("/", 1)[-1]) if found else None


def restore(engines: dict[str, Any], checkpoint) -> dict:
    """Load every engine from `checkpoint` (None -> fresh start); returns the client_state."""
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as d:
        for tag, engine in engines.items():
            path, _ = engine.load_checkpoint(d, tag=tag)
            if path is None:
                raise RuntimeError(f"checkpoint {checkpoint.path} has no DeepSpeed tag {tag!r}")
        with open(os.path.join(d, CLIENT_STATE_FILE)) as f:
            return json.load(f)


def read_client_state(checkpoint) -> dict:
    with checkpoint.as_directory() as d, open(os.path.join(d, CLIENT_STATE_FILE)) as f:
        return json.load(f)


def consolidated_state_dict(checkpoint, tag: str = "ds", strip_prefix: str = "model.") -> dict:
    """fp32 full weights from any ZeRO stage's shards (ZeRO-3 partitions gathered).

    strip_prefix removes the StepAdapter's "model." so the keys match the bare module."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with checkpoint.as_directory() as d:
        state = get_fp32_state_dict_from_zero_checkpoint(d, tag=tag)
    n = len(strip_prefix)
    strip = lambda k: k[n:] if strip_prefix and k.startswith(strip_prefix) else k
    return {strip(k): v.detach().clone().float().contiguous() for k, v in state.items()}


def export_consolidated(checkpoint, build_model, model_config: dict, storage, key_prefix: str,
                        tag: str = "ds") -> str:
    """Consolidate, load into a fresh module (strict), save_pretrained, upload under key_prefix.

    Returns the S3 URI of the export folder (model.safetensors + config.json)."""
    from detailflow.models.export import save_pretrained

    model = build_model()
    model.load_state_dict(consolidated_state_dict(checkpoint, tag=tag), strict=True)
    with tempfile.TemporaryDirectory(prefix="df-export-") as d:
        save_pretrained(model, model_config, d)
        for name in sorted(os.listdir(d)):
            storage.upload_file(os.path.join(d, name), f"{key_prefix}/{name}")
    return storage.uri(key_prefix)
