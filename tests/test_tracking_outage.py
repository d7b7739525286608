"""Training never waits on the tracking server (tracking.Tracker is write-behind, tracking_buffer.py).

- unit: with nothing listening at the tracking URI, every log call returns in < 50 ms, finish()
  gives up at its deadline, and every record is in the local spool;
- integration: records a tracker could not send are backfilled by the next tracker on the run;
- integration: the real MLflow server is stopped for DETAILFLOW_OUTAGE_S seconds (60 by default;
  the issue's 5 minutes: DETAILFLOW_OUTAGE_S=300) in the middle of a loop of fake training steps;
  no step stalls, and afterwards every metric and checkpoint record is in MLflow;
- integration: a file above LINK_BYTES goes to S3 directly and the run links it;
- a run STARTED while the server is away: Tracker.start returns at once (the run's creation is
  spooled); the run appears once the server is back (same process), or is backfilled by the next
  tracker of that run name (the next attempt).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest

from detailflow.platform.services import port_free
from detailflow.platform.tracking import LINK_BYTES, LINK_TAG_PREFIX, Tracker, list_checkpoints
from detailflow.platform.tracking_buffer import REJECTED

CALL_LIMIT_S = 0.05  # a log call while the server is away
STEP_STALL_LIMIT_S = 2.0  # a whole fake step (work + logging) while the server is away


@pytest.fixture
def spool_dir(tmp_path, monkeypatch):
    path = tmp_path / "spool"
    monkeypatch.setenv("DETAILFLOW_TRACKING_SPOOL_DIR", str(path))
    return path


def dead_uri() -> str:
    for port in range(29950, 29999):
        if port_free(port):
            return f"http://127.0.0.1:{port}"
    raise RuntimeError("no free port for a dead tracking URI")


def loss_at(step: int) -> float:
    return 1.0 / (1 + step)


def fake_training(tracker: Tracker, steps: range, every: int, work_s: float = 0.1) -> list[float]:
    """Each step logs loss/lr, every `every` steps a checkpoint record; returns each step's log time."""
    times = []
    for step in steps:
        time.sleep(work_s)  # the step's compute
        t0 = time.perf_counter()
        tracker.log_metrics({"loss": loss_at(step), "lr": 1e-3 * step}, step=step)
        if (step + 1) % every == 0:
            tracker.log_checkpoint(f"s3://bucket/runs/outage/checkpoint_{step + 1:06d}", step=step + 1,
                                   metrics={"loss": loss_at(step), "step": step + 1})
        times.append(time.perf_counter() - t0)
    return times


def spooled_records(spool_dir) -> list[dict]:
    return [json.loads(line) for path in sorted(spool_dir.rglob("*.jsonl"))
            for line in path.read_text().splitlines()]


def test_log_calls_return_at_once_and_spool_while_the_server_is_down(spool_dir):
    uri = dead_uri()
    tracker = Tracker.start(uri, experiment="outage", run_name="outage-unit", run_id="0" * 32)
    tracker.flush_deadline_s = 1.0
    t0 = time.perf_counter()
    times = fake_training(tracker, range(200), every=50, work_s=0.0)
    tracker.set_tags({"phase": "done"})
    assert max(times) < CALL_LIMIT_S, f"slowest log call {max(times) * 1e3:.1f} ms with the server down"
    assert time.perf_counter() - t0 < 200 * CALL_LIMIT_S
    t1 = time.perf_counter()
    assert tracker.finish() is False  # nothing reached MLflow
    assert time.perf_counter() - t1 < 1.0 + 6.0  # the deadline (+ the thread's join), not MLflow's retries
    records = spooled_records(spool_dir / ("0" * 32))
    assert [r["op"] for r in records][0] == "resume" and records[-1] == {"op": "status", "status": "FINISHED"}
    rows = [row for r in records if r["op"] == "metrics" for row in r["rows"]]
    assert sorted((k, s) for k, _, _, s in rows) == sorted((k, s) for s in range(200) for k in ("loss", "lr"))
    assert [r["step"] for r in records if r["op"] == "checkpoint"] == [50, 100, 150, 200]


