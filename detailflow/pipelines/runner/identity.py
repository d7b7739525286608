"""What a stage's result depends on, as one content hash: kind, resolved params (which carry the
upstream outputs: dataset versions, codes runs, export URIs), resources, the CONTENT of the config
files it names, the code version and the attempt (bumped by --force). Never the date.

Usage:
    from detailflow.pipelines.runner.identity import code_version, stage_identity
    code_version()      # {"package": "0.1.0", "commit": "<sha>[+dirty-<diff>]", "tree": ..., "image": ...}
    stage_identity("train-tokenizer", params, resources, root, attempt=0)   # 16 hex chars

Code version: DETAILFLOW_CODE_VERSION (baked by an image build, e.g. `--build-arg` -> env) wins;
else, from a checkout, the commit and the git tree of the package folder (`git rev-parse
HEAD:detailflow`), each plus a hash of the package's uncommitted diff (without git: a hash of the
package's .py files); the identity uses the tree, so a
commit that changes no code (README, tests) retrains nothing; the package version always;
DETAILFLOW_IMAGE_DIGEST (the image digest a pod runs) where set. Read once per
process, so a run's stages agree even if the tree is edited while it runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path

CODE_VERSION_ENV = "DETAILFLOW_CODE_VERSION"  # baked at image build: the commit the image holds
IMAGE_DIGEST_ENV = "DETAILFLOW_IMAGE_DIGEST"  # e.g. from the pod spec's image@sha256:...


def _git(args: list[str], cwd: Path) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.decode(errors="replace")


def _commit() -> tuple[str, str]:
    """(commit, tree): the checkout's commit, and the git tree of the package folder plus a hash of
    its uncommitted changes (what the identity uses: a README-only commit retrains nothing)."""
    baked = os.environ.get(CODE_VERSION_ENV, "").strip()
    if baked:
        return baked, baked
    pkg = Path(__file__).resolve().parents[2]  # .../detailflow
    head = _git(["rev-parse", "HEAD"], pkg).strip()
    if not head:  # an install without git (e.g. an image): the package's sources by content
        h = hashlib.sha256()
        for f in sorted(pkg.rglob("*.py")):
            h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
        return "unknown", "src-" + h.hexdigest()[:16]
    tree = _git(["rev-parse", f"{head}:{pkg.name}"], pkg).strip()
    # uncommitted changes to the package are code too (only the package: configs enter by content)
    diff = _git(["diff", "HEAD", "--", str(pkg)], pkg)
    dirty = f"+dirty-{hashlib.sha256(diff.encode()).hexdigest()[:8]}" if diff else ""
    return head + dirty, tree + dirty


@functools.lru_cache(maxsize=1)
def _cached_code() -> tuple[str, tuple[str, str]]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("detailflow")
    except PackageNotFoundError:
        pkg = "unknown"
    return pkg, _commit()


def code_version() -> dict:
    """{"package", "commit", "tree", "image"}: the code a result came from (identity: all but commit)."""
    pkg, (commit, tree) = _cached_code()
    return {"package": pkg, "commit": commit, "tree": tree, "image": os.environ.get(IMAGE_DIGEST_ENV, "")}


def code_version_text(cv: dict | None = None) -> str:
    cv = cv or code_version()
    return f"{cv['package']}@{cv['commit']}" + (f"#{cv['image']}" if cv.get("image") else "")


def config_files(config_keys: tuple[str, ...], params: dict, root: Path) -> dict:
    """sha256 of the files the params name (content, not names or mtimes)."""
    files = {}
    for key in config_keys:
        path = params.get(key)
        if isinstance(path, str) and (root / path).is_file():
            files[key] = hashlib.sha256((root / path).read_bytes()).hexdigest()
    return files


def stage_identity(kind_name: str, params: dict, resources: dict, root: Path, *, attempt: int = 0,
                   code: dict | None = None, config_keys: tuple[str, ...] = ("config",)) -> str:
    """sha256 (16 hex) over everything the stage's result depends on; see the module doc."""
    code = {k: v for k, v in (code or code_version()).items() if k != "commit"}  # tree: the package's
    blob = json.dumps(
        {"kind": kind_name, "params": params, "resources": resources,
         "files": config_files(config_keys, params, root), "code": code, "attempt": attempt},
        sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
