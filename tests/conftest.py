"""Shared pytest fixtures. HOW TO USE:

    @pytest.mark.integration
    def test_x(services, storage):       # services: Settings of a real SeaweedFS + MLflow for this session
        key = "tests/x/a.bin"             # storage:  Storage(services), bucket already created
        storage.put_bytes(key, b"...")
        mlflow.set_tracking_uri(services.mlflow_tracking_uri)   # also exported as MLFLOW_TRACKING_URI

    @pytest.mark.integration
    def test_y(ray_session, storage):     # ray_session: the `ray` module, initialised once per session
        ds = ray_session.data.read_parquet(storage.fs_path("..."), filesystem=storage.filesystem())

Details:
- Each pytest process gets its own tmp state dir and a FREE random port block in 20000-29999
  (S3 block base..base+3 and their +10000 gRPC ports, and the MLflow port), so parallel runs
  don't clash. Services start lazily on first use and stop at session end (only what this
  session started, by pid file + process group).
- While `services` is alive, os.environ carries its settings (DETAILFLOW_*, AWS_*,
  MLFLOW_TRACKING_URI), so subprocesses, Ray workers and ``load_settings()`` resolve the same
  endpoints. ``ray_session`` depends on ``services`` for that reason (workers inherit the env).
- Use unique key prefixes per test (e.g. f"tests/{request.node.name}/...") — the bucket is shared
  by the session.
- ``apply_runtime_env()`` runs at import (RAY_*, GLOO, MLFLOW, DS_ACCELERATOR env defaults).
- Tests needing CUDA: ``@pytest.mark.gpu`` (auto-skipped without CUDA).
"""

from __future__ import annotations

import os
import random

import pytest

from detailflow.platform.runtime import apply_runtime_env, cuda_present

apply_runtime_env()

from detailflow.platform.services import LocalServices, PortInUse, ServiceError, port_free  # noqa: E402
from detailflow.platform.settings import Settings, load_settings  # noqa: E402
from detailflow.platform.storage import Storage  # noqa: E402


def pick_port_block(rng: random.Random | None = None, tries: int = 200) -> tuple[int, int]:
    """(s3_port_base, mlflow_port), every one of their ports currently free on 127.0.0.1."""
    rng = rng or random.Random()
    for _ in range(tries):
        base = rng.randrange(20000, 29990)
        mlflow_port = base + rng.randrange(5, 9)
        ports = [base + i for i in range(4)] + [base + 10000 + i for i in range(4)] + [mlflow_port]
        if all(port_free(p) for p in ports):
            return base, mlflow_port
    raise RuntimeError("no free port block found in 20000-29999")


def make_test_settings(state_dir, **extra: str) -> Settings:
    """Settings for an isolated local stack in ``state_dir`` on a free port block. Ignores the
    caller's DETAILFLOW_*/AWS_*/MLFLOW_* env (tests must never touch real services)."""
    base, mlflow_port = pick_port_block()
    environ = {"DETAILFLOW_STATE_DIR": str(state_dir), "DETAILFLOW_S3_PORT_BASE": str(base),
               "DETAILFLOW_MLFLOW_PORT": str(mlflow_port), "DETAILFLOW_S3_BUCKET": "detailflow-test",
               "DETAILFLOW_SERVICE_TIMEOUT_S": "180", **extra}
    return load_settings(environ=environ)


def start_services(state_dir, attempts: int = 3) -> tuple[Settings, LocalServices]:
    """Start a stack on a random free block; retry on a port race with another process."""
    last: Exception | None = None
    for _ in range(attempts):
        settings = make_test_settings(state_dir)
        svc = LocalServices(settings)
        try:
            svc.up()
            return settings, svc
        except (PortInUse, ServiceError) as exc:  # someone grabbed a port between check and bind
            last = exc
            svc.down(grace_s=3)
    raise RuntimeError(f"could not start local services after {attempts} attempts: {last}")


@pytest.fixture(scope="session")
def services(tmp_path_factory) -> Settings:
    """Settings pointing at a real SeaweedFS + MLflow started for this session."""
    state_dir = tmp_path_factory.mktemp("detailflow-state")
    settings, svc = start_services(state_dir)
    saved = {k: os.environ.get(k) for k in settings.to_env()}
    os.environ.update(settings.to_env())
    try:
        yield settings
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        svc.down(grace_s=3)  # throw-away data: no need to wait for SeaweedFS's 16 s graceful stop


@pytest.fixture(scope="session")
def storage(services) -> Storage:
    """Storage on the session's SeaweedFS (bucket exists)."""
    return Storage(services)


@pytest.fixture(scope="session")
def ray_session(services):
    """``ray`` initialised once per session on 127.0.0.1 (4 logical CPUs so Ray Data is never starved)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4,
                 _node_ip_address="127.0.0.1", include_dashboard=False,
                 object_store_memory=2 * 1024**3, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


def pytest_collection_modifyitems(config, items):
    if cuda_present():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
