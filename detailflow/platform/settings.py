"""One typed settings object for every environment (local, compose, cluster).

Sources, highest precedence first: environment variables > YAML file > defaults.
The YAML file is ``--config FILE`` on the CLI or ``DETAILFLOW_CONFIG``; its keys are the field
names below (e.g. ``s3_bucket: my-bucket``).

    from detailflow.platform.settings import load_settings
    settings = load_settings()               # env + optional DETAILFLOW_CONFIG file
    settings.masked()                        # dict with secrets masked, for printing
    settings.to_env()                        # env vars that reproduce these settings in a child process

``detailflow config show`` prints the resolved settings.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

# Local SeaweedFS credentials when none are configured: fixed development keys (the server binds to
# 127.0.0.1 only). Fixed, rather than generated per state dir, so Ray workers whose cwd differs
# from the driver's still resolve the same keys. Override both with AWS_* for anything shared.
DEV_ACCESS_KEY_ID = "detailflow-dev"
DEV_SECRET_ACCESS_KEY = "detailflow-dev-secret-key"

# Default local port block (20000-29999; SeaweedFS's gRPC ports sit at +10000).
DEFAULT_S3_PORT_BASE = 23330
DEFAULT_MLFLOW_PORT = 23500

SECRET_FIELDS = ("aws_access_key_id", "aws_secret_access_key")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the setting and its env var."""


