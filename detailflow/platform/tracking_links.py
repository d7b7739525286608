"""Model weights on S3, linked from MLflow: the tracking server only ever holds small files.

An export folder (model.safetensors + config.json) logged as an MLflow model would send the
weights (multi-GB for DetailFlow-16's AR model) through the tracking server's artefact proxy.
Instead the folder is published to S3 directly at an immutable, content-addressed prefix, and
the MLflow model gets the folder with every weight file replaced by a small link file:

    linked = link_export(storage, export_dir, staging_dir)   # publishes exports/<digest>/, manifest last
    mlflow.pyfunc.log_model(..., artifacts={"export": str(linked)})     # config.json + *.link.json only
    ...
    resolve_links(downloaded_artifact_dir)   # <name> beside each <name>.link.json, from S3, sha256 checked

Prefix: `exports/<sha256 over the files' sha256s>/` (export_store.py: the one place an export's bytes
are stored; training's export already published them there, so linking uploads nothing again) holds
the files, then `_manifest.json` written LAST; new weights -> a new digest -> a new prefix, and a
prefix whose manifest exists is never written again. A link file: {"uri", "sha256", "bytes", "manifest"}.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from detailflow.platform.export_store import publish_export

LINK_SUFFIX = ".link.json"
LINKED_FILES = ("model.safetensors",)  # always linked, whatever their size (models.export.WEIGHTS_NAME)


def link_export(storage, directory, staging) -> Path:
    """Publish `directory` (publish_export) and fill `staging` with its small files as they are and
    each weight file as `<name>.link.json`. Returns `staging`, ready to be an MLflow artefact."""
    prefix, files = publish_export(storage, directory)
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(directory).iterdir()):
        if not path.is_file():
            continue
        if path.name in LINKED_FILES:
            entry = files[path.name]
            link = {"uri": storage.uri(f"{prefix}/{path.name}"), "sha256": entry["sha256"],
                    "bytes": entry["size"], "manifest": storage.uri(storage.manifest_key(prefix))}
            (staging / f"{path.name}{LINK_SUFFIX}").write_text(json.dumps(link, indent=2))
        else:
            shutil.copy2(path, staging / path.name)
    return staging


def read_link(path) -> dict:
    """A link file's content, checked: a clear error naming the file when it is not one."""
    try:
        link = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable link file ({exc})") from exc
    missing = [k for k in ("uri", "sha256") if not isinstance(link, dict) or k not in link]
    if missing or not str(link["uri"]).startswith("s3://"):
        raise ValueError(f"{path}: a link file needs an s3:// 'uri' and a 'sha256' (missing {missing})")
    return link


def resolve_links(directory, storage=None) -> Path:
    """Put `<name>` beside every `<name>.link.json` in `directory`, downloaded from S3 and verified
    against the link's sha256 (a folder without links is left as it is; a file already there with
    the link's size is kept, so resolving twice downloads once). Returns the folder."""
    directory = Path(directory)
    links = sorted(directory.glob(f"*{LINK_SUFFIX}"))
    if not links:
        return directory
    from detailflow.platform.storage import configured_storage

    storage = configured_storage(storage)
    for path in links:
        link = read_link(path)
        bucket, _, key = link["uri"][5:].partition("/")
        if bucket != storage.bucket:
            raise ValueError(f"{path}: {link['uri']} is not in the configured bucket {storage.bucket!r}")
        target = directory / path.name[: -len(LINK_SUFFIX)]
        if not (target.exists() and os.path.getsize(target) == link.get("bytes")):
            storage.download_file(key, target, expected_sha256=link["sha256"])
    return directory
