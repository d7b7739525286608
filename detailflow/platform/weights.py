"""Pretrained weight files of a tokenizer config (SigLIP2 teacher, perceptual net, D backbone, encoder
init): checked on the driver, fetched and sha256-verified on every worker before the model is built.

Usage:
    check_weights(tok_cfg, storage)                # driver: every required file named and reachable
    tok_cfg = resolve_weights(tok_cfg, storage)    # worker: s3:// URIs -> local cached files, sha256 ok

A path is a local file (it must exist on every worker node) or an s3:// URI in the configured bucket
(downloaded once per node into <state_dir>/weights/<sha256><the key's suffix> or /<key>: the loaders
tell the format by the suffix). When the config gives the matching *_sha256 field, the file's sha256
must equal it, or the stage stops with both values.
The field list and what each file must be: detailflow.models.configs.WEIGHT_FILES.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path


class WeightFileError(ValueError):
    """A required weight file is unset, unreachable, or not the one its sha256 names."""


def sha256_file(path: str | os.PathLike, chunk: int = 2**22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _s3_key(storage, uri: str) -> str:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if bucket != storage.bucket:
        raise WeightFileError(f"{uri}: weights must be in the configured bucket s3://{storage.bucket}")
    return key


def check_weights(tok_cfg, storage) -> None:
    """Driver-side: local problems (configs.weight_problems) plus s3:// objects that do not exist."""
    from detailflow.models.configs import WEIGHT_FILES, weight_problems

    problems = weight_problems(tok_cfg)
    for name, (_, wants) in WEIGHT_FILES.items():
        path = getattr(tok_cfg, name)
        if path and str(path).startswith("s3://") and not storage.exists(_s3_key(storage, path)):
            problems.append(f"{name}={path!r} does not exist in S3; it must name {wants}")
    if problems:
        raise WeightFileError("tokenizer weights: " + "; ".join(problems))


def resolve_weights(tok_cfg, storage, cache_dir: str | os.PathLike | None = None):
    """A copy of tok_cfg whose weight paths are local files, each checked against its sha256 field."""
    from detailflow.models.configs import WEIGHT_FILES

    changes = {}
    for name, (sha_field, wants) in WEIGHT_FILES.items():
        path, want_sha = getattr(tok_cfg, name), getattr(tok_cfg, sha_field)
        if not path:
            continue
        if str(path).startswith("s3://"):
            key = _s3_key(storage, path)
            cache = Path(cache_dir or Path(storage.settings.state_dir) / "weights")
            # the loaders tell a .pt2 / .safetensors / TorchScript file by its suffix: keep it
            local = cache / (f"{want_sha.lower()}{Path(key).suffix}" if want_sha
                             else key.replace("/", "_"))
            if not local.is_file():  # download beside, then rename: a crash never leaves half a file
                cache.mkdir(parents=True, exist_ok=True)
                part = local.with_name(local.name + f".part{os.getpid()}")
                storage.download_file(key, part)
                part.replace(local)
            path = str(local)
        elif not os.path.isfile(path):
            raise WeightFileError(f"{name}={path!r} does not exist on this node; it must name {wants}")
        if want_sha and (got := sha256_file(path)) != want_sha.lower():
            if str(getattr(tok_cfg, name)).startswith("s3://"):
                Path(path).unlink(missing_ok=True)  # a bad download must not stick in the cache
            raise WeightFileError(f"{name}={getattr(tok_cfg, name)!r}: sha256 {got} but {sha_field} says "
                                  f"{want_sha}")
        changes[name] = path
    return dataclasses.replace(tok_cfg, **changes) if changes else tok_cfg