@pytest.mark.integration
def test_unsent_records_are_backfilled_by_the_next_tracker_on_the_run(services, spool_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(services.mlflow_tracking_uri)
    first = Tracker.start(services.mlflow_tracking_uri, experiment="outage", run_name="outage-backfill")
    first.flush_deadline_s = 1.0
    assert first.finish()  # the fresh run's params reached the server
    run_id = first.run_id  # after finish: a start that found /health slow spools the run's creation
    # An attempt whose server was unreachable until it ended (same spool, a dead URI):
    lost = Tracker.start(dead_uri(), experiment="outage", run_name="outage-backfill", run_id=run_id)
    lost.flush_deadline_s = 1.0
    fake_training(lost, range(30), every=10, work_s=0.0)
    assert lost.finish("FAILED") is False
    assert client.get_metric_history(run_id, "loss") == []
    # The next attempt on the run (the server is back) sends the leftovers first, then its own.
    resumed = Tracker.start(services.mlflow_tracking_uri, experiment="outage", run_name="outage-backfill",
                            run_id=run_id)
    fake_training(resumed, range(30, 40), every=10, work_s=0.0)
    assert resumed.finish()
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == pytest.approx({s: loss_at(s) for s in range(40)})
    assert [c["step"] for c in list_checkpoints(client, run_id)] == [10, 20, 30, 40]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert list(spool_dir.rglob("*.jsonl")) == []  # all sent: the spool is empty


def test_every_spooled_record_replays_safely_after_a_crash_between_send_and_ack(services, spool_dir):
    """A process killed after MLflow took a record but before the spool's ack (a node lost mid-step)
    leaves it to be sent again by the next attempt; sending each record twice must leave the run as
    sending it once. (The checkpoint's model output link was not: MLflow refused the duplicate with
    a UNIQUE constraint, the buffer retried it for ever and the run never ended FINISHED.)"""
    from mlflow.tracking import MlflowClient

    from detailflow.platform.tracking_records import apply_records

    client = MlflowClient(services.mlflow_tracking_uri)
    first = Tracker.start(services.mlflow_tracking_uri, experiment="outage", run_name="outage-replay")
    assert first.finish()
    run_id = first.run_id  # after finish: a start that found /health slow spools the run's creation
    lost = Tracker.start(dead_uri(), experiment="outage", run_name="outage-replay", run_id=run_id)
    lost.flush_deadline_s = 0.5
    fake_training(lost, range(8), every=4, work_s=0.0)
    lost.set_tags({"phase": "replayed"})
    assert lost.finish("FINISHED") is False
    records = spooled_records(spool_dir)
    assert {r["op"] for r in records} >= {"metrics", "checkpoint", "tags", "status"}
    for _ in range(2):  # sent, not acknowledged, sent again
        for rec in records:
            apply_records(client, run_id, rec["op"], [rec])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "replayed"
    assert sorted(o.step for o in run.outputs.model_outputs) == [4, 8]  # one link per checkpoint
    assert [c["step"] for c in list_checkpoints(client, run_id)] == [4, 8]  # one model per checkpoint
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(8))