@dataclass(frozen=True)
class Settings:
    state_dir: Path  # local services' data, logs and pid files
    s3_endpoint_url: str  # S3 API endpoint (http://127.0.0.1:<s3_port> for the local SeaweedFS)
    s3_region: str = "us-east-1"  # signing region; SeaweedFS accepts any
    s3_bucket: str = "detailflow"  # every dataset, checkpoint and MLflow artefact lives here
    aws_access_key_id: str = DEV_ACCESS_KEY_ID  # S3 credentials (secret: masked when printed)
    aws_secret_access_key: str = DEV_SECRET_ACCESS_KEY
    # static: the two keys above; chain: boto3/pyarrow's default chain (IRSA / workload identity
    # web-identity token, instance role, or AWS_* keys if set) - what KubeRay pods on AWS use
    s3_credentials: str = "static"
    mlflow_tracking_uri: str = ""  # MLflow server; defaults to the local one on mlflow_port
    mlflow_artifact_prefix: str = "mlflow"  # server-proxied artefacts go to s3://<bucket>/<this>
    ray_address: str = "local"  # "local" = in-process Ray; or "ray://host:10001" / "host:6379"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    s3_port_base: int = DEFAULT_S3_PORT_BASE  # SeaweedFS master=base, volume +1, filer +2, S3 +3
    mlflow_port: int = DEFAULT_MLFLOW_PORT  # local MLflow server port
    multipart_threshold_mb: int = 16  # files above this upload in parts
    multipart_chunk_mb: int = 8  # part size for multipart uploads
    s3_max_attempts: int = 5  # botocore retries (standard mode) and our own publish retries
    service_timeout_s: float = 120.0  # readiness wait for each local service
    config_file: str | None = None  # the YAML file these came from, if any (informational)

    # ---- derived -------------------------------------------------------------------------
    @property
    def s3_port(self) -> int:
        """The local SeaweedFS S3 API port."""
        return self.s3_port_base + 3

    @property
    def local_s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def local_mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def uses_local_services(self) -> bool:
        """True when the endpoints point at the services `detailflow services up` starts."""
        return (self.s3_endpoint_url.rstrip("/") == self.local_s3_endpoint
                and self.mlflow_tracking_uri.rstrip("/") == self.local_mlflow_uri)

    @property
    def mlflow_artifacts_destination(self) -> str:
        return f"s3://{self.s3_bucket}/{self.mlflow_artifact_prefix.strip('/')}"

    def resolved_device(self) -> str:
        """'cuda' if asked or (auto and CUDA is present), else 'cpu'."""
        if self.device != "auto":
            return self.device
        from detailflow.platform.runtime import cuda_present

        return "cuda" if cuda_present() else "cpu"

    def masked(self) -> dict:
        """All settings as plain values, secrets replaced by asterisks."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                value = "********"
            out[f.name] = str(value) if isinstance(value, Path) else value
        out["s3_port"] = self.s3_port
        return out

    def to_env(self) -> dict[str, str]:
        """Environment variables that make ``load_settings()`` in a child process return these."""
        env = {}
        for f in dataclasses.fields(self):
            if f.name == "config_file":
                continue
            env[ENV_NAMES[f.name][0]] = str(getattr(self, f.name))
        return env


# Field -> env var names, first one wins when several are set.
ENV_NAMES: dict[str, tuple[str, ...]] = {
    "state_dir": ("DETAILFLOW_STATE_DIR",),
    "s3_endpoint_url": ("DETAILFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"),
    "s3_region": ("DETAILFLOW_S3_REGION", "AWS_DEFAULT_REGION"),
    "s3_bucket": ("DETAILFLOW_S3_BUCKET",),
    "aws_access_key_id": ("AWS_ACCESS_KEY_ID",),
    "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "s3_credentials": ("DETAILFLOW_S3_CREDENTIALS",),
    "mlflow_tracking_uri": ("MLFLOW_TRACKING_URI",),
    "mlflow_artifact_prefix": ("DETAILFLOW_MLFLOW_ARTIFACT_PREFIX",),
    "ray_address": ("DETAILFLOW_RAY_ADDRESS",),
    "device": ("DETAILFLOW_DEVICE",),
    "s3_port_base": ("DETAILFLOW_S3_PORT_BASE",),
    "mlflow_port": ("DETAILFLOW_MLFLOW_PORT",),
    "multipart_threshold_mb": ("DETAILFLOW_MULTIPART_THRESHOLD_MB",),
    "multipart_chunk_mb": ("DETAILFLOW_MULTIPART_CHUNK_MB",),
    "s3_max_attempts": ("DETAILFLOW_S3_MAX_ATTEMPTS",),
    "service_timeout_s": ("DETAILFLOW_SERVICE_TIMEOUT_S",),
}
CONFIG_ENV = "DETAILFLOW_CONFIG"


def all_env_names() -> set[str]:
    """Every env var the settings read (used by the compose test and the README table)."""
    return {name for names in ENV_NAMES.values() for name in names} | {CONFIG_ENV}


def _where(name: str) -> str:
    envs = " or ".join(ENV_NAMES.get(name, ()))
    return f"setting '{name}'" + (f" (env {envs})" if envs else "")


def _field_type(name: str) -> type:
    hints = typing.get_type_hints(Settings)
    tp = hints[name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _convert(name: str, raw) -> object:
    tp = _field_type(name)
    try:
        if tp is Path:
            return Path(os.path.expanduser(str(raw))).resolve()
        if tp is int:
            if isinstance(raw, bool):
                raise ValueError("bool")
            return int(raw)
        if tp is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"Invalid value {raw!r} for {_where(name)}: expected {tp.__name__}") from exc


def default_state_dir(cwd: Path | None = None) -> Path:
    """``.detailflow/`` in the project root (nearest parent holding pyproject.toml or .detailflow),
    else ``~/.detailflow``."""
    here = (cwd or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / ".detailflow").is_dir() or (d / "pyproject.toml").is_file():
            return d / ".detailflow"
    return Path.home() / ".detailflow"


def _read_file(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SettingsError(f"Config file {path!r} (--config / {CONFIG_ENV}) does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"Config file {path!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"Config file {path!r} must hold a mapping of setting: value")
    known = {f.name for f in dataclasses.fields(Settings)} - {"config_file"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"Config file {path!r} has unknown settings {unknown}; known: {sorted(known)}")
    return data


def _check_url(name: str, url: str, schemes: tuple[str, ...]) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise SettingsError(f"Invalid URL {url!r} for {_where(name)}: {exc}") from exc
    if parts.scheme not in schemes or not parts.hostname:
        raise SettingsError(
            f"Invalid URL {url!r} for {_where(name)}: expected {'|'.join(schemes)}://host[:port]")
    if name == "s3_endpoint_url" and parts.path not in ("", "/"):
        raise SettingsError(f"Invalid URL {url!r} for {_where(name)}: an S3 endpoint has no path")
    del port


def _validate(s: Settings) -> None:
    _check_url("s3_endpoint_url", s.s3_endpoint_url, ("http", "https"))
    if "://" in s.mlflow_tracking_uri:
        scheme = s.mlflow_tracking_uri.split("://", 1)[0]
        if scheme in ("http", "https"):
            _check_url("mlflow_tracking_uri", s.mlflow_tracking_uri, ("http", "https"))
    if not (1024 <= s.s3_port_base and s.s3_port_base + 10003 <= 65535):
        raise SettingsError(
            f"Invalid {_where('s3_port_base')}: {s.s3_port_base}; need 1024..55532 "
            "(SeaweedFS uses base..base+3 and those +10000 for gRPC)")
    if not 1024 <= s.mlflow_port <= 65535:
        raise SettingsError(f"Invalid {_where('mlflow_port')}: {s.mlflow_port}")
    if s.device != "auto" and s.device != "cpu" and not s.device.startswith("cuda"):
        raise SettingsError(f"Invalid {_where('device')}: {s.device!r}; expected auto, cpu, cuda or cuda:N")
    if not s.s3_bucket or "/" in s.s3_bucket:
        raise SettingsError(f"Invalid {_where('s3_bucket')}: {s.s3_bucket!r}")
    if min(s.multipart_threshold_mb, s.multipart_chunk_mb) < 5:
        raise SettingsError("multipart_threshold_mb and multipart_chunk_mb must be >= 5 "
                            "(the S3 minimum part size)")
    if s.s3_credentials not in ("static", "chain"):
        raise SettingsError(
            f"Invalid {_where('s3_credentials')}: {s.s3_credentials!r}; expected static or chain")
    if s.s3_max_attempts < 1:
        raise SettingsError(f"Invalid {_where('s3_max_attempts')}: must be >= 1")


def load_settings(config_file: str | None = None, environ: typing.Mapping[str, str] | None = None,
                  **overrides) -> Settings:
    """Resolve settings: ``overrides`` > ``environ`` (default os.environ) > YAML file > defaults.

    ``config_file`` defaults to ``environ['DETAILFLOW_CONFIG']``. Raises SettingsError naming the
    setting on bad input.
    """
    env = os.environ if environ is None else environ
    config_file = config_file or env.get(CONFIG_ENV) or None
    values: dict = dict(_read_file(config_file)) if config_file else {}
    for name, names in ENV_NAMES.items():
        for env_name in names:
            if env.get(env_name, "") != "":
                values[name] = env[env_name]
                break
    values.update({k: v for k, v in overrides.items() if v is not None})
    resolved = {name: _convert(name, raw) for name, raw in values.items()}
    resolved.setdefault("state_dir", default_state_dir())
    base = resolved.get("s3_port_base", DEFAULT_S3_PORT_BASE)
    resolved.setdefault("s3_endpoint_url", f"http://127.0.0.1:{base + 3}")
    if not resolved.get("mlflow_tracking_uri"):
        port = resolved.get("mlflow_port", DEFAULT_MLFLOW_PORT)
        resolved["mlflow_tracking_uri"] = f"http://127.0.0.1:{port}"
    settings = Settings(config_file=str(config_file) if config_file else None,
                        **{k: v for k, v in resolved.items() if k != "config_file"})
    _validate(settings)
    return settings
