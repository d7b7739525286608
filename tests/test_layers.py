"""Layers import one way: cli -> pipelines -> platform -> models (DESIGN.md, developers' guide).

A static scan of every import line (module level or inside a function), so a lazy import that
crosses a layer upward fails here too, not only at module load.
"""

import pathlib
import re

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "detailflow"
# layer -> the detailflow subpackages/modules it must never import
FORBIDDEN = {
    "models": ("platform", "pipelines", "cli"),
    "platform": ("pipelines", "cli"),
    "pipelines": ("cli",),
}


def _imports(path: pathlib.Path) -> list[str]:
    """Every `detailflow.<x>` an import line names (`from detailflow.x ...`, `import detailflow.x`,
    `from detailflow import x`)."""
    text = path.read_text()
    found = re.findall(r"^\s*(?:from|import)\s+detailflow\.(\w+)", text, re.MULTILINE)
    for names in re.findall(r"^\s*from\s+detailflow\s+import\s+([\w ,()]+)", text, re.MULTILINE):
        found += [n.strip() for n in names.strip("() ").split(",") if n.strip()]
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_never_imports_upward(layer):
    files = sorted((PKG / layer).rglob("*.py"))
    assert files, layer
    hits = [f"{p.relative_to(PKG)} imports detailflow.{name}"
            for p in files for name in _imports(p) if name in FORBIDDEN[layer]]
    assert not hits, hits


def test_scan_sees_each_import_form(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from detailflow.cli import main\nimport detailflow.pipelines.x\n"
                 "from detailflow import (platform, cli)\ns = 'from detailflow.cli import main'\n")
    assert _imports(f) == ["cli", "pipelines", "platform", "cli"]
