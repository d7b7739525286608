"""S3 storage: boto3 client, pyarrow filesystem, checksums and atomic publish.

    from detailflow.platform.settings import load_settings
    from detailflow.platform.storage import Storage
    st = Storage(load_settings())
    sha = st.put_bytes("tmp/a.bin", b"...")           # sha256 stored as object metadata
    st.get_bytes("tmp/a.bin")                          # verified against it (ChecksumMismatch)
    st.publish("datasets/x/train", {"part-00000.parquet": path}, {"rows": 10})
    st.read_manifest("datasets/x/train")               # None until the publish completed
    fs = st.filesystem(); fs.open_input_file(st.fs_path("datasets/x/train/part-00000.parquet"))

Atomic publish: objects are uploaded first and ``<prefix>/_manifest.json`` is written LAST, so a
reader that starts from the manifest never sees a half-written prefix.
Storage pickles (client and filesystem are rebuilt lazily), so it can be sent to Ray workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from detailflow.platform.settings import Settings

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
SHA_META = "sha256"  # user metadata key (x-amz-meta-sha256)
_T = TypeVar("_T")


class ChecksumMismatch(Exception):
    """The bytes read do not hash to the recorded/expected sha256."""


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (If-None-Match: *) or changed (If-Match ETag)."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def storage_env(settings: Settings) -> dict[str, str]:
    """Env vars MLflow, pyarrow, boto3 and the aws CLI read to reach this S3 store."""
    keys = {"AWS_ACCESS_KEY_ID": settings.aws_access_key_id,
            "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key} if _static(settings) else {}
    return {
        **keys,
        "AWS_DEFAULT_REGION": settings.s3_region,
        "AWS_ENDPOINT_URL_S3": settings.s3_endpoint_url,
        "MLFLOW_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "AWS_S3_ADDRESSING_STYLE": "path",
    }


def _static(settings: Settings) -> bool:
    """Pass the settings' keys explicitly? Not with s3_credentials=chain (IRSA, instance role)."""
    return settings.s3_credentials == "static"


