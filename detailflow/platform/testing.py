"""Isolated local stacks for tests and benchmarks (a tmp state dir and a free port block each).

    from detailflow.platform.testing import isolated_services
    with isolated_services() as settings:          # SeaweedFS + MLflow up, env exported
        Storage(settings).put_bytes("k", b"v")

tests/conftest.py builds its session fixtures on these; benchmarks use ``isolated_services``.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from detailflow.platform.services import LocalServices, PortInUse, ServiceError, port_free
from detailflow.platform.settings import Settings, load_settings


def pick_port_block(rng: random.Random | None = None, tries: int = 200) -> tuple[int, int]:
    """(s3_port_base, mlflow_port) in 20000-29999 with every port they need free on 127.0.0.1
    (base..base+3, their gRPC twins at +10000, and the MLflow port)."""
    rng = rng or random.Random()
    for _ in range(tries):
        base = rng.randrange(20000, 29990)
        mlflow_port = base + rng.randrange(5, 9)
        ports = [base + i for i in range(4)] + [base + 10000 + i for i in range(4)] + [mlflow_port]
        if all(port_free(p) for p in ports):
            return base, mlflow_port
    raise RuntimeError("no free port block found in 20000-29999")


def make_test_settings(state_dir: str | os.PathLike, **extra_env: str) -> Settings:
    """Settings for an isolated local stack in ``state_dir`` on a free port block. The caller's
    DETAILFLOW_*/AWS_*/MLFLOW_* env is ignored, so tests never touch real services."""
    base, mlflow_port = pick_port_block()
    environ = {"DETAILFLOW_STATE_DIR": str(state_dir), "DETAILFLOW_S3_PORT_BASE": str(base),
               "DETAILFLOW_MLFLOW_PORT": str(mlflow_port), "DETAILFLOW_S3_BUCKET": "detailflow-test",
               "DETAILFLOW_SERVICE_TIMEOUT_S": "180", **extra_env}
    return load_settings(environ=environ)


# Runs in its own process: when its parent (the test/benchmark process) disappears without a
# teardown (killed by `timeout`, SIGKILL, OOM), it kills the service process groups it was given.
_WATCHDOG = """
import os, signal, sys, time
parent, pgids = int(sys.argv[1]), [int(g) for g in sys.argv[2:]]
while os.getppid() == parent:
    time.sleep(1)
for g in pgids:
    try:
        os.killpg(g, signal.SIGKILL)
    except OSError:
        pass
"""


def start_watchdog(svc: LocalServices) -> subprocess.Popen:
    """Kill ``svc``'s processes if this process dies without stopping them (no orphaned servers).
    Stop the watchdog (``.kill()``) before a normal ``svc.down()``."""
    pgids = [str(st["pid"]) for st in svc.status().values() if st["pid"]]
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *pgids],
                            start_new_session=True, stdin=subprocess.DEVNULL)


def stop_services(svc: LocalServices, watchdog: subprocess.Popen | None = None) -> None:
    """Normal teardown: watchdog first, then the services (throw-away data: short grace)."""
    if watchdog is not None:
        watchdog.kill()
        watchdog.wait()
    svc.down(grace_s=3)


def start_services(state_dir: str | os.PathLike, attempts: int = 3) -> tuple[Settings, LocalServices]:
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


@contextlib.contextmanager
def exported_env(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in os.environ for the block (children and Ray workers inherit it), then restore."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def isolated_services(state_dir: str | os.PathLike | None = None) -> Iterator[Settings]:
    """SeaweedFS + MLflow on a free port block, settings exported to os.environ; stopped on exit.
    Without ``state_dir`` a temporary one is used and deleted afterwards."""
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="detailflow-"))
        settings, svc = start_services(Path(state_dir))
        # Registered after the tmp dir, so it runs first: stop before the data dir disappears.
        stack.callback(stop_services, svc, start_watchdog(svc))
        stack.enter_context(exported_env(settings.to_env()))
        yield settings
