"""Pipeline files and the runner: schema errors name the field; content hashes; on the real local S3 +
MLflow + Ray: a re-run skips what is done, a failed stage resumes on the next run (earlier stages
skipped), MLflow holds one parent run per invocation with a child run per stage that ran."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from detailflow.pipelines.runner import stages as stages_mod
from detailflow.pipelines.runner.identity import code_version, stage_identity
from detailflow.pipelines.runner.runner import StageFailed, read_state, run_pipeline
from detailflow.pipelines.runner.spec import PipelineError, load_pipeline, resolve

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, body: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(body))
    return p


@pytest.mark.parametrize(
    "body,match",
    [
        ("name: x\n", "stages"),
        ("name: Bad_Name\nstages: [{name: a, kind: synth}]\n", "name"),
        ("name: x\nstages: [{name: a, kind: nope}]\n", "stages/0/kind: unknown kind 'nope'"),
        ("name: x\nstages: [{name: a, kind: synth}, {name: a, kind: synth}]\n", "duplicate stage name"),
        (
            "name: x\nstages: [{name: a, kind: synth, params: {out: '${stages.b.path}'}},"
            " {name: b, kind: synth}]\n",
            "does not come before it",
        ),
        (
            "name: x\nstages: [{name: a, kind: synth},"
            " {name: b, kind: ingest, params: {src: '${stages.a.nope}'}}]\n",
            "has no output 'nope'",
        ),
        (
            "name: x\nstages: [{name: a, kind: synth, resources: {num_workers: -1}}]\n",
            "stages/0/resources/num_workers",
        ),
        ("name: x\nstages: [{name: a, kind: synth, colour: red}]\n", "colour"),
    ],
)
def test_bad_pipeline_files_fail_with_the_field_named(tmp_path, body, match):
    with pytest.raises(PipelineError, match=match):
        load_pipeline(_write(tmp_path, body))


def test_shipped_pipeline_files_validate():
    files = sorted((ROOT / "configs" / "pipelines").glob("*.yaml"))
    assert any(f.name == "tiny.yaml" for f in files)
    for f in files:
        required = {k for k, v in (yaml.safe_load(f.read_text()).get("vars") or {}).items() if v is None}
        assert load_pipeline(f, variables={k: f"s3://b/{k}" for k in required}).stages


def test_pipeline_variables_fill_params_and_refuse_when_missing_or_unknown(tmp_path):
    body = """
    name: v
    vars: {uri: null, port: 8000}
    stages:
      - name: a
        kind: synth
        params: {out: "${vars.uri}", per_class: 1, note: "at ${vars.uri}:${vars.port}", port: "${vars.port}"}
    """
    path = _write(tmp_path, body)
    with pytest.raises(PipelineError, match=r"uri have no value: give them with --set uri=\.\.\."):
        load_pipeline(path)
    with pytest.raises(PipelineError, match="--set nope: no such variable; the file declares port, uri"):
        load_pipeline(path, variables={"uri": "s3://b/x", "nope": "1"})
    params = load_pipeline(path, variables={"uri": "s3://b/x"}).stages[0].params
    assert params == {"out": "s3://b/x", "per_class": 1, "note": "at s3://b/x:8000", "port": 8000}
    undeclared = _write(tmp_path, body.replace("{uri: null, port: 8000}", "{port: 8000}"))
    with pytest.raises(PipelineError, match=r"\$\{vars.uri\} is used but not declared"):
        load_pipeline(undeclared)


def test_pipeline_variables_size_resources_as_numbers_and_name_a_bad_value(tmp_path):
    from click.testing import CliRunner

    from detailflow.cli import main

    path = _write(tmp_path, """
    name: v
    vars: {WORKERS: 2, CPUS: null}
    stages:
      - name: a
        kind: synth
        resources: {num_workers: "${vars.WORKERS}", cpus_per_worker: "${vars.CPUS}",
                    accelerator: {sim_gpu: "${vars.CPUS}"}, gpus_per_worker: 0}
    """)
    res = load_pipeline(path, variables={"WORKERS": "64", "CPUS": "0.5"}).stages[0].resources
    assert res == {"num_workers": 64, "cpus_per_worker": 0.5, "accelerator": {"sim_gpu": 0.5},
                   "gpus_per_worker": 0}
    assert type(res["num_workers"]) is int
    # the file's default keeps its type; "4" from --set is the int 4, as if written in the file
    res = load_pipeline(path, variables={"CPUS": "4"}).stages[0].resources
    assert res["num_workers"] == 2 and type(res["cpus_per_worker"]) is int and res["cpus_per_worker"] == 4
    bad = {
        ("1.5", "1"): r"stages/0 \(a\): resources/num_workers: '1.5' \(from '\$\{vars.WORKERS\}'\) "
                      "is not an integer",
        ("-3", "1"): r"stages/0 \(a\): resources/num_workers: -3 is less than the minimum of 0",
        ("8", "lots"): r"stages/0 \(a\): resources/cpus_per_worker: 'lots' .* is not a number",
        ("8", "nan"): r"resources/cpus_per_worker: 'nan' .* is not a finite number",
        ("8", "0"): r"resources/accelerator/sim_gpu: 0 is less than or equal to the minimum of 0",
    }
    for (workers, cpus), match in bad.items():
        with pytest.raises(PipelineError, match=match):
            load_pipeline(path, variables={"WORKERS": workers, "CPUS": cpus})
    with pytest.raises(PipelineError, match=r"CPUS have no value: give them with --set CPUS=\.\.\."):
        load_pipeline(path)  # a variable used only in resources is required like one in params
    written = tmp_path / "written.yaml"
    written.write_text("name: x\nstages: [{name: a, kind: synth, resources: {cpus: many}}]\n")
    with pytest.raises(PipelineError, match=r"stages/0/resources/cpus: 'many' is neither a number nor"):
        load_pipeline(written)
    # `pipeline validate` checks them the same way and shows the resources the stage will get
    runner = CliRunner()
    ok = runner.invoke(main, ["pipeline", "validate", str(path), "--set", "WORKERS=64", "--set", "CPUS=2"])
    assert ok.exit_code == 0, ok.output
    assert '"num_workers": 64, "cpus_per_worker": 2' in ok.output
    refused = runner.invoke(main, ["pipeline", "validate", str(path), "--set", "WORKERS=sixty",
                                   "--set", "CPUS=2"])
    assert refused.exit_code == 2 and "resources/num_workers: 'sixty'" in refused.output


def test_resolve_keeps_types_and_interpolates_strings():
    outs = {"a": {"n": 3, "name": "ds"}}
    assert resolve({"x": "${stages.a.n}", "y": "v-${stages.a.name}", "z": ["${stages.a.name}"]}, outs) == {
        "x": 3,
        "y": "v-ds",
        "z": ["ds"],
    }


def test_stage_identity_follows_config_content_code_and_attempt(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 1\n")
    params = {"config": str(cfg), "overrides": {"a": 1}}
    code = {"package": "0.1.0", "commit": "abc", "tree": "t1", "image": ""}

    def ident(p=params, res=None, attempt=0, c=code):
        return stage_identity("train-tokenizer", p, res or {}, tmp_path, attempt=attempt, code=c)

    h1 = ident()
    assert h1 == ident(dict(params))
    assert ident(attempt=1) != h1  # --force: a new attempt
    assert ident(c={**code, "tree": "t2"}) != h1  # a code fix
    assert ident(c={**code, "commit": "abd"}) == h1  # a commit that changes no code (README)
    assert ident(c={**code, "image": "sha256:1"}) != h1  # another image
    assert ident({**params, "overrides": {"a": 1, "dataset_version": "v2"}}) != h1  # new data
    assert ident(res={"num_workers": 4}) != h1
    cfg.write_text("steps: 2\n")
    assert ident() != h1  # same file name, new content


def test_code_version_reads_the_checkout_and_the_image_digest(monkeypatch):
    import subprocess

    cv = code_version()
    commit = cv["commit"].split("+")[0]  # a commit of this checkout (HEAD when computed)
    assert len(commit) == 40 and cv["package"] != "unknown"
    assert subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT).returncode == 0
    tree = subprocess.run(["git", "rev-parse", f"{commit}:detailflow"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()  # the package folder's tree at that commit
    assert cv["tree"].split("+")[0] == tree and cv["tree"].partition("+")[2] == cv["commit"].partition("+")[2]
    monkeypatch.setenv("DETAILFLOW_IMAGE_DIGEST", "sha256:feed")
    assert code_version()["image"] == "sha256:feed"


def test_pipeline_run_names_derive_from_identity_and_checkpoint_layout_not_the_date():
    from detailflow.pipelines.train.stage_config import run_name

    base = {"identity": "0123456789abcdef", "dataset_version": "v1", "micro_batch": 8, "grad_accum": 1,
            "num_workers": 2, "date": "2026-01-01", "steps": 10}
    name = run_name("tokenizer", "tiny", None, base)
    assert name.startswith("tokenizer-tiny-") and "2026" not in name
    assert run_name("tokenizer", "tiny", "2027-05-05", {**base, "date": "2027-05-05"}) == name  # other day
    assert run_name("tokenizer", "tiny", None, {**base, "code_version": "0.1.0@other"}) == name  # lineage
    for change in ({"identity": "fedcba9876543210"}, {"dataset_version": "v2"}, {"num_workers": 4},
                   {"grad_accum": 2}, {"micro_batch": 4}, {"steps": 11}):
        assert run_name("tokenizer", "tiny", None, {**base, **change}) != name, change
    # outside a pipeline (no identity): an explicit label (the config's date field) is kept in the name
    assert run_name("tokenizer", "tiny", "2026-01-01", {**base, "identity": None}).startswith(
        "tokenizer-tiny-2026-01-01-")


@pytest.mark.integration
def test_rerun_skips_done_stages_and_a_failed_stage_resumes(
    services, storage, ray_session, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    marker = tmp_path / "flaky-failed-once"
    calls = []

    def flaky(params, ctx):  # fault injection: fails on its first attempt only
        calls.append(ctx.stage)
        if not marker.exists():
            marker.write_text("x")
            raise RuntimeError("injected failure")
        return {"ok": params["dataset"]}

    kinds = {**stages_mod.KINDS, "flaky": stages_mod.Kind(flaky, ("ok",))}
    monkeypatch.setattr(stages_mod, "KINDS", kinds)
    monkeypatch.setattr("detailflow.pipelines.runner.runner.KINDS", kinds)
    path = _write(
        tmp_path,
        f"""
        name: runner-test
        stages:
          - name: data
            kind: synth
            params: {{out: {tmp_path}/shapes, size: 16, per_class: 4, val_per_class: 1}}
          - name: ingest
            kind: ingest
            params: {{src: "${{stages.data.path}}", name: runner-shapes, local: true}}
          - {{name: check, kind: flaky, params: {{dataset: "${{stages.ingest.name}}"}}}}
        """,
    )
    spec = load_pipeline(path, kinds)
    with pytest.raises(StageFailed, match="stage 'check' failed: RuntimeError: injected failure"):
        run_pipeline(spec, services, log=lambda m: None)
    state = read_state(storage, "runner-test")
    assert [state["stages"][s]["status"] for s in ("data", "ingest", "check")] == ["done", "done", "failed"]
    version = state["stages"]["ingest"]["outputs"]["version"]

    summary = run_pipeline(spec, services, log=lambda m: None)
    # synth is skipped by identity; ingest is volatile (runs, resumes by markers: same version); check resumes
    assert {k: v["status"] for k, v in summary.items()} == {
        "data": "skipped",
        "ingest": "ran",
        "check": "ran",
    }
    assert summary["ingest"]["outputs"]["version"] == version and calls == ["check", "check"]
    again = run_pipeline(spec, services, log=lambda m: None)
    assert again["check"]["status"] == "skipped" and calls == ["check", "check"]
    import shutil  # `make clean` removes the synth folder: the recorded synth must not be trusted

    shutil.rmtree(tmp_path / "shapes")
    after_clean = run_pipeline(spec, services, log=lambda m: None)
    assert {k: v["status"] for k, v in after_clean.items()} == {"data": "ran", "ingest": "ran",
                                                                "check": "skipped"}  # keyed on the name
    assert (tmp_path / "shapes").is_dir()

    client = MlflowClient(services.mlflow_tracking_uri)
    exp = client.get_experiment_by_name("detailflow-pipelines")
    parents = client.search_runs(
        [exp.experiment_id],
        "tags.`detailflow.pipeline` = 'runner-test' and attributes.run_name LIKE 'pipeline-%'",
        order_by=["attributes.start_time ASC"],
    )
    assert [p.info.status for p in parents] == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    assert "injected failure" in parents[0].data.tags["detailflow.error"]
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[1].info.run_id}'"
    )
    assert sorted(c.data.tags["detailflow.stage"] for c in children) == ["check", "ingest"]
    assert parents[1].data.tags["stage.data"] == "skipped"
    failed_child = client.get_run(state["stages"]["check"]["mlflow_run_id"])
    assert failed_child.info.status == "FAILED"


def test_stage_context_is_a_dataclass():  # the kinds' contract stays explicit
    fields = {f.name for f in dataclasses.fields(stages_mod.StageContext)}
    assert fields >= {"settings", "identity", "resources"}


def test_code_version_without_git_hashes_the_package_sources(tmp_path):
    """An install without .git (an image): a code edit still changes the code version."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "detailflow", tmp_path / "detailflow",
                    ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from detailflow.pipelines.runner.identity import "
             "code_version; print(code_version()['tree'])")
    env = {k: v for k, v in os.environ.items() if k != "DETAILFLOW_CODE_VERSION"}

    def tree():
        out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    before = tree()
    assert before.startswith("src-")
    with open(tmp_path / "detailflow" / "models" / "__init__.py", "a") as f:
        f.write("\n# a code change\n")
    assert tree() != before
