"""DeepSpeed checkpoints through Ray Train, trustworthy resume, and the consolidated (safetensors) export.

Usage (inside a train loop, all ranks):
    state = checkpoints.restore(engines, checkpoints.resume_checkpoint(config))   # {} when fresh
    ...
    uri = checkpoints.save_and_report(engines, metrics, client_state={"step": n, ...}, config=config,
                                      tracker=tracker)   # rank 0's tracker records it in MLflow

    # driver, after fit():
    state = checkpoints.read_client_state(ckpt)         # one small JSON, no shard is downloaded
    checkpoints.export_consolidated(ckpt, build_model, model_config, storage, key_prefix, tracker=...)

Layout of one checkpoint folder (its name is ours, `checkpoint_step<step>_<time>`, not Ray's default):
`<tag>/...` per engine (DeepSpeed's files, every rank's shards merged by Ray), `latest`,
`client_state.json` (step, data position, MLflow run id, resolved config), per-rank extra files,
and `_complete/rank-<r>.json`: written by rank r AFTER its own files are in storage (our upload
function orders them), listing those files with their sizes and the world size.

Which checkpoint to resume from (`resume_checkpoint`):
  * under Ray Train, `ray.train.get_checkpoint()`: Ray registers a checkpoint only after every rank
    reported it, and V2 restores its checkpoint manager from the run folder on resubmission;
  * the storage scan (`find_latest`; in-process runs, the driver at submit time, and a newer
    checkpoint whose registration a dying worker beat), which accepts a folder only when every rank
    0..W-1 left its marker and every file a marker lists is in storage with its size; the highest
    step wins. A worker that died mid-upload, or a folder half-deleted by `num_to_keep`, is never
    resumed from. Folder names are never parsed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
from typing import Any

CLIENT_STATE_FILE = "client_state.json"
MARKER_DIR = "_complete"  # one completion marker per rank: _complete/rank-<r>.json

# Tokenizer fields only training reads, some naming files (s3:// or a node's path) that a serving box or
# a downstream stage does not have: the inference export sets them so that building the tokenizer
# touches no teacher / perceptual / discriminator network and no encoder init, and the align head
# (which only feeds the training-only teacher loss) is not built; its weights are dropped.
TOKENIZER_TRAINING_ONLY = {
    "align_weight": 0.0, "align_teacher": "none", "align_teacher_path": None, "align_teacher_sha256": None,
    "perceptual_weight": 0.0, "perceptual_net_path": None, "perceptual_net_sha256": None,
    "gan_weight": 0.0, "disc_net_path": None, "disc_net_sha256": None,
    "encoder_init_path": None, "encoder_init_sha256": None, "random_feature_nets": False,
}
TOKENIZER_TRAINING_ONLY_PREFIXES = ("align_head.", "teacher.", "perceptual.")  # state-dict entries


def inference_tokenizer_fields(fields: dict) -> dict:
    """TokenizerConfig fields for inference: the training-only ones switched off (see above)."""
    return {**fields, **{k: v for k, v in TOKENIZER_TRAINING_ONLY.items() if k in fields}}


def inference_state(state: dict) -> dict:
    """A tokenizer state dict without the entries of training-only modules."""
    return {k: v for k, v in state.items() if not k.startswith(TOKENIZER_TRAINING_ONLY_PREFIXES)}


def _dist():
    import torch.distributed as dist

    return dist if dist.is_initialized() and dist.get_world_size() > 1 else None


def _barrier() -> None:
    if (dist := _dist()) is not None:
        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _broadcast(obj):
    """rank 0's value on every rank."""
    if (dist := _dist()) is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def marker_name(rank: int) -> str:
    return f"{MARKER_DIR}/rank-{rank:05d}.json"