def s3_client(settings: Settings, max_attempts: int | None = None, connect_timeout: float = 5,
              read_timeout: float = 60):
    """boto3 S3 client for the settings' endpoint: path-style, standard-mode retries."""
    import boto3
    from botocore.config import Config

    cfg = Config(
        region_name=settings.s3_region,
        retries={"max_attempts": max_attempts or settings.s3_max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # SeaweedFS and older S3 clones reject the newer default CRC trailers on some calls.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    static = _static(settings)
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=cfg,
                        aws_access_key_id=settings.aws_access_key_id if static else None,
                        aws_secret_access_key=settings.aws_secret_access_key if static else None)


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnError

    if isinstance(exc, BotoConnError | HTTPClientError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling")
    return False


def _precondition(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = exc.response.get("Error", {}).get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    # 409 ConditionalRequestConflict: AWS's answer to two conditional writes racing on one key
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def with_retries(fn: Callable[[], _T], attempts: int, what: str, base_delay: float = 0.2) -> _T:
    """Call ``fn`` retrying transient S3 errors with exponential backoff and jitter."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if i == attempts - 1 or not _is_transient(exc):
                raise
            delay = base_delay * (2**i) * (0.5 + random.random())
            log.warning("%s failed (%s), retry %d/%d in %.2fs", what, exc, i + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Storage:
    """One bucket on one S3 endpoint, configured from Settings."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.bucket = settings.s3_bucket
        self._client = None
        self._fs = None

    # ---- pickling: clients hold sockets, rebuild them on the other side ----------------------
    def __getstate__(self):
        return {"settings": self.settings, "bucket": self.bucket}

    def __setstate__(self, state):
        self.__init__(state["settings"])

    # ---- clients ---------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = s3_client(self.settings)
        return self._client

    def filesystem(self):
        """pyarrow S3FileSystem for this endpoint; paths are ``fs_path(key)`` = "bucket/key"."""
        if self._fs is None:
            from pyarrow import fs as pafs

            s = self.settings
            parts = urlsplit(s.s3_endpoint_url)
            keys = (dict(access_key=s.aws_access_key_id, secret_key=s.aws_secret_access_key)
                    if _static(s) else {})
            self._fs = pafs.S3FileSystem(
                **keys, region=s.s3_region,
                endpoint_override=parts.netloc, scheme=parts.scheme, force_virtual_addressing=False,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=s.s3_max_attempts))
        return self._fs

    def transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        mb = 1024 * 1024
        return TransferConfig(multipart_threshold=self.settings.multipart_threshold_mb * mb,
                              multipart_chunksize=self.settings.multipart_chunk_mb * mb,
                              max_concurrency=4, use_threads=True)

    # ---- names -------------------------------------------------------------------------------
    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    def fs_path(self, key: str) -> str:
        return f"{self.bucket}/{key.lstrip('/')}"

    # ---- bucket ------------------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        """Create the bucket if missing (idempotent)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") not in (404, 400):
                raise
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",
                                                                 "BucketAlreadyExists"):
                raise

    # ---- objects -----------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Write one object, recording its sha256 as metadata; returns the sha256."""
        digest = sha256_bytes(data)
        with_retries(lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, Metadata={SHA_META: digest}),
            self.settings.s3_max_attempts, f"put {key}")
        return digest

    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        """Read one object; verify against ``expected_sha256`` or else the recorded sha256."""
        resp = with_retries(lambda: self.client.get_object(Bucket=self.bucket, Key=key),
                            self.settings.s3_max_attempts, f"get {key}")
        data = resp["Body"].read()
        want = expected_sha256 or resp.get("Metadata", {}).get(SHA_META)
        if want and sha256_bytes(data) != want:
            raise ChecksumMismatch(f"{self.uri(key)}: sha256 {sha256_bytes(data)} != expected {want}")
        return data

    def put_json(self, key: str, obj) -> str:
        return self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode(), "application/json")

    def get_json(self, key: str, expected_sha256: str | None = None):
        return json.loads(self.get_bytes(key, expected_sha256))

    # ---- conditional writes (S3 If-None-Match / If-Match; SeaweedFS and AWS both honour them) ----
    def get_json_etag(self, key: str) -> tuple[object, str] | tuple[None, None]:
        """(object, ETag) of a JSON object, or (None, None) when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            resp = with_retries(lambda: self.client.get_object(Bucket=self.bucket, Key=key),
                                self.settings.s3_max_attempts, f"get {key}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise
        return json.loads(resp["Body"].read()), resp["ETag"]

    def put_json_if(self, key: str, obj, etag: str | None) -> str:
        """Write JSON only if the object is still at ``etag`` (If-Match), or, with ``etag=None``,
        only if it does not exist (If-None-Match: *). Returns the new ETag; PreconditionFailed when
        another writer got there first. Not retried on 412 (a retry would be a blind overwrite)."""
        body = json.dumps(obj, indent=2, sort_keys=True).encode()
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            resp = with_retries(lambda: self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType="application/json",
                Metadata={SHA_META: sha256_bytes(body)}, **cond),
                self.settings.s3_max_attempts, f"conditional put {key}")
        except Exception as exc:
            if _precondition(exc):
                raise PreconditionFailed(f"{self.uri(key)} changed since ETag {etag}" if etag
                                         else f"{self.uri(key)} already exists") from exc
            raise
        return resp["ETag"]

    def delete_if(self, key: str, etag: str) -> None:
        """Delete only if the object is still at ``etag``; PreconditionFailed otherwise."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag)
        except Exception as exc:
            if _precondition(exc):
                raise PreconditionFailed(f"{self.uri(key)} changed since ETag {etag}") from exc
            raise

    def upload_file(self, path: str | os.PathLike, key: str) -> str:
        """Upload a local file (multipart above the threshold); returns its sha256."""
        digest = sha256_file(path)
        with_retries(lambda: self.client.upload_file(
            str(path), self.bucket, key, ExtraArgs={"Metadata": {SHA_META: digest}},
            Config=self.transfer_config()), self.settings.s3_max_attempts, f"upload {key}")
        return digest

    def download_file(self, key: str, path: str | os.PathLike, expected_sha256: str | None = None) -> Path:
        """Download to ``path`` (via a temp name, so a failure leaves no partial file) and verify."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        want = expected_sha256 or self.head(key).get("Metadata", {}).get(SHA_META)
        with_retries(lambda: self.client.download_file(self.bucket, key, str(tmp),
                                                       Config=self.transfer_config()),
                     self.settings.s3_max_attempts, f"download {key}")
        if want and sha256_file(tmp) != want:
            tmp.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{self.uri(key)}: downloaded bytes do not match sha256 {want}")
        os.replace(tmp, path)
        return path

    def head(self, key: str) -> dict:
        return self.client.head_object(Bucket=self.bucket, Key=key)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.head(key)
            return True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise

    def list_keys(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` (sorted)."""
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many. The manifest goes first so a
        half-deleted prefix is never mistaken for a published one."""
        keys = self.list_keys(prefix)
        keys.sort(key=lambda k: not k.endswith(MANIFEST_NAME))
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    # ---- atomic publish ----------------------------------------------------------------------
    @staticmethod
    def manifest_key(prefix: str) -> str:
        return f"{prefix.rstrip('/')}/{MANIFEST_NAME}"

    def publish_manifest(self, prefix: str, manifest: Mapping) -> str:
        """Write ``<prefix>/_manifest.json``. Call it only after every object it lists is written;
        objects listed under ``manifest["files"]`` are checked to exist first."""
        for name in (manifest.get("files") or {}):
            key = f"{prefix.rstrip('/')}/{name}"
            if not self.exists(key):
                raise FileNotFoundError(
                    f"refusing to publish {self.manifest_key(prefix)}: {self.uri(key)} is missing")
        return self.put_json(self.manifest_key(prefix), dict(manifest))

    def read_manifest(self, prefix: str) -> dict | None:
        """The published manifest, or None when the prefix was never (completely) published."""
        if not self.exists(self.manifest_key(prefix)):
            return None
        return self.get_json(self.manifest_key(prefix))

    def publish(self, prefix: str, items: Mapping[str, bytes | str | os.PathLike],
                manifest: Mapping | None = None) -> dict:
        """Upload ``items`` (name under prefix -> bytes or local path), then the manifest LAST.

        The manifest gets ``files: {name: {sha256, size}}`` added. If any upload fails the
        exception propagates and no manifest is written.
        """
        files = {}
        for name, item in items.items():
            key = f"{prefix.rstrip('/')}/{name}"
            if isinstance(item, bytes | bytearray | memoryview):
                data = bytes(item)
                files[name] = {"sha256": self.put_bytes(key, data), "size": len(data)}
            else:
                files[name] = {"sha256": self.upload_file(item, key), "size": os.path.getsize(item)}
        full = {**(manifest or {}), "files": files}
        self.publish_manifest(prefix, full)
        return full

    def read_published(self, prefix: str, name: str) -> bytes:
        """Read one file of a published prefix, verified against the manifest's sha256."""
        manifest = self.read_manifest(prefix)
        if manifest is None:
            raise FileNotFoundError(f"{self.uri(prefix)} has no {MANIFEST_NAME} (not published)")
        entry = manifest.get("files", {}).get(name)
        if entry is None:
            raise KeyError(f"{name!r} is not in the manifest of {self.uri(prefix)}")
        return self.get_bytes(f"{prefix.rstrip('/')}/{name}", expected_sha256=entry["sha256"])


_FS_CACHE: dict = {}


def cached_filesystem(storage: Storage):
    """One pyarrow S3FileSystem per process and endpoint: Storage objects are rebuilt in every Ray
    task (they pickle without clients), and building a filesystem costs ~0.4 s, more than a read."""
    key = repr(storage.settings)
    if key not in _FS_CACHE:
        _FS_CACHE[key] = storage.filesystem()
    return _FS_CACHE[key]


def configured_storage(storage: Storage | None = None) -> Storage:
    """`storage`, or (None) the Storage the settings name (environment / config file): the default of
    every function that takes an optional storage."""
    if storage is not None:
        return storage
    from detailflow.platform.settings import load_settings

    return Storage(load_settings())