def test_a_record_the_server_refuses_is_set_aside_and_never_holds_back_the_rest(services, spool_dir):
    """MLflow refuses a changed param value (400) on every retry: the record is kept in
    rejected/records.jsonl with the answer, the metrics after it arrive and the run ends FINISHED (before,
    the buffer retried it until finish's deadline and the run stayed RUNNING)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(services.mlflow_tracking_uri)
    tracker = Tracker.start(services.mlflow_tracking_uri, experiment="outage", run_name="outage-refused")
    tracker.flush_deadline_s = 10.0
    tracker.log_params({"lr": 1e-3})
    assert tracker.flush()
    tracker.log_params({"lr": 2e-3})  # MLflow: "Changing param values is not allowed"
    assert tracker.flush()  # refused and set aside: that pass is done
    fake_training(tracker, range(4), every=100, work_s=0.0)
    assert tracker.finish()  # later passes send what follows (and never take the kept file for a spool)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.001"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [0, 1, 2, 3]
    rejected = tracker.buffer.dir / REJECTED  # keyed by the run, or by its spooled creation
    (kept,) = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert kept["record"] == {"op": "params", "params": {"lr": "0.002"}}
    assert "INVALID_PARAMETER_VALUE" in kept["error"]


@pytest.mark.integration
def test_mlflow_outage_during_training_stalls_nothing_and_loses_nothing(services, spool_dir):
    from mlflow.tracking import MlflowClient

    from detailflow.platform.services import LocalServices
    from detailflow.platform.testing import start_watchdog

    outage_s = float(os.environ.get("DETAILFLOW_OUTAGE_S", "60"))
    every = 20
    svc = LocalServices(services)
    client = MlflowClient(services.mlflow_tracking_uri)
    tracker = Tracker.start(services.mlflow_tracking_uri, experiment="outage", run_name="outage-loop",
                            params={"outage_s": outage_s})
    fake_training(tracker, range(0, 20), every)  # the server is up
    steps_done = 20
    restarted = threading.Event()
    times: list[float] = []

    def outage():
        svc._stop("mlflow", grace_s=3)
        time.sleep(outage_s)
        svc._start("mlflow")
        start_watchdog(svc)  # the restarted server dies with this process too
        restarted.set()

    thread = threading.Thread(target=outage)
    t_down = time.perf_counter()
    thread.start()
    try:
        while not restarted.is_set():  # train through the outage and the restart
            t0 = time.perf_counter()
            fake_training(tracker, range(steps_done, steps_done + 1), every)
            times.append(time.perf_counter() - t0)
            steps_done += 1
    finally:
        thread.join()
    t_up = time.perf_counter()
    more = fake_training(tracker, range(steps_done, steps_done + 20), every)
    steps_done += 20
    tracker.flush_deadline_s = 120.0
    assert tracker.finish()
    backfill_s = time.perf_counter() - t_up
    print(f"\noutage {t_up - t_down:.0f} s, {len(times)} steps during it: max step {max(times) * 1e3:.1f} ms "
          f"(max log call after restart {max(more) * 1e3:.1f} ms); backfill + finish after restart "
          f"{backfill_s:.1f} s; {steps_done} steps, {steps_done // every} checkpoints")
    assert max(times) < STEP_STALL_LIMIT_S
    history = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "loss")}
    assert history == pytest.approx({s: loss_at(s) for s in range(steps_done)})
    assert len(client.get_metric_history(tracker.run_id, "lr")) == steps_done
    ckpts = list_checkpoints(client, tracker.run_id)
    assert [c["step"] for c in ckpts] == list(range(every, steps_done + 1, every))
    assert all(c["metrics"]["loss"] == pytest.approx(loss_at(c["step"] - 1)) for c in ckpts)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["detailflow.checkpoint.latest_step"] == str(ckpts[-1]["step"])


@pytest.mark.integration
def test_large_files_go_to_s3_and_the_run_links_them(services, storage, spool_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    tracker = Tracker.start(services.mlflow_tracking_uri, experiment="outage", run_name="outage-links")
    big = tmp_path / "samples.npz"
    big.write_bytes(os.urandom(LINK_BYTES + 1))
    small = tmp_path / "note.txt"
    small.write_text("small")
    uri = tracker.log_file(big, "samples")
    assert tracker.log_file(small, "notes") is None
    assert tracker.finish()
    client = MlflowClient(services.mlflow_tracking_uri)
    tags = client.get_run(tracker.run_id).data.tags
    link = f"{LINK_TAG_PREFIX}samples/samples.npz"
    assert tags[f"{link}.uri"] == uri
    assert tags[f"{link}.sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    assert storage.get_bytes(uri.split(f"s3://{storage.bucket}/", 1)[1]) == big.read_bytes()
    assert [f.path for f in client.list_artifacts(tracker.run_id, "samples")] == []  # not via the server
    assert [f.path for f in client.list_artifacts(tracker.run_id, "notes")] == ["notes/note.txt"]


def test_start_with_the_server_down_returns_at_once_and_spools_the_run(spool_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the old start then fails at once
    t0 = time.perf_counter()
    tracker = Tracker.start(dead_uri(), experiment="down", run_name="down-run", params={"a": 1})
    start_s = time.perf_counter() - t0
    times = fake_training(tracker, range(5), every=5, work_s=0.0)
    assert start_s < 3.0 and max(times) < CALL_LIMIT_S and tracker.run_id is None
    tracker.flush_deadline_s = 0.5
    assert not tracker.finish()  # nothing reached a server: all of it kept
    recs = spooled_records(spool_dir)
    assert recs[0] == {"op": "open", "experiment": "down", "run_name": "down-run", "params": {"a": "1"},
                       "tags": {"detailflow.run_name": "down-run"}}
    assert [r["op"] for r in recs[1:]] == ["metrics"] * 5 + ["checkpoint", "status"]


@pytest.mark.integration
def test_a_run_started_while_the_server_is_down_appears_once_it_is_back(services, spool_dir):
    from mlflow.tracking import MlflowClient

    from detailflow.platform.services import LocalServices
    from detailflow.platform.testing import start_watchdog
    from detailflow.platform.tracking import find_run_id

    client, svc = MlflowClient(services.mlflow_tracking_uri), LocalServices(services)
    # (1) the server is stopped when the run starts, and comes back while it trains
    svc._stop("mlflow", grace_s=3)
    try:
        t0 = time.perf_counter()
        tracker = Tracker.start(services.mlflow_tracking_uri, experiment="down-start", run_name="down-a",
                                params={"case": "same process"})
        start_s = time.perf_counter() - t0
        times = fake_training(tracker, range(10), every=5, work_s=0.0)
        assert tracker.run_id is None
    finally:
        svc._start("mlflow")
        start_watchdog(svc)
    times += fake_training(tracker, range(10, 15), every=5, work_s=0.0)
    tracker.flush_deadline_s = 120.0
    assert start_s < 3.0 and max(times) < CALL_LIMIT_S and tracker.finish()
    # (2) an attempt that ended before the server came back: the next tracker of the run backfills it
    gone = Tracker.start(dead_uri(), experiment="down-start", run_name="down-b", params={"case": "next"})
    fake_training(gone, range(10), every=5, work_s=0.0)
    gone.flush_deadline_s = 0.5
    assert not gone.finish()
    again = Tracker.start(services.mlflow_tracking_uri, experiment="down-start", run_name="down-b",
                          params={"case": "next"})
    fake_training(again, range(10, 15), every=5, work_s=0.0)
    assert again.finish()
    for tr, name, case in ((tracker, "down-a", "same process"), (again, "down-b", "next")):
        assert tr.run_id == find_run_id(client, name)
        run = client.get_run(tr.run_id)
        assert run.info.status == "FINISHED" and run.data.params["case"] == case
        history = {m.step: m.value for m in client.get_metric_history(tr.run_id, "loss")}
        assert history == pytest.approx({s: loss_at(s) for s in range(15)})
        assert [c["step"] for c in list_checkpoints(client, tr.run_id)] == [5, 10, 15]
    assert len(client.search_runs([run.info.experiment_id])) == 2  # one run per name, no duplicate