def _local_files(local_dir: str) -> dict[str, int]:
    """relative path -> size of every file under local_dir (the marker folder excluded)."""
    files = {}
    for root, _, names in os.walk(local_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            if not rel.startswith(MARKER_DIR + "/"):
                files[rel] = os.path.getsize(path)
    return files


def upload_with_marker(local_dir: str, dest: str, fs, *, rank: int, world: int, step: int):
    """Copy this rank's files to dest, THEN write its completion marker (so a marker in storage
    means this rank's shard is there in full). Returns the ray.train.Checkpoint at dest."""
    import pyarrow.fs as pafs
    import ray.train

    files = _local_files(local_dir)
    fs.create_dir(dest, recursive=True)
    pafs.copy_files(local_dir, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    marker = {"rank": rank, "world_size": world, "step": step, "files": files}
    with fs.open_output_stream(f"{dest}/{marker_name(rank)}") as out:
        out.write(json.dumps(marker).encode())
    return ray.train.Checkpoint(dest, filesystem=fs)


def save_and_report(engines: dict[str, Any], metrics: dict, *, client_state: dict, config: dict,
                    extra_files: dict[str, bytes] | None = None, tracker=None) -> str:
    """All ranks: save every engine under its tag, upload (marker last), report to Ray Train.

    extra_files (name -> bytes) are written by rank 0 next to client_state.json (other ranks' are
    ignored: build them on rank 0 only).
    `metrics` is averaged over the ranks. Rank 0's tracker records the checkpoint (URI, step,
    metrics) in MLflow once every rank's upload has finished. Returns the checkpoint's URI.

    In-process runs (config["_in_process"]) have no Ray storage sync: the folder is uploaded here
    by the same function, so resume works the same way."""
    import ray.train

    from detailflow.platform.deepspeed_glue import mean_over_ranks
    from detailflow.platform.storage import Storage

    rank, world, step = _rank(), _world(), int(client_state["step"])
    metrics = mean_over_ranks(metrics)
    stamp = _broadcast(dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f"))
    dir_name = f"checkpoint_step{step:08d}_{stamp}"
    fs = Storage(config["_settings"]).filesystem()
    dest = f"{config['_storage_path']}/{config['_run_name']}/{dir_name}"
    tmpdir = tempfile.mkdtemp(prefix="df-ckpt-")
    try:
        for tag, engine in engines.items():
            engine.save_checkpoint(tmpdir, tag=tag, client_state=client_state)
        files = {**(extra_files or {}), CLIENT_STATE_FILE: json.dumps(client_state, default=str).encode()} \
            if rank == 0 else {}
        for name, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(tmpdir, name)), exist_ok=True)
            with open(os.path.join(tmpdir, name), "wb") as f:
                f.write(data)
        upload = lambda ckpt, _name: upload_with_marker(ckpt.path, dest, fs, rank=rank, world=world,  # noqa: E731
                                                        step=step)
        if config.get("_in_process"):
            ray.train.report(metrics, checkpoint=upload(ray.train.Checkpoint.from_directory(tmpdir), None))
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmpdir),
                             checkpoint_dir_name=dir_name, checkpoint_upload_fn=upload)
        _barrier()  # every rank's upload (marker included) is done: now MLflow may point at it
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    uri = f"s3://{dest}"
    if tracker is not None:
        tracker.log_checkpoint(uri, step=step, metrics=metrics)
    return uri


