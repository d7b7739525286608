"""Storage against the real local SeaweedFS (session `storage` fixture)."""

from __future__ import annotations

import os

import pytest

from detailflow.platform.storage import MANIFEST_NAME, ChecksumMismatch, Storage, sha256_bytes, sha256_file

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix(request, storage):
    p = f"tests/storage/{request.node.name}"
    storage.delete_prefix(p)
    yield p
    storage.delete_prefix(p)


@pytest.mark.parametrize("size", [0, 1, 4096, 300_001])
def test_put_get_roundtrip(storage, prefix, size):
    data = os.urandom(size)
    key = f"{prefix}/obj.bin"
    digest = storage.put_bytes(key, data)
    assert digest == sha256_bytes(data)
    assert storage.exists(key)
    assert storage.get_bytes(key) == data
    assert storage.get_bytes(key, expected_sha256=digest) == data


def test_list_exists_delete(storage, prefix):
    names = [f"{prefix}/d{i % 3}/f{i:03d}" for i in range(25)]
    for n in names:
        storage.put_bytes(n, n.encode())
    assert storage.list_keys(prefix) == sorted(names)
    assert storage.list_keys(f"{prefix}/d1/") == sorted(n for n in names if "/d1/" in n)
    assert not storage.exists(f"{prefix}/nope")
    assert storage.delete_prefix(f"{prefix}/d0/") == sum("/d0/" in n for n in names)
    assert len(storage.list_keys(prefix)) == 25 - sum("/d0/" in n for n in names)


def test_multipart_upload_download(storage, prefix, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(21 * 1024 * 1024))  # > 16 MB threshold -> 3 parts of 8 MB
    key = f"{prefix}/big.bin"
    digest = storage.upload_file(src, key)
    assert digest == sha256_file(src)
    head = storage.head(key)
    assert head["ContentLength"] == src.stat().st_size
    assert "-" in head["ETag"], "multipart uploads have an ETag of the form <md5>-<parts>"
    dst = storage.download_file(key, tmp_path / "out" / "big.bin")
    assert sha256_file(dst) == digest


def test_checksum_mismatch_detected(storage, prefix, tmp_path):
    key = f"{prefix}/x.bin"
    storage.put_bytes(key, b"original")
    with pytest.raises(ChecksumMismatch):
        storage.get_bytes(key, expected_sha256=sha256_bytes(b"something else"))
    # Corrupt the object behind our back (same recorded sha256, different bytes).
    storage.client.put_object(Bucket=storage.bucket, Key=key, Body=b"tampered",
                              Metadata={"sha256": sha256_bytes(b"original")})
    with pytest.raises(ChecksumMismatch):
        storage.get_bytes(key)
    with pytest.raises(ChecksumMismatch):
        storage.download_file(key, tmp_path / "x.bin")
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.bin.part").exists()


def test_atomic_publish(storage, prefix, tmp_path):
    f = tmp_path / "part-00001.bin"
    f.write_bytes(b"from a file")
    manifest = storage.publish(prefix, {"part-00000.bin": b"abc", "part-00001.bin": f}, {"rows": 2})
    assert storage.exists(f"{prefix}/{MANIFEST_NAME}")
    got = storage.read_manifest(prefix)
    assert got == manifest and got["rows"] == 2
    assert set(got["files"]) == {"part-00000.bin", "part-00001.bin"}
    assert storage.read_published(prefix, "part-00001.bin") == b"from a file"


def test_interrupted_publish_leaves_no_manifest(storage, prefix):
    class Boom(Exception):
        pass

    real_put = Storage.put_bytes
    calls = []

    def failing_put(self, key, data, content_type="application/octet-stream"):
        calls.append(key)
        if len(calls) == 3:  # two objects written, the third "crashes"
            raise Boom("injected failure")
        return real_put(self, key, data, content_type)

    broken = Storage(storage.settings)
    broken.put_bytes = failing_put.__get__(broken)
    with pytest.raises(Boom):
        broken.publish(prefix, {f"part-{i:05d}.bin": bytes([i]) * 10 for i in range(5)})
    assert len(storage.list_keys(prefix)) == 2
    assert storage.read_manifest(prefix) is None
    assert not storage.exists(f"{prefix}/{MANIFEST_NAME}")


def test_publish_manifest_refuses_missing_files(storage, prefix):
    with pytest.raises(FileNotFoundError):
        storage.publish_manifest(prefix, {"files": {"missing.bin": {"sha256": "0" * 64, "size": 1}}})
    assert storage.read_manifest(prefix) is None


def test_pyarrow_filesystem_and_pickle(storage, prefix):
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": ["a", "b"], "label": pa.array([1, 2], pa.int32())})
    fs = storage.filesystem()
    pq.write_table(table, storage.fs_path(f"{prefix}/t.parquet"), filesystem=fs)
    assert storage.exists(f"{prefix}/t.parquet")
    clone = pickle.loads(pickle.dumps(storage))
    back = pq.read_table(clone.fs_path(f"{prefix}/t.parquet"), filesystem=clone.filesystem())
    assert back.equals(table)
    assert storage.uri("a/b") == f"s3://{storage.bucket}/a/b"


def test_wrong_credentials_rejected(services):
    import dataclasses

    from botocore.exceptions import ClientError

    bad = Storage(dataclasses.replace(services, aws_secret_access_key="wrong-secret", s3_max_attempts=1))
    with pytest.raises(ClientError):
        bad.list_keys("")


def test_conditional_writes_create_once_and_follow_the_etag(storage, prefix):
    """If-None-Match: * creates once; If-Match writes/deletes only at the ETag read (SeaweedFS 412s)."""
    from detailflow.platform.storage import PreconditionFailed

    key = f"{prefix}/lease.json"
    assert storage.get_json_etag(key) == (None, None)
    etag1 = storage.put_json_if(key, {"n": 1}, None)
    with pytest.raises(PreconditionFailed, match="already exists"):
        storage.put_json_if(key, {"n": 2}, None)
    etag2 = storage.put_json_if(key, {"n": 3}, etag1)
    assert storage.get_json_etag(key) == ({"n": 3}, etag2) and etag2 != etag1
    with pytest.raises(PreconditionFailed, match="changed since"):
        storage.put_json_if(key, {"n": 4}, etag1)  # a writer holding the old ETag loses
    with pytest.raises(PreconditionFailed):
        storage.delete_if(key, etag1)
    assert storage.get_json(key) == {"n": 3}
    storage.delete_if(key, etag2)
    assert not storage.exists(key)
