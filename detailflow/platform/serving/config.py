"""Typed options of the serving app: the Generator's user_config and the app builder's args.

    opts = GeneratorOptions.from_dict(user_config)     # in Generator.reconfigure (unknown keys -> error)
    args = AppArgs.from_dict(app["args"])               # in app.build_app
    cfg = load_serve_file("configs/serve-local.yaml")   # Ray's ServeDeploySchema, validated + our args

A serve file is Ray's own format (`serve deploy FILE`, a RayService's serveConfigV2): one application
whose import_path is `detailflow.platform.serving.app:build_app`, `args` = AppArgs fields, and the
deployments Generator (HTTP ingress + scheduler + engine, one hop) / ChampionWatcher with their
Serve options; the Generator's `user_config` holds GeneratorOptions fields. Changing a user_config is a
lightweight update: Serve calls reconfigure on the running replicas, nothing restarts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

APP_IMPORT_PATH = "detailflow.platform.serving.app:build_app"
GENERATOR, WATCHER = "Generator", "ChampionWatcher"  # deployment names (Generator is also the ingress)
BACKENDS = ("batch", "engine")
DTYPES = ("float32", "bfloat16")
ENGINE_MODES = ("eager", "static", "graph")


class ServeConfigError(ValueError):
    """A serve option is unknown or out of range; the message names the field and the rule."""


def _from_dict(cls, data: dict | None, where: str):
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ServeConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    typed = {}
    for f in dataclasses.fields(cls):
        if f.name not in data or data[f.name] is None:
            continue
        value, kind = data[f.name], f.type if isinstance(f.type, str) else f.type.__name__
        try:
            if kind == "bool":
                if isinstance(value, str):
                    value = value.strip().lower() in ("1", "true", "yes", "on")
                typed[f.name] = bool(value)
            elif kind in ("int", "float", "str"):
                typed[f.name] = {"int": int, "float": float, "str": str}[kind](value)
            else:
                typed[f.name] = value
        except (TypeError, ValueError) as exc:
            raise ServeConfigError(f"{where}.{f.name}: expected {kind}, got {value!r}") from exc
    return cls(**typed)


@dataclass
class GeneratorOptions:
    """The Generator deployment's user_config (read in reconfigure; changing it restarts nothing)."""

    model: str = "smoke"  # registered base name: the Generator serves `<model>-generator`
    alias: str = "champion"  # registry alias followed while `version` is empty
    version: str = ""  # pinned registered version; "" = resolve `alias` now (the watcher writes it)
    backend: str = "engine"  # "engine": continuous batching engine; "batch": @serve.batch + grouped sampler
    max_batch_size: int = 16  # images per sampler call (a request for K images counts K)
    batch_wait_timeout_s: float = 0.02  # how long a batch's first request waits for batch-mates
    max_images_per_request: int = 16  # bound on len(class_ids) * num_images (<= max_batch_size)
    max_pending_images: int = 0  # images a replica admits at once (running + queued); 0 = 2 * max_batch_size
    cache_entries: int = 256  # results of seeded requests kept (LRU, per replica); 0 = no cache
    engine_slots: int = 0  # backend "engine": KV-cache rows (a guided image takes 2); 0 = 2 * max_batch_size
    engine_mode: str = "eager"  # backend "engine": eager | static | graph (CUDA graphs, GPU only)
    engine_process: bool = True  # backend "engine": run the engine in a child process of the replica
    # (engine_process.py: the HTTP work never holds its GIL); false = a thread of the replica (A/B, debugging)
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    ar_dtype: str = "float32"  # float32 | bfloat16: AR weights and KV cache (the tokenizer stays fp32)
    torch_threads: int = 0  # intra-op threads per replica; 0 = torch's default
    gil_switch_interval_ms: float = 0.0  # the replica's sys.setswitchinterval: how long a thread holding
    # the GIL keeps it while another waits (the event loop behind the engine's thread); 0 = Python's 5 ms
    # (0.5 measured worse on the 2-vCPU box: c16 0.60/0.62 x in-process against 0.64/0.66, more replica CPU)
    simulated_pass_s: float = 0.0  # sleep after every forward pass: a big model's latency on a CPU box
    # (tests and load experiments only; 0 in every shipped config)

    def __post_init__(self) -> None:
        rules = [
            (bool(self.model.strip()), "model", "must not be empty"),
            (bool(self.alias.strip()) or bool(self.version), "alias", "must not be empty without a version"),
            (self.backend in BACKENDS, "backend", f"must be one of {list(BACKENDS)}"),
            (self.max_batch_size >= 1, "max_batch_size", "must be >= 1"),
            (self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s", "must be >= 0"),
            (1 <= self.max_images_per_request <= self.max_batch_size, "max_images_per_request",
             f"must be in [1, max_batch_size={self.max_batch_size}]"),
            (self.ar_dtype in DTYPES, "ar_dtype", f"must be one of {list(DTYPES)}"),
            (self.max_pending_images == 0 or self.max_pending_images >= self.max_images_per_request,
             "max_pending_images", f"must be 0 or >= max_images_per_request={self.max_images_per_request}"),
            (self.cache_entries >= 0, "cache_entries", "must be >= 0"),
            (self.engine_slots >= 0, "engine_slots", "must be >= 0"),
            (self.engine_mode in ENGINE_MODES, "engine_mode", f"must be one of {list(ENGINE_MODES)}"),
            (self.torch_threads >= 0, "torch_threads", "must be >= 0"),
            (self.gil_switch_interval_ms >= 0, "gil_switch_interval_ms", "must be >= 0"),
            (self.simulated_pass_s >= 0, "simulated_pass_s", "must be >= 0"),
        ]
        for ok, name, rule in rules:
            if not ok:
                raise ServeConfigError(f"Generator user_config.{name} {rule} (got {getattr(self, name)!r})")

    @classmethod
    def from_dict(cls, data: dict | None) -> GeneratorOptions:
        return _from_dict(cls, data, "Generator user_config")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def registered_model(self) -> str:
        return f"{self.model}-generator"


@dataclass
class AppArgs:
    """`args` of the application (app.build_app): the HTTP front and the watcher."""

    api_keys_env: str = "DETAILFLOW_API_KEYS"  # env var: comma-separated bearer keys (or sha256:<hex>)
    revoked_keys_env: str = "DETAILFLOW_API_KEYS_REVOKED"  # env var: comma-separated revoked keys
    api_keys_file: str = ""  # secret file, one key per line (see auth.py); "" = $DETAILFLOW_API_KEYS_FILE
    allow_anonymous: bool = False  # with no key configured at all, serve without auth (local dev only)
    request_timeout_s: float = 120.0  # a request not answered by then gets 504 (and is cancelled)
    retry_after_s: int = 2  # the Retry-After value (seconds) on 503 answers
    max_body_bytes: int = 65536  # larger request bodies get 413 before they are parsed
    rate_limit_rps: float = 0.0  # default requests/s per key (token bucket); 0 = unlimited; the key
    # file may set rate=R per key
    rate_burst: int = 0  # bucket size per key; 0 = max(1, 2 * rate); key file: burst=B
    daily_image_quota: int = 0  # default images per key per UTC day; 0 = unlimited; key file: quota=Q
    watch_alias: bool = True  # run the ChampionWatcher (it pins the alias' version in the user_config)
    poll_interval_s: float = 10.0  # how often the watcher reads the alias
    max_grid_columns: int = 8  # images per row of a PNG grid

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0:
            raise ServeConfigError(f"args.request_timeout_s must be > 0 (got {self.request_timeout_s})")
        if self.retry_after_s < 1:
            raise ServeConfigError(f"args.retry_after_s must be >= 1 (got {self.retry_after_s})")
        if self.poll_interval_s <= 0:
            raise ServeConfigError(f"args.poll_interval_s must be > 0 (got {self.poll_interval_s})")
        if self.max_body_bytes < 1024:
            raise ServeConfigError(f"args.max_body_bytes must be >= 1024 (got {self.max_body_bytes})")
        if self.rate_limit_rps < 0 or self.rate_burst < 0 or self.daily_image_quota < 0:
            raise ServeConfigError("args.rate_limit_rps, rate_burst and daily_image_quota must be >= 0")
        if self.max_grid_columns < 1:
            raise ServeConfigError(f"args.max_grid_columns must be >= 1 (got {self.max_grid_columns})")

    @classmethod
    def from_dict(cls, data: dict | None) -> AppArgs:
        return _from_dict(cls, data, "application args")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ServeFile:
    """A parsed serve file: Ray's validated schema plus our typed view of the one application."""

    schema: object  # ray.serve.schema.ServeDeploySchema
    app_name: str  # the application's name
    route_prefix: str  # where the ingress is mounted ("/" normally)
    args: AppArgs  # the application's args
    generator: GeneratorOptions  # the Generator's user_config (defaults where the file is silent)
    raw: dict = field(repr=False, default_factory=dict)  # the YAML as loaded

    @property
    def http_host(self) -> str:
        return self.schema.http_options.host

    @property
    def http_port(self) -> int:
        return self.schema.http_options.port


def deployment_entry(app: dict, name: str) -> dict | None:
    return next((d for d in app.get("deployments") or [] if d.get("name") == name), None)


def parse_serve_config(raw: dict, where: str = "serve config") -> ServeFile:
    """Validate a serve config dict (Ray's schema + our args/user_config); ServeConfigError if not."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise ServeConfigError(f"{where}: {exc}") from exc
    ours = [a for a in raw.get("applications") or [] if a.get("import_path") == APP_IMPORT_PATH]
    if len(ours) != 1:
        raise ServeConfigError(f"{where}: expected exactly one application with import_path "
                               f"{APP_IMPORT_PATH}, found {len(ours)}")
    app = ours[0]
    gen = deployment_entry(app, GENERATOR) or {}
    return ServeFile(schema=schema, app_name=app.get("name", "default"),
                     route_prefix=app.get("route_prefix", "/"), args=AppArgs.from_dict(app.get("args")),
                     generator=GeneratorOptions.from_dict(gen.get("user_config")), raw=raw)


def load_serve_file(path: str | Path) -> ServeFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no serve config at {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ServeConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_serve_config(raw, str(path))
