"""The runner as a scheduler meets it, on the real local S3 + MLflow, with cheap stages (no Ray):
one run at a time (S3 lease), identity by content (new data / code / --force / --from retrain, a
same-content re-run skips, a skip whose output was deleted re-runs), SIGTERM mid-stage -> FAILED
and resumable, the webhook, and `pipeline history`."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from detailflow.pipelines.runner import stages as stages_mod

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def source(params, ctx):  # volatile, like ingest: its version is the content of a file outside
    return {"version": Path(params["file"]).read_text().strip()}


def train(params, ctx):  # like a training stage: its run is named by the identity; output is a file
    out = Path(params["out"]) / f"{ctx.stage}-{ctx.identity}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(params))
    CALLS.append(ctx.stage)
    return {"run_name": f"{ctx.stage}-{ctx.identity}", "path": str(out)}


def gate(params, ctx):  # like promote: a decision the webhook reports
    return {"decision": params["decision"]}


def hold(params, ctx):  # waits until told (the concurrency test holds a run inside a stage)
    HELD.set()
    assert RELEASE.wait(60)
    return {"ok": 1}


def boom(params, ctx):
    raise RuntimeError("injected failure")


CALLS: list[str] = []
HELD, RELEASE = threading.Event(), threading.Event()
_exists = lambda out, ctx: Path(out["path"]).is_file()  # noqa: E731
TEST_KINDS = {
    "source": stages_mod.Kind(source, ("version",), volatile=True),
    "train": stages_mod.Kind(train, ("run_name", "path"), exists=_exists),
    "gate": stages_mod.Kind(gate, ("decision",)),
    "hold": stages_mod.Kind(hold, ("ok",)),
    "boom": stages_mod.Kind(boom, ("ok",)),
}


@pytest.fixture
def kinds(monkeypatch):
    all_kinds = {**stages_mod.KINDS, **TEST_KINDS}
    monkeypatch.setattr(stages_mod, "KINDS", all_kinds)
    monkeypatch.setattr("detailflow.pipelines.runner.runner.KINDS", all_kinds)
    CALLS.clear()
    return all_kinds


def _spec(tmp_path, kinds, name, stages: str):
    from detailflow.pipelines.runner.spec import load_pipeline

    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nstages:\n" + textwrap.indent(textwrap.dedent(stages), "  "))
    return load_pipeline(path, kinds)


def _statuses(summary):
    return {k: v["status"] for k, v in summary.items()}


def test_identity_by_content_new_data_code_force_from_and_deleted_outputs(
        services, storage, kinds, tmp_path, monkeypatch):
    from detailflow.pipelines.runner.runner import run_pipeline

    data = tmp_path / "data-version"
    data.write_text("v1")
    spec = _spec(tmp_path, kinds, "ident-test", f"""
        - {{name: data, kind: source, params: {{file: {data}}}}}
        - {{name: a, kind: train, params: {{out: {tmp_path}/a, dataset_version: "${{stages.data.version}}"}}}}
        - {{name: b, kind: train, params: {{out: {tmp_path}/b, upstream: "${{stages.a.run_name}}"}}}}
        """)

    def run(**kw):
        CALLS.clear()
        s = run_pipeline(spec, services, log=lambda m: None, **kw)
        return _statuses(s), {k: v["outputs"].get("run_name") for k, v in s.items()}

    first, names1 = run()
    assert first == {"data": "ran", "a": "ran", "b": "ran"}
    assert run()[0] == {"data": "ran", "a": "skipped", "b": "skipped"} and CALLS == []  # same content
    data.write_text("v2")  # new data, same day, same dataset name
    st, names2 = run()
    assert st == {"data": "ran", "a": "ran", "b": "ran"} and names2["a"] != names1["a"]
    st, names3 = run(force=("a",))  # a new attempt: a new run name, and b follows
    assert st == {"data": "ran", "a": "ran", "b": "ran"} and names3["a"] not in (names1["a"], names2["a"])
    assert run()[0]["a"] == "skipped"  # the forced attempt is now the recorded one
    st, names4 = run(from_stage="b")
    assert st == {"data": "ran", "a": "skipped", "b": "ran"} and names4["b"] != names3["b"]
    monkeypatch.setenv("DETAILFLOW_IMAGE_DIGEST", "sha256:new-image")  # a code change
    st, names5 = run()
    assert st == {"data": "ran", "a": "ran", "b": "ran"} and names5["a"] != names4["a"]
    Path(tmp_path / "b" / f"{names5['b']}.txt").unlink()  # e.g. `make clean` removed the output
    assert run()[0] == {"data": "ran", "a": "skipped", "b": "ran"} and CALLS == ["b"]


def test_second_run_is_refused_with_the_holder_and_touches_nothing(services, storage, kinds, tmp_path):
    from mlflow.tracking import MlflowClient

    from detailflow.pipelines.runner.lease import LeaseHeld, lease_key
    from detailflow.pipelines.runner.runner import read_state, run_pipeline, state_key

    spec = _spec(tmp_path, kinds, "lease-test", "- {name: slow, kind: hold}\n")
    HELD.clear()
    RELEASE.clear()
    result = {}
    first = threading.Thread(target=lambda: result.update(run_pipeline(spec, services, log=lambda m: None)))
    first.start()
    try:
        assert HELD.wait(60)
        lease_before, state_before = storage.get_json_etag(lease_key("lease-test")), \
            storage.get_json_etag(state_key("lease-test"))
        with pytest.raises(LeaseHeld, match=f"host .*, pid {os.getpid()}, started .*, run ") as exc:
            run_pipeline(spec, services, log=lambda m: None)
        assert exc.value.holder["run_id"] == lease_before[0]["run_id"]
        assert storage.get_json_etag(state_key("lease-test")) == state_before  # not rewritten
        assert storage.get_json_etag(lease_key("lease-test"))[1] == lease_before[1]
    finally:
        RELEASE.set()
        first.join(60)
    assert _statuses(result) == {"slow": "ran"} and not storage.exists(lease_key("lease-test"))
    client = MlflowClient(services.mlflow_tracking_uri)
    exp = client.get_experiment_by_name("detailflow-pipelines")
    parents = client.search_runs([exp.experiment_id], "tags.`detailflow.pipeline` = 'lease-test' and "
                                 "attributes.run_name LIKE 'pipeline-%'")
    assert [p.info.status for p in parents] == ["FINISHED"]  # the refused run started nothing

    # a lease whose holder died (expired) is taken over; a live one is not
    storage.put_json(lease_key("lease-test"), {"host": "gone", "pid": 1, "run_id": "dead",
                                               "started": "x", "expires": time.time() - 1})
    RELEASE.set()
    assert _statuses(run_pipeline(spec, services, force=("slow",), log=lambda m: None)) == {"slow": "ran"}
    assert read_state(storage, "lease-test")["stages"]["slow"]["attempt"] == 1


class _Hook(http.server.BaseHTTPRequestHandler):
    events: list = []

    def do_POST(self):  # noqa: N802
        _Hook.events.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_failure_and_decisions_call_the_webhook_and_history_lists_invocations(
        services, storage, kinds, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from detailflow.cli import main
    from detailflow.pipelines.runner.runner import StageFailed, run_pipeline

    server = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DETAILFLOW_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hook")
    monkeypatch.setenv("POD_NAME", "trainer-pod-7")
    _Hook.events.clear()
    try:
        ok = _spec(tmp_path, kinds, "hook-test", """
            - {name: promote, kind: gate, params: {decision: promoted}}
            - {name: promote-2, kind: gate, params: {decision: rejected}}
            """)
        run_pipeline(ok, services, log=lambda m: None)
        bad = _spec(tmp_path, kinds, "hook-test", "- {name: broken, kind: boom}\n")
        with pytest.raises(StageFailed, match=r"(?s)injected failure.*pod trainer-pod-7"):
            run_pipeline(bad, services, log=lambda m: None)
    finally:
        server.shutdown()
    assert [(e["event"], e["stage"]) for e in _Hook.events] == [
        ("promoted", "promote"), ("rejected", "promote-2"), ("stage_failed", "broken")]
    assert "injected failure" in _Hook.events[2]["error"] and "trainer-pod-7" in _Hook.events[2]["logs"]
    out = CliRunner().invoke(main, ["pipeline", "history", "hook-test", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [r["status"] for r in rows] == ["failed", "done"]  # newest first
    assert rows[0]["error"].startswith("broken: RuntimeError") and rows[1]["stages"] == {
        "promote": "ran", "promote-2": "ran"}


SIGTERM_SCRIPT = """
import sys, time
from pathlib import Path
import mlflow
from mlflow.tracking import MlflowClient
from detailflow.pipelines.runner import stages as S, runner
from detailflow.pipelines.runner.spec import load_pipeline
from detailflow.platform.settings import load_settings

