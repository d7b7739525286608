"""`detailflow pipeline submit` against a real local Ray head with the Jobs API (1 CPU, its own ports and
temp dir): the job runs `detailflow pipeline run` there, against the same S3 + MLflow, and the CLI
follows its logs to SUCCEEDED. The head is stopped by the pids of its own processes only."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(temp_dir: str) -> None:
    """Stop only this head's processes (their command lines name its temp dir); never `ray stop`."""
    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                mine.append(p)
        except psutil.Error:
            continue
    for p in mine:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(mine, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def test_pipeline_submit_runs_the_pipeline_as_a_ray_job(services, storage, tmp_path):
    from detailflow.pipelines.runner.runner import read_state

    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}  # `detailflow` on PATH, as in
    temp_dir = tempfile.mkdtemp(prefix="rsub", dir="/tmp")  # an image; short: Unix socket paths
    dash = _free_port()
    head = [str(venv_bin / "ray"), "start", "--head", "--port", str(_free_port()), "--num-cpus", "1",
            "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
            "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port",
            str(_free_port()), "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port",
            str(_free_port()), "--ray-client-server-port", str(_free_port()), "--temp-dir", temp_dir,
            "--disable-usage-stats"]
    pipeline = tmp_path / "submit.yaml"
    pipeline.write_text(f"name: submit-test\nstages:\n  - name: data\n    kind: synth\n"
                        f"    params: {{out: {tmp_path}/shapes, size: 8, per_class: 1, val_per_class: 1}}\n")
    try:
        started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", "from detailflow.cli import main; main()", "pipeline",
                              "submit", str(pipeline), "--address", f"http://127.0.0.1:{dash}",
                              "--no-working-dir"], env=env, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - t0
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "submitted pipeline-submit-test-" in out.stdout and "SUCCEEDED" in out.stdout
    assert '"data": "ran"' in out.stdout  # the job's own output, followed by the CLI
    rec = read_state(storage, "submit-test")["stages"]["data"]
    assert rec["status"] == "done" and Path(rec["outputs"]["path"]).is_dir()
    print(f"pipeline submit: job followed to SUCCEEDED in {seconds:.1f}s")
