"""Settings: precedence env > file > defaults, masking, validation errors that name the setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from detailflow.platform.settings import (
    DEFAULT_MLFLOW_PORT,
    DEFAULT_S3_PORT_BASE,
    ENV_NAMES,
    Settings,
    SettingsError,
    all_env_names,
    load_settings,
)


def test_defaults_are_local(tmp_path):
    s = load_settings(environ={"DETAILFLOW_STATE_DIR": str(tmp_path)})
    assert s.state_dir == tmp_path.resolve()
    assert s.s3_endpoint_url == f"http://127.0.0.1:{DEFAULT_S3_PORT_BASE + 3}"
    assert s.mlflow_tracking_uri == f"http://127.0.0.1:{DEFAULT_MLFLOW_PORT}"
    assert s.uses_local_services
    assert s.aws_access_key_id and s.aws_secret_access_key, "local S3 is never anonymous"
    assert 20000 <= s.s3_port_base and s.s3_port_base + 3 <= 29999 and 20000 <= s.mlflow_port <= 29999


def test_env_overrides_file_overrides_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("s3_bucket: from-file\ns3_region: eu-west-3\nmlflow_port: 24001\n")
    env = {"DETAILFLOW_CONFIG": str(cfg), "DETAILFLOW_S3_BUCKET": "from-env"}
    s = load_settings(environ=env)
    assert s.s3_bucket == "from-env"  # env beats file
    assert s.s3_region == "eu-west-3"  # file beats default
    assert s.mlflow_port == 24001 and s.mlflow_tracking_uri == "http://127.0.0.1:24001"
    assert s.config_file == str(cfg)
    # an explicit config_file argument (the CLI's --config) wins over DETAILFLOW_CONFIG
    other = tmp_path / "d.yaml"
    other.write_text("s3_region: ap-south-1\n")
    assert load_settings(str(other), environ=env).s3_region == "ap-south-1"


@pytest.mark.parametrize("env_name,field,value", [
    ("AWS_ENDPOINT_URL_S3", "s3_endpoint_url", "https://s3.example.com"),
    ("DETAILFLOW_S3_ENDPOINT_URL", "s3_endpoint_url", "http://seaweedfs:8333"),
    ("AWS_DEFAULT_REGION", "s3_region", "us-west-2"),
    ("AWS_ACCESS_KEY_ID", "aws_access_key_id", "AKIAEXAMPLE"),
    ("MLFLOW_TRACKING_URI", "mlflow_tracking_uri", "http://mlflow:5000"),
    ("DETAILFLOW_RAY_ADDRESS", "ray_address", "ray://head:10001"),
    ("DETAILFLOW_DEVICE", "device", "cuda:1"),
    ("DETAILFLOW_S3_PORT_BASE", "s3_port_base", 25000),
])
def test_each_env_var(env_name, field, value, tmp_path):
    s = load_settings(environ={"DETAILFLOW_STATE_DIR": str(tmp_path), env_name: str(value)})
    assert getattr(s, field) == value


def test_detailflow_endpoint_beats_aws_one(tmp_path):
    s = load_settings(environ={"AWS_ENDPOINT_URL_S3": "http://a:1", "DETAILFLOW_S3_ENDPOINT_URL": "http://b:2"})
    assert s.s3_endpoint_url == "http://b:2"
    assert not s.uses_local_services


def test_masked_hides_secrets():
    s = load_settings(environ={"AWS_ACCESS_KEY_ID": "AKIA-VISIBLE?", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"})
    shown = json.dumps(s.masked())
    assert "s3cr3t-value" not in shown and "AKIA-VISIBLE?" not in shown
    assert s.masked()["aws_secret_access_key"] == "********"
    assert s.masked()["s3_bucket"] == s.s3_bucket


@pytest.mark.parametrize("env,needle", [
    ({"DETAILFLOW_S3_ENDPOINT_URL": "localhost:9000"}, "s3_endpoint_url"),
    ({"AWS_ENDPOINT_URL_S3": "ftp://host:21"}, "AWS_ENDPOINT_URL_S3"),
    ({"DETAILFLOW_S3_ENDPOINT_URL": "http://host:99999"}, "s3_endpoint_url"),
    ({"DETAILFLOW_S3_ENDPOINT_URL": "http://host:9000/some/path"}, "s3_endpoint_url"),
    ({"MLFLOW_TRACKING_URI": "http://"}, "mlflow_tracking_uri"),
    ({"DETAILFLOW_S3_PORT_BASE": "notanumber"}, "s3_port_base"),
    ({"DETAILFLOW_S3_PORT_BASE": "60000"}, "DETAILFLOW_S3_PORT_BASE"),
    ({"DETAILFLOW_DEVICE": "tpu"}, "device"),
])
def test_invalid_values_name_the_setting(env, needle):
    with pytest.raises(SettingsError, match=needle):
        load_settings(environ=env)


def test_bad_config_files(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(str(tmp_path / "missing.yaml"), environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("s3_bukket: typo\n")
    with pytest.raises(SettingsError, match="s3_bukket"):
        load_settings(str(bad), environ={})
    bad.write_text("s3_endpoint_url: not a url\n")
    with pytest.raises(SettingsError, match="s3_endpoint_url"):
        load_settings(str(bad), environ={})


def test_to_env_round_trips(tmp_path):
    s = load_settings(environ={"DETAILFLOW_STATE_DIR": str(tmp_path), "DETAILFLOW_S3_PORT_BASE": "24440",
                               "AWS_SECRET_ACCESS_KEY": "abc"})
    assert load_settings(environ=s.to_env()) == s
    assert set(s.to_env()) <= all_env_names()


def test_every_field_has_an_env_name():
    import dataclasses

    fields = {f.name for f in dataclasses.fields(Settings)} - {"config_file"}
    assert fields == set(ENV_NAMES)


def test_default_state_dir(tmp_path, monkeypatch):
    from detailflow.platform.settings import default_state_dir

    (tmp_path / "proj" / "sub").mkdir(parents=True)
    (tmp_path / "proj" / "pyproject.toml").write_text("")
    assert default_state_dir(tmp_path / "proj" / "sub") == (tmp_path / "proj" / ".detailflow").resolve()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir(Path("/")) == tmp_path / "home" / ".detailflow"


def test_cli_config_show_masks_and_errors(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DETAILFLOW_STATE_DIR": str(tmp_path),
           "AWS_SECRET_ACCESS_KEY": "very-secret-42"}
    out = subprocess.run([sys.executable, "-m", "detailflow.cli", "config", "show", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["aws_secret_access_key"] == "********" and "very-secret-42" not in out.stdout
    env["DETAILFLOW_S3_ENDPOINT_URL"] = "nonsense"
    bad = subprocess.run([sys.executable, "-m", "detailflow.cli", "config", "show"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "s3_endpoint_url" in bad.stderr