def slow(params, ctx):  # like training: its own MLflow run carries the identity param
    client = MlflowClient(ctx.settings.mlflow_tracking_uri)
    exp = client.get_experiment_by_name("sigterm-train") or client.create_experiment("sigterm-train")
    exp = exp if isinstance(exp, str) else exp.experiment_id
    run = client.create_run(exp, run_name="train-" + ctx.identity)
    client.log_param(run.info.run_id, "identity", ctx.identity)
    Path(sys.argv[2]).write_text(run.info.run_id)
    if sys.argv[3] == "slow":
        time.sleep(120)
    client.set_terminated(run.info.run_id, "FINISHED")
    return {"ok": 1}

kinds = {**S.KINDS, "slow": S.Kind(slow, ("ok",))}
S.KINDS.update(kinds); runner.KINDS.update(kinds)
print(runner.run_pipeline(load_pipeline(sys.argv[1], kinds), load_settings(), log=print))
"""


def test_sigterm_mid_stage_ends_runs_failed_and_leaves_the_pipeline_resumable(services, storage, tmp_path):
    from mlflow.tracking import MlflowClient

    from detailflow.pipelines.runner.lease import lease_key
    from detailflow.pipelines.runner.runner import read_state

    (tmp_path / "p.yaml").write_text("name: sigterm-test\nstages:\n  - {name: train, kind: slow}\n")
    script = tmp_path / "run.py"
    script.write_text(SIGTERM_SCRIPT)
    marker = tmp_path / "run-id"
    env = {**os.environ, "DETAILFLOW_CODE_VERSION": "pinned"}  # others may edit the tree meanwhile
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "p.yaml"), str(marker), "slow"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 90
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0 and "Terminated: SIGTERM" in output, output
    rec = read_state(storage, "sigterm-test")["stages"]["train"]
    assert rec["status"] == "failed" and rec["error"] == "Terminated: SIGTERM"
    client = MlflowClient(services.mlflow_tracking_uri)
    stage_run = client.get_run(rec["mlflow_run_id"])
    parent = client.get_run(stage_run.data.tags["mlflow.parentRunId"])
    train_run = client.get_run(marker.read_text())
    for r in (stage_run, parent, train_run):
        assert r.info.status == "FAILED", r.info
    assert "SIGTERM" in train_run.data.tags["detailflow.error"]
    assert not storage.exists(lease_key("sigterm-test"))  # released: the next run may start at once

    rerun = subprocess.run([sys.executable, str(script), str(tmp_path / "p.yaml"), str(marker), "fast"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    after = read_state(storage, "sigterm-test")["stages"]["train"]
    assert after["status"] == "done" and after["identity"] == rec["identity"] and after["attempts"] == 2


def test_training_reads_the_recorded_dataset_version_after_the_pointer_moved(services, storage, tmp_path):
    """ingest v1, then v2 of the same name (the pointer moves): a stage and a reader given v1 - the
    version the pipeline recorded, as a resumed run has it - read v1's manifest and shards."""
    import pyarrow.parquet as pq

    from detailflow.models.configs import get_model_config
    from detailflow.models.resolution import ResolutionMap
    from detailflow.pipelines.data import synth
    from detailflow.pipelines.data.ingest import IngestConfig, ingest
    from detailflow.pipelines.data.plan import RowGroups
    from detailflow.pipelines.data.reader import DegradedStream, ReaderConfig, read_manifest_checked
    from detailflow.pipelines.data.sources import list_source
    from detailflow.pipelines.runner.stages import StageContext, _check_dataset_version
    from detailflow.pipelines.train.tokenizer import TokenizerStageConfig

    name = f"moving-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    cfg = IngestConfig(name=name, split="train", shard_mb=0.002, row_group_rows=2, use_ray=False)
    keys = {}
    for version, (seed, per_class) in {"v1": (0, 2), "v2": (1, 3)}.items():
        src = tmp_path / version
        synth.write_folder(src, size=16, per_class=per_class, val_per_class=1, seed=seed)
        keys[version] = sorted(it.key for it in list_source(str(src), "train")[0])
        keys[version + "_id"] = ingest(storage, str(src), cfg)["version"]
    v1, v2 = keys["v1_id"], keys["v2_id"]
    assert v1 != v2 and storage.read_manifest(f"datasets/{name}/train")["version"] == v2  # pointer moved

    manifest = read_manifest_checked(storage, name, "train", v1)
    fs = storage.filesystem()
    read = sorted(k for s in manifest["shards"]
                  for k in pq.read_table(storage.fs_path(s["key"]), filesystem=fs, columns=["key"])["key"]
                  .to_pylist())
    assert manifest["version"] == v1 and read == keys["v1"] != keys["v2"]  # v1's images, not the pointer's

    tok = get_model_config("smoke").tokenizer
    reader = ReaderConfig(tok.image_size, micro_batch=2, window_groups=2)
    stream = DegradedStream(storage, name, "train", reader, ResolutionMap.from_config(tok), version=v1)
    want = RowGroups.from_manifest(manifest)  # the plan is over v1's shards and row groups
    assert stream.plan.groups.paths == want.paths and list(stream.plan.groups.rows) == list(want.rows)
    assert sum(want.rows) == len(keys["v1"])

    ctx = StageContext(settings=services, pipeline="p", stage="tokenizer", identity="x", resources={})
    stage_cfg = TokenizerStageConfig(dataset=name, dataset_version=v1)
    _check_dataset_version(stage_cfg, ctx)  # the old code refused: "now points at version v2"
    with pytest.raises(FileNotFoundError, match="version nope"):
        _check_dataset_version(TokenizerStageConfig(dataset=name, dataset_version="nope"), ctx)


