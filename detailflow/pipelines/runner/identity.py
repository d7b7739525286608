"""What a stage's result depends on, as one content hash: kind, resolved params (which carry the
upstream outputs: dataset versions, codes runs, export URIs), resources, the CONTENT of the config
files it names, the code version and the attempt (bumped by --force). Never the date.

Usage:
    from detailflow.pipelines.runner.identity import code_version, stage_identity
    code_version()      # {"package": "0.1.0", "commit": "<sha>[+dirty-<diff>]", "tree": ..., "image": ...}
    stage_identity("train-tokenizer", params, resources, root, attempt=0)   # 16 hex chars

Code version, first found wins: DETAILFLOW_CODE_VERSION (an env override); the build info baked
at build/install (`python -m detailflow.pipelines.runner.identity bake [--commit SHA]`, run by
infra/Dockerfile with `--build-arg DETAILFLOW_COMMIT=$(git rev-parse HEAD)`: detailflow/_build_info.json
= commit, tree, package version and a hash of the package's .py sources), used while the sources
still hash the same - so a pod without .git still has the commit, and a checkout edited after a bake
falls through; else, from a checkout, the commit and the git tree of the package folder (`git
rev-parse HEAD:detailflow`), each plus a hash of the package's uncommitted diff (without git and
without a bake: a hash of the package's .py files, commit "unknown"). The identity uses the tree,
so a commit that changes no code (README, tests) retrains nothing; the package version always;
DETAILFLOW_IMAGE_DIGEST (the image digest a pod runs) where set. Read once per process, so a
run's stages agree even if the tree is edited while it runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path

CODE_VERSION_ENV = "DETAILFLOW_CODE_VERSION"  # an explicit override of commit and tree
IMAGE_DIGEST_ENV = "DETAILFLOW_IMAGE_DIGEST"  # e.g. from the pod spec's image@sha256:...
PACKAGE_DIR = Path(__file__).resolve().parents[2]  # .../detailflow
BUILD_INFO = PACKAGE_DIR / "_build_info.json"  # written by `bake` (git-ignored)


def _git(args: list[str], cwd: Path) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.decode(errors="replace")


def sources_hash(pkg: Path = PACKAGE_DIR) -> str:
    """"src-" + sha256 (16 hex) over the package's .py files, by relative path and content."""
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
    return "src-" + h.hexdigest()[:16]


def _baked() -> tuple[str, str] | None:
    """(commit, tree) of the build info, when it exists and was baked from these very sources."""
    try:
        info = json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("sources") != sources_hash() or not info.get("commit"):
        return None  # edited since the bake (a dev checkout): the checkout decides
    return str(info["commit"]), str(info.get("tree") or info["sources"])


def _commit() -> tuple[str, str]:
    """(commit, tree): the checkout's commit, and the git tree of the package folder plus a hash of
    its uncommitted changes (what the identity uses: a README-only commit retrains nothing)."""
    override = os.environ.get(CODE_VERSION_ENV, "").strip()
    if override:
        return override, override
    baked = _baked()
    if baked is not None:
        return baked
    pkg = PACKAGE_DIR
    head = _git(["rev-parse", "HEAD"], pkg).strip()
    if not head:  # an install without git and without a bake: the package's sources by content
        return "unknown", sources_hash(pkg)
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


def bake(commit: str | None = None, path: Path = BUILD_INFO) -> dict:
    """Write the build info (see the module doc): `commit` as given (an image build passes the
    commit it was built from; .git is not in the image), else the checkout's; returns it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("detailflow")
    except PackageNotFoundError:
        pkg = "unknown"
    src = sources_hash()
    if commit:
        info = {"commit": commit, "tree": src}
    else:
        head, tree = _commit()
        info = {"commit": head, "tree": tree}
    info.update(package=pkg, sources=src)
    path.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="bake the code version into detailflow/_build_info.json")
    parser.add_argument("command", choices=["bake"])
    parser.add_argument("--commit", default="", help="the commit built (default: the checkout's)")
    args = parser.parse_args()
    print(json.dumps(bake(args.commit or None)))
