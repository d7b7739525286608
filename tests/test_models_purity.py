"""detailflow.models stays pure PyTorch + einops: no ray, mlflow, deepspeed, boto3, pyarrow."""

import pathlib
import re
import subprocess
import sys

FORBIDDEN = ("ray", "mlflow", "deepspeed", "boto3", "pyarrow")
MODELS = pathlib.Path(__file__).resolve().parents[1] / "detailflow" / "models"


def _module_names():
    return sorted(f"detailflow.models.{p.stem}" for p in MODELS.glob("*.py") if p.stem != "__init__")


def test_importing_every_model_module_loads_no_platform_library():
    names = _module_names()
    assert "detailflow.models.tokenizer" in names
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print('BAD', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_no_import_lines_name_platform_libraries():
    pattern = re.compile(r"^\s*(?:import|from)\s+(" + "|".join(FORBIDDEN) + r")\b", re.MULTILINE)
    hits = [
        f"{p.name}: {m.group(0).strip()}"
        for p in MODELS.glob("*.py")
        for m in pattern.finditer(p.read_text())
    ]
    assert not hits, hits