def test_baked_code_version_wins_over_git_and_enters_the_identity(tmp_path):
    """`identity bake --commit C` (what infra/Dockerfile runs): the package then reports C, not what a
    runtime `git` says (a pod has no .git); an edit after the bake falls back to the checkout; the
    package version and the baked tree enter the stage identity."""
    import shutil

    pkg = tmp_path / "detailflow"
    shutil.copytree(ROOT / "detailflow", pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "_build_info.json"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("DETAILFLOW_CODE_VERSION", "DETAILFLOW_IMAGE_DIGEST")}
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, env=env, capture_output=True, text=True,  # noqa: E731
                                    check=True).stdout.strip()
    git("init", "-q")
    git("add", "detailflow")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c1")
    head = git("rev-parse", "HEAD")
    probe = ("import json, pathlib, sys; sys.path.insert(0, sys.argv[1]); "
             "from detailflow.pipelines.runner import identity; cv = identity.code_version(); "
             "print(json.dumps([cv, identity.stage_identity('k', {}, {}, pathlib.Path('.'))]))")

    def run(*args):
        out = subprocess.run([sys.executable, *args], cwd=tmp_path, env={**env, "PYTHONPATH": str(tmp_path)},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    (cv, ident_git) = run("-c", probe, str(tmp_path))
    assert cv["commit"] == head  # no bake: the checkout's commit
    baked = run("-m", "detailflow.pipelines.runner.identity", "bake", "--commit", "c0ffee" * 6 + "beef")
    assert json.loads((pkg / "_build_info.json").read_text()) == baked
    (cv, ident_baked) = run("-c", probe, str(tmp_path))
    assert cv["commit"] == "c0ffee" * 6 + "beef" != head and cv["tree"] == baked["tree"]  # the bake wins
    assert cv["package"] == baked["package"] and ident_baked != ident_git  # and it is the identity's code
    with open(pkg / "models" / "__init__.py", "a") as f:
        f.write("\n# edited after the bake\n")
    (cv, _) = run("-c", probe, str(tmp_path))
    assert cv["commit"].startswith(head + "+dirty-")  # a stale bake is ignored: the checkout decides