def complete_checkpoints(fs, storage_path: str, run_name: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint folder of a run that every rank marked complete, by step.

    One recursive listing of the run folder, plus one small read per marker."""
    import pyarrow.fs as pafs

    base = f"{storage_path}/{run_name}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError:
        return []
    sizes = {i.path: i.size for i in infos if i.type == pafs.FileType.File}
    folders: dict[str, list[str]] = {}
    for path in sizes:
        parent, _, name = path.rpartition("/")
        if parent.endswith("/" + MARKER_DIR) and name.startswith("rank-") and name.endswith(".json"):
            folders.setdefault(parent[: -len(MARKER_DIR) - 1], []).append(path)
    found = []
    for folder, marker_paths in folders.items():
        step = _verified_step(fs, folder, marker_paths, sizes)
        if step is not None:
            found.append((step, folder))
    return sorted(found)


def _verified_step(fs, folder: str, marker_paths: list[str], sizes: dict[str, int]) -> int | None:
    """The folder's step if its markers cover ranks 0..W-1, agree, and all listed files exist."""
    markers = []
    for path in marker_paths:
        try:
            with fs.open_input_stream(path) as f:
                markers.append(json.loads(f.read()))
        except (OSError, ValueError):
            return None
    world = {m.get("world_size") for m in markers}
    steps = {m.get("step") for m in markers}
    if len(world) != 1 or len(steps) != 1:
        return None
    (w,), (step,) = world, steps
    if not isinstance(w, int) or sorted(m.get("rank") for m in markers) != list(range(w)):
        return None
    for m in markers:
        for rel, size in m.get("files", {}).items():
            if sizes.get(f"{folder}/{rel}") != size:
                return None
    return int(step)


def find_latest(fs, storage_path: str, run_name: str):
    """The highest-step checkpoint of a run that every rank marked complete, or None."""
    import ray.train

    found = complete_checkpoints(fs, storage_path, run_name)
    return ray.train.Checkpoint(found[-1][1], filesystem=fs) if found else None


def resume_checkpoint(config: dict):
    """Ray Train's registered checkpoint (else the one the driver's scan found at submit time),
    unless the verified storage scan knows a higher step: a worker that dies right after every rank
    uploaded can beat the controller's registration, and restarting from Ray's older checkpoint would
    redo those steps (measured here: a retry that restarted from step 0). Rank 0 decides and
    broadcasts the path, so every rank loads the same checkpoint. All ranks call this together."""
    import ray.train

    chosen = ray.train.get_checkpoint() or config.get("resume_checkpoint")
    if config.get("_settings") is None or not config.get("_run_name"):
        return chosen
    from detailflow.platform.storage import Storage

    fs = Storage(config["_settings"]).filesystem()
    path = chosen.path if chosen is not None else None
    if _rank() == 0:
        found = complete_checkpoints(fs, config["_storage_path"], config["_run_name"])
        if found and (chosen is None or found[-1][0] > int(read_client_state(chosen)["step"])):
            path = found[-1][1]
    path = _broadcast(path)
    if path is None:
        return None
    if chosen is not None and path == chosen.path:
        return chosen
    return ray.train.Checkpoint(path, filesystem=fs)


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


def read_file(checkpoint, name: str) -> bytes:
    """One file of a checkpoint, read through its filesystem (nothing else is downloaded)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{name}") as f:
        return f.read()


def read_client_state(checkpoint) -> dict:
    """step, MLflow run id, data position and resolved config; reads only client_state.json."""
    return json.loads(read_file(checkpoint, CLIENT_STATE_FILE))


def checkpoint_uri(checkpoint) -> str:
    path = checkpoint.path
    return path if "://" in path else f"s3://{path}"


def consolidated_state_dict(checkpoint, tag: str = "ds", strip_prefix: str = "model.") -> dict:
    """fp32 full weights from any ZeRO stage's shards (ZeRO-3 partitions gathered).

    strip_prefix removes the StepAdapter's "model." so the keys match the bare module."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with checkpoint.as_directory() as d:
        state = get_fp32_state_dict_from_zero_checkpoint(d, tag=tag)
    n = len(strip_prefix)
    strip = lambda k: k[n:] if strip_prefix and k.startswith(strip_prefix) else k  # noqa: E731
    return {strip(k): v.detach().clone().float().contiguous() for k, v in state.items()}


@contextlib.contextmanager
def uploaded_export(storage, module, config: dict, key_prefix: str):
    """save_pretrained(module, config) into a temporary folder, publish its files (model.safetensors +
    config.json) once at exports/<digest>/ and point key_prefix (runs/<run>/export) at them
    (export_store.py); yields the local folder (for a sha256 or tracker.log_export, whose link
    finds the same prefix published) until the with-block ends. The one place an export folder is
    written and published."""
    from detailflow.models.export import save_pretrained
    from detailflow.platform.export_store import store_export

    with tempfile.TemporaryDirectory(prefix="df-export-") as d:
        save_pretrained(module, config, d)
        store_export(storage, d, key_prefix)
        yield d


def export_consolidated(checkpoint, build_model, model_config: dict, storage, key_prefix: str,
                        tag: str = "ds", tracker=None, step: int | None = None,
                        select=lambda state: state) -> str:
    """Consolidate, keep select(state) (e.g. inference_state), load into a fresh module (strict),
    save_pretrained, store it once (exports/<digest>/) with key_prefix pointing at it (uploaded_export).

    With a tracker, the export is also logged on its MLflow run as a model (tracker.log_export: the
    weights published to S3 and linked, never uploaded through the tracking server).
    Returns the S3 URI of the export's address key_prefix (pipelines/train/exports.py reads it)."""
    model = build_model()
    model.load_state_dict(select(consolidated_state_dict(checkpoint, tag=tag)), strict=True)
    uri = storage.uri(key_prefix)
    with uploaded_export(storage, model, model_config, key_prefix) as d:
        if tracker is not None:
            tracker.log_export(d, model_config, uri=uri, step=step,
                               checkpoint_uri=checkpoint_uri(checkpoint), storage=storage)
    return uri


def load_inference_tokenizer(directory, config: dict):
    """The tokenizer of an export folder for inference: built from inference_tokenizer_fields (no
    training-only network is built or read, whatever paths a pre-inference-export config still
    names) and strictly loaded with the training-only entries dropped (StateDictMismatch names
    every difference)."""
    from detailflow.models.configs import TokenizerConfig
    from detailflow.models.export import load_state_checked
    from detailflow.models.tokenizer import DetailFlowTokenizer

    model = DetailFlowTokenizer(TokenizerConfig(**inference_tokenizer_fields(config["tokenizer"])))
    load_state_checked(model, directory, select=inference_state)
    return model
