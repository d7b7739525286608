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
  session started, by pid file + process group). If pytest itself is killed (e.g. by `timeout`),
  a watchdog process kills the servers, so nothing is orphaned.
- While `services` is alive, os.environ carries its settings (DETAILFLOW_*, AWS_*,
  MLFLOW_TRACKING_URI), so subprocesses, Ray workers and ``load_settings()`` resolve the same
  endpoints. ``ray_session`` depends on ``services`` for that reason (workers inherit the env).
- Use unique key prefixes per test (e.g. f"tests/{request.node.name}/...") — the bucket is shared
  by the session.
- ``apply_runtime_env()`` runs at import (RAY_*, GLOO, MLFLOW, DS_ACCELERATOR env defaults).
- Need a second, separate stack (e.g. to test lifecycle)? ``detailflow.platform.testing``:
  ``make_test_settings(tmp_path)``, ``start_services(tmp_path)``, ``isolated_services()``.
- Tests needing CUDA: ``@pytest.mark.gpu`` (auto-skipped without CUDA).
"""

from __future__ import annotations

import pytest

from detailflow.platform.runtime import apply_runtime_env, cuda_present

apply_runtime_env()

from detailflow.platform.settings import Settings  # noqa: E402
from detailflow.platform.storage import Storage  # noqa: E402
from detailflow.platform.testing import exported_env, start_services, start_watchdog, stop_services  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """Tiny tensors run several times faster on one thread on the shared 2-core box.

    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def services(tmp_path_factory) -> Settings:
    """Settings pointing at a real SeaweedFS + MLflow started for this session."""
    state_dir = tmp_path_factory.mktemp("detailflow-state")
    settings, svc = start_services(state_dir)
    watchdog = start_watchdog(svc)  # kills the servers if pytest itself is killed
    try:
        with exported_env(settings.to_env()):
            yield settings
    finally:
        stop_services(svc, watchdog)  # short grace: the data is thrown away


@pytest.fixture(scope="session")
def storage(services) -> Storage:
    """Storage on the session's SeaweedFS (bucket exists)."""
    return Storage(services)


@pytest.fixture(scope="session")
def ray_session(services):
    """``ray`` initialised once per session on 127.0.0.1 (4 logical CPUs so Ray Data is never starved)."""
    import ray

    from detailflow.platform.raytrain import ray_runtime_env
    from detailflow.platform.serving.proxy_errors import use_proxy_errors

    if not ray.is_initialized():
        use_proxy_errors()  # Serve's proxy (started later) answers JSON 502 + request id if a replica dies
        ray.init(address="local", num_cpus=4,
                 _node_ip_address="127.0.0.1", include_dashboard=False,
                 object_store_memory=2 * 1024**3, log_to_driver=True,
                 runtime_env=ray_runtime_env())  # the drivers' log filter (raytrain.QUIET_LOG_MESSAGES)
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
