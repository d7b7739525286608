"""Local services lifecycle through the real CLI: up, status, idempotent up, data survives
down/up, down stops exactly what up started, a taken port gives a clear error.

Uses its own state dir and port block (not the session `services` fixture)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import psutil
import pytest

from detailflow.platform.services import LocalServices, PortInUse
from detailflow.platform.storage import Storage
from detailflow.platform.testing import make_test_settings

pytestmark = pytest.mark.integration


def cli(settings, *args, timeout=300):
    env = {**os.environ, **settings.to_env()}
    return subprocess.run([sys.executable, "-m", "detailflow.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def group_pids(status):
    return {name: st["pid"] for name, st in status.items()}


def test_lifecycle_via_cli(tmp_path):
    settings = make_test_settings(tmp_path / "state")
    svc = LocalServices(settings)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert cli(settings, "services", "status").returncode == 1  # nothing running yet

        up = cli(settings, "services", "up", "--json")
        assert up.returncode == 0, up.stderr
        first = json.loads(up.stdout)
        assert all(st["healthy"] and st["running"] for st in first.values())

        st = cli(settings, "services", "status", "--json")
        assert st.returncode == 0 and group_pids(json.loads(st.stdout)) == group_pids(first)

        again = cli(settings, "services", "up", "--json")  # idempotent: same processes, no second copy
        assert again.returncode == 0, again.stderr
        assert group_pids(json.loads(again.stdout)) == group_pids(first)
        weeds = [p for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and f"-dir={settings.state_dir}" in " ".join(p.info["cmdline"])]
        assert len(weeds) == 1

        storage = Storage(settings)
        storage.put_bytes("survive/me.txt", b"still here")
        assert "weed" in cli(settings, "services", "logs", "seaweedfs", "-n", "200").stdout

        down = cli(settings, "services", "down")
        assert down.returncode == 0, down.stderr
        for pid in group_pids(first).values():
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert bystander.poll() is None, "down must not touch processes it did not start"
        assert cli(settings, "services", "status").returncode == 1

        svc.up()  # data survives down/up
        assert storage.get_bytes("survive/me.txt") == b"still here"
    finally:
        svc.down(grace_s=3)
        bystander.kill()
        bystander.wait()
    assert bystander.returncode is not None


def test_stale_pid_file_is_ignored(tmp_path):
    settings = make_test_settings(tmp_path / "state")
    svc = LocalServices(settings)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        # A pid file naming a live but unrelated process (pid reuse): wrong start time -> not ours.
        svc.run_dir.mkdir(parents=True)
        (svc.run_dir / "mlflow.json").write_text(json.dumps(
            {"pid": victim.pid, "pgid": victim.pid, "create_time": 1.0, "cmd": ["x"]}))
        assert svc.status()["mlflow"]["running"] is False
        assert svc.down() == {"mlflow": False, "seaweedfs": False}
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("which", ["mlflow", "s3"])
def test_port_taken_gives_clear_error(tmp_path, which):
    settings = make_test_settings(tmp_path / "state")
    port = settings.mlflow_port if which == "mlflow" else settings.s3_port
    setting = "DETAILFLOW_MLFLOW_PORT" if which == "mlflow" else "DETAILFLOW_S3_PORT_BASE"
    svc = LocalServices(settings)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        try:
            with pytest.raises(PortInUse, match=rf"port {port}\b.*{setting}"):
                svc.up()
            out = cli(settings, "services", "up")
            assert out.returncode == 1
            assert str(port) in out.stderr and setting in out.stderr
        finally:
            svc.down(grace_s=3)
    assert not any(st["running"] for st in svc.status().values())


def test_watchdog_stops_services_when_owner_is_killed(tmp_path):
    """A test process killed without teardown (e.g. by `timeout`) must not leave servers behind."""
    script = (
        "import json, sys, time\n"
        "from detailflow.platform.testing import start_services, start_watchdog\n"
        "settings, svc = start_services(sys.argv[1])\n"
        "start_watchdog(svc)\n"
        "print(json.dumps([st['pid'] for st in svc.status().values()]), flush=True)\n"
        "time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "state")], stdout=subprocess.PIPE,
                             text=True)
    try:
        pids = json.loads(owner.stdout.readline())
        procs = [psutil.Process(p) for p in pids]
        procs += [c for p in procs for c in p.children(recursive=True)]
        assert len(procs) >= 2 and all(p.is_running() for p in procs)
    finally:
        owner.kill()  # SIGKILL: no teardown runs in the owner
        owner.wait()
    gone, alive = psutil.wait_procs(procs, timeout=20)
    assert not alive, f"orphaned service processes: {alive}"
