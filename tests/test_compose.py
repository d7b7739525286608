"""docker-compose.yml: valid against the Compose Specification schema (no Docker engine needed),
and consistent with the settings: env names, service hostnames and ports, pinned images."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from detailflow.platform.runtime import RUNTIME_ENV
from detailflow.platform.settings import ENV_NAMES, all_env_names, load_settings
from detailflow.platform.storage import storage_env

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "tests" / "data" / "schemas" / "compose-spec.json"  # published, see its README
# Third-party variables the stack may set besides the settings' own.
EXTERNAL_ENV = set(storage_env(load_settings(environ={}))) | set(RUNTIME_ENV) | {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "DS_ACCELERATOR"}
REQUIRED_SERVICES = {"postgres", "seaweedfs", "create-bucket", "mlflow", "ray-head", "ray-worker"}
VAR = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def interpolate(value: str, dotenv: dict[str, str]) -> str:
    return VAR.sub(lambda m: dotenv.get(m.group(1)) or (m.group(2) or ""), value)


def test_validates_against_compose_spec(compose):
    import jsonschema

    if not SCHEMA.exists():
        pytest.fail(f"compose schema missing at {SCHEMA} (tests/data/schemas/README.md names its source)")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(compose)  # the spec declares draft-07


def test_required_services_and_pinned_images(compose):
    assert REQUIRED_SERVICES <= set(compose["services"])
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} must be pinned"
        assert "healthcheck" in svc or svc.get("restart") == "no", f"{name}: needs a healthcheck"
    mlflow_cmd = " ".join(compose["services"]["mlflow"]["command"])
    assert "postgresql+psycopg2://" in mlflow_cmd, "MLflow 3 needs the psycopg2 driver named explicitly"
    assert "--artifacts-destination=s3://" in mlflow_cmd


def _needs_gpu(svc: dict) -> bool:
    devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    return any("gpu" in d.get("capabilities", []) or d.get("driver") == "nvidia" for d in devices or [])


def test_cpu_host_by_default_gpu_worker_in_a_profile(compose):
    """`docker compose up` on a CPU-only host starts every default service: none reserves a GPU
    (the NVIDIA runtime would be required), a CPU worker gives the 0-CPU head somewhere to run
    tasks, and the GPU worker (its image a CUDA build) comes only with `--profile gpu`."""
    services = compose["services"]
    default = {n: s for n, s in services.items() if not s.get("profiles")}
    assert REQUIRED_SERVICES <= set(default)
    for name, svc in default.items():
        assert not _needs_gpu(svc), f"{name} needs the NVIDIA runtime but runs without a profile"
        assert svc.get("environment", {}).get("DETAILFLOW_DEVICE", "cpu") == "cpu", name
        assert "cpu" in str((svc.get("build") or {}).get("args", {}).get("TORCH_CUDA", "cpu")), name
    gpu = [n for n, s in services.items() if _needs_gpu(s)]
    assert gpu == ["ray-worker-gpu"] and services["ray-worker-gpu"]["profiles"] == ["gpu"]
    assert services["ray-worker-gpu"]["build"]["args"]["TORCH_CUDA"].startswith("cu")
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        assert services[name].get("shm_size"), f"{name}: Ray needs shm_size"


def test_env_names_match_settings(compose):
    known = all_env_names() | EXTERNAL_ENV
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        for key in env:
            if key.startswith("DETAILFLOW_"):
                assert key in all_env_names(), f"{name}: {key} is not a detailflow setting"
            elif key.startswith(("AWS_", "MLFLOW_", "RAY_")):
                assert key in known, f"{name}: unknown variable {key}"


def test_settings_in_compose_name_existing_services(compose, dotenv):
    services = compose["services"]
    listens = {  # service -> ports its command listens on
        "seaweedfs": {8333}, "mlflow": {5000}, "ray-head": {6379, 10001, 8265}}
    for name, svc in services.items():
        env = {k: interpolate(str(v), dotenv) for k, v in (svc.get("environment") or {}).items()}
        if "DETAILFLOW_S3_ENDPOINT_URL" not in env:
            continue
        settings = load_settings(environ=env)  # every value must be a valid setting
        targets = [urlsplit(settings.s3_endpoint_url), urlsplit(settings.mlflow_tracking_uri),
                   urlsplit("tcp://" + settings.ray_address)]
        for url in targets:
            assert url.hostname in services, f"{name}: {url.geturl()} names no compose service"
            assert url.port in listens[url.hostname], f"{name}: {url.geturl()} port not served"
        assert f"s3://{settings.s3_bucket}/" in interpolate(" ".join(services["mlflow"]["command"]), dotenv)


def test_every_interpolated_variable_is_documented(dotenv):
    text = (ROOT / "docker-compose.yml").read_text()
    used = {m.group(1) for m in VAR.finditer(text)}
    missing = used - set(dotenv)
    assert not missing, f".env.example lacks {sorted(missing)}"
    for key in dotenv:
        if key.startswith(("DETAILFLOW_S3", "AWS_")):
            assert key in all_env_names(), f".env.example: {key} is not a settings env name"


def test_dockerfile_builds_from_pinned_ray(compose):
    text = (ROOT / "infra" / "Dockerfile").read_text()
    assert re.search(r"ARG BASE_IMAGE=rayproject/ray:\d+\.\d+\.\d+-py311", text)
    assert "pip install" in text and "detailflow" in text
    assert compose["services"]["ray-head"]["build"]["dockerfile"] == "infra/Dockerfile"


def test_image_installs_from_the_constraints_with_torch_cuda_matched(compose):
    """The image installs infra/constraints-gpu.txt (every runtime dependency pinned ==), torch's
    CUDA build is the base image's CUDA, and the pins are what the tests run with (Ray = the base)."""
    from importlib.metadata import requires, version

    text = (ROOT / "infra" / "Dockerfile").read_text()
    assert "-c /tmp/constraints.txt" in text and "infra/constraints-gpu.txt" in text
    pins = {}
    for line in (ROOT / "infra" / "constraints-gpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, pin = line.split("==")
            pins[re.sub(r"\[.*\]", "", name).lower()] = pin
    deps = {re.split(r"[<>=\[ ;]", r)[0].lower() for r in requires("detailflow") if "extra ==" not in r}
    assert deps <= set(pins), f"unpinned in the image: {sorted(deps - set(pins))}"
    base_cuda = re.search(r"ARG BASE_IMAGE=rayproject/ray:([\d.]+)-py311-(cu\d+)", text)
    torch_ver, torch_cuda = pins["torch"].split("+")
    assert base_cuda.group(2) == torch_cuda == re.search(r"ARG TORCH_CUDA=(\w+)", text).group(1)
    assert base_cuda.group(1) == pins["ray"] == version("ray")
    assert torch_ver == version("torch").split("+")[0] and pins["deepspeed"] == version("deepspeed")


def test_settings_table_mentions_each_env_var():
    readme = (ROOT / "README.md").read_text()
    for names in ENV_NAMES.values():
        for env_name in names:
            assert env_name in readme, f"README settings table lacks {env_name}"


@pytest.mark.parametrize("breakage", [
    lambda c: c["services"]["mlflow"].update(bogus_key=1),
    lambda c: c["services"]["ray-head"].update(shm_size=[1]),
    lambda c: c["services"]["seaweedfs"]["healthcheck"].update(interval={"s": 5}),
])
def test_schema_rejects_broken_files(compose, breakage):
    """The validation above can fail: the schema catches typos and wrong types."""
    import copy

    import jsonschema

    broken = copy.deepcopy(compose)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(broken)


def test_every_image_build_passes_the_commit_the_dockerfile_bakes(compose):
    """The image has no .git: the code version (run identity, lineage) is the commit given at build."""
    import re

    declared = set(re.findall(r"^ARG (\w+)", (ROOT / "infra" / "Dockerfile").read_text(), re.M))
    assert "DETAILFLOW_COMMIT" in declared
    builds = [s["build"] for s in compose["services"].values() if "build" in s]
    assert builds
    for build in builds:
        assert set(build["args"]) <= declared, set(build["args"]) - declared
        assert "DETAILFLOW_COMMIT" in build["args"], build
