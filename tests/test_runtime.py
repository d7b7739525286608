"""Runtime env defaults, and the contract other stages rely on: Ray workers started by the
`ray_session` fixture resolve the same settings (and reach the same S3) as the test process."""

from __future__ import annotations

import pytest

from detailflow.platform.runtime import RUNTIME_ENV, apply_runtime_env


def test_apply_runtime_env_sets_defaults_and_keeps_user_values():
    env = {"RAY_AUTH_MODE": "token"}
    changed = apply_runtime_env(env)
    assert env["RAY_AUTH_MODE"] == "token", "a value the user set must win"
    assert "RAY_AUTH_MODE" not in changed
    for key, value in RUNTIME_ENV.items():
        if key != "RAY_AUTH_MODE":
            assert env[key] == value
    assert apply_runtime_env(env) == {}, "idempotent: a second call changes nothing"


@pytest.mark.integration
def test_ray_workers_see_the_session_settings(ray_session, services, storage):
    key = "tests/runtime/from-driver.txt"
    storage.put_bytes(key, b"hello from the driver")

    @ray_session.remote(num_cpus=0.5)
    def read_in_worker(k: str) -> tuple[str, bytes]:
        from detailflow.platform.settings import load_settings
        from detailflow.platform.storage import Storage

        s = load_settings()  # from the env the worker inherited
        return s.s3_endpoint_url, Storage(s).get_bytes(k)

    endpoint, data = ray_session.get(read_in_worker.remote(key), timeout=120)
    assert endpoint == services.s3_endpoint_url
    assert data == b"hello from the driver"
