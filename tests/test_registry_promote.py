"""Promotion under failure and concurrency (real MLflow server + SeaweedFS), the registry lock, and
the gate rule. Models and evaluator: tests/registry_models.py (smoke models trained in-process)."""

from __future__ import annotations

import json
import math
import threading
import time
import uuid

import pytest
from registry_models import PixelEval, build_models, expected_rmse, promote_config, register_version


def test_gate_rule():
    from detailflow.pipelines.registry.promote import apply_gate

    lower = {"metric": "fid", "higher_is_better": False, "margin": 0.5}
    assert apply_gate(lower, {"fid": 10.0}, None)["passed"]  # no champion yet
    assert apply_gate(lower, {"fid": 10.0}, {"fid": 10.6})["passed"]
    assert apply_gate(lower, {"fid": 10.0}, {"fid": 10.5})["passed"]  # exactly the margin
    assert not apply_gate(lower, {"fid": 10.0}, {"fid": 10.4})["passed"]  # better, not by the margin
    assert not apply_gate(lower, {"fid": 11.0}, {"fid": 10.0})["passed"]  # worse
    assert apply_gate(lower, {"fid": 10.0}, {"fid": 10.6})["improvement"] == pytest.approx(0.6)
    zero = {**lower, "margin": 0.0}
    assert not apply_gate(zero, {"fid": 10.0}, {"fid": 10.0})["passed"]  # a tie never promotes
    higher = {"metric": "precision", "higher_is_better": True, "margin": 0.0}
    assert apply_gate(higher, {"precision": 0.7}, {"precision": 0.6})["passed"]
    assert not apply_gate(higher, {"precision": 0.5}, {"precision": 0.6})["passed"]
    assert not apply_gate(lower, {"kid": 1.0}, None)["passed"]  # no gate metric: never
    assert not apply_gate(lower, {"fid": math.nan}, None)["passed"]
    assert not apply_gate(lower, {"fid": 1.0}, {"kid": 2.0})["passed"]  # champion without the metric


integration = pytest.mark.integration


@pytest.fixture(scope="module")
def models(services, storage):
    return build_models(services, storage, f"tests/registry-{uuid.uuid4().hex[:8]}")


def _cfg(name: str, **kw):
    return promote_config(name, **{"eval_seed": 1, "eval_cfg_scale": 1.0, **kw})


_register = register_version


@integration
@pytest.mark.usefixtures("one_torch_thread")
def test_failed_or_partial_evaluation_never_promotes(services, models):
    from detailflow.pipelines.registry.promote import EVAL_TAG, promote, spec_key
    from detailflow.platform.registry import Registry

    name = f"t{uuid.uuid4().hex[:8]}"
    reg, model = Registry(services.mlflow_tracking_uri), f"{name}-generator"
    v_champ, v_new = _register(services, name, models, "worst"), _register(services, name, models, "best")
    assert promote(_cfg(name, version=v_champ), services, evaluator=PixelEval(services, models))["decision"] \
        == "promoted"
    key = EVAL_TAG + spec_key(_cfg(name).spec())

    killed = PixelEval(services, models, fail_halfway=True)
    out = promote(_cfg(name, version=v_new), services, evaluator=killed)
    assert out["decision"] == "failed" and "killed halfway" in out["reason"]
    assert reg.champion(model) == v_champ  # the better model did NOT become champion
    tags = reg.version_tags(model, v_new)
    assert tags["detailflow.promotion.decision"] == "failed"
    assert json.loads(tags[key])["status"] == "failed" and "killed halfway" in json.loads(tags[key])["error"]
    run = reg.client.get_run(killed.calls[0][1])  # the evaluation run: partial metric, FAILED, not complete
    assert run.info.status == "FAILED" and run.data.tags["eval.complete"] == "false"
    assert "pixel_rmse_first_half" in run.data.metrics and "pixel_rmse" not in run.data.metrics

    partial = PixelEval(services, models, leave_partial=True)  # returns a run that never completed
    out = promote(_cfg(name, version=v_new), services, evaluator=partial)
    assert out["decision"] == "failed" and "not complete" in out["reason"]
    assert reg.champion(model) == v_champ and [h["version"] for h in reg.history(model)] == [v_champ]

    # a later, complete evaluation of the same version is not poisoned by the failures
    good = PixelEval(services, models)
    out = promote(_cfg(name, version=v_new), services, evaluator=good)
    assert out["decision"] == "promoted" and reg.champion(model) == v_new
    assert [v for v, _ in good.calls] == [v_new]  # the champion's complete evaluation was reused
    assert out["challenger_metrics"]["pixel_rmse"] == pytest.approx(
        expected_rmse(models, "best", _cfg(name).spec()), rel=1e-6)


@integration
@pytest.mark.usefixtures("one_torch_thread")
def test_concurrent_promotions_end_consistent(services, models):
    from detailflow.pipelines.registry.promote import promote
    from detailflow.platform.registry import LOCK_SUFFIX, Registry

    name = f"t{uuid.uuid4().hex[:8]}"
    reg, model = Registry(services.mlflow_tracking_uri), f"{name}-generator"
    v_worst, v_mid, v_best = (_register(services, name, models, lb) for lb in ("worst", "mid", "best"))
    assert promote(_cfg(name, version=v_worst), services, evaluator=PixelEval(services, models))["decision"] \
        == "promoted"
    # Both challengers finish evaluating before either decides, so (nearly always) both pass the gate
    # against the same champion and the second decision finds the alias moved and gates again.
    barrier = threading.Barrier(2, timeout=300)
    ev = PixelEval(services, models, after_eval=lambda request: barrier.wait())
    results, errors = {}, []

    def run(version):
        try:
            results[version] = promote(_cfg(name, version=version), services, evaluator=ev)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(v,)) for v in (v_mid, v_best)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert reg.champion(model) == v_best  # the best wins whichever decided first
    history = [h["version"] for h in reg.history(model)]
    mid = results[v_mid]
    if mid["decision"] == "promoted":  # mid first (over worst), then best over mid
        assert mid["champion_version"] == v_worst and results[v_best]["champion_version"] == v_mid
        assert history == [v_worst, v_mid, v_best]
    else:  # best first; mid re-gated against best and rejected
        assert mid["decision"] == "rejected" and mid["champion_version"] == v_best
        assert results[v_best]["champion_version"] == v_worst and history == [v_worst, v_best]
    assert results[v_best]["decision"] == "promoted"
    # each thread scored its own model (the numbers computed from the torch modules directly)
    spec = _cfg(name).spec()
    for version, label in ((v_mid, "mid"), (v_best, "best")):
        assert results[version]["challenger_metrics"]["pixel_rmse"] == pytest.approx(
            expected_rmse(models, label, spec), rel=1e-6)
    names = [m.name for m in reg.client.search_registered_models(f"name = '{model}{LOCK_SUFFIX}'")]
    assert names == []  # the lock was released


@integration
def test_setting_one_new_alias_from_many_threads_at_once(services, models):
    """MLflow's SQL store has no upsert for aliases: simultaneous first sets of one alias collide on
    its unique key (a concurrent promotion failed with sqlite3.IntegrityError); set_alias absorbs it."""
    from detailflow.platform.registry import Registry

    name = f"a{uuid.uuid4().hex[:8]}"
    reg, model = Registry(services.mlflow_tracking_uri), f"{name}-generator"
    versions = [_register(services, name, models, lb) for lb in ("worst", "mid")]
    for round_ in range(3):  # a fresh alias each round: only the first set of an alias inserts
        alias = f"race{round_}"
        barrier, errors = threading.Barrier(6, timeout=60), []

        def worker(i, alias=alias, barrier=barrier, errors=errors):
            try:
                barrier.wait()
                reg.set_alias(model, alias, versions[i % 2])
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert reg.alias(model, alias) in versions


@integration
def test_lock_tries_again_when_the_holder_released_between_the_servers_insert_and_read_back(services):
    """MLflow's SQL store answers a duplicate insert by reading the existing model back to word its
    error (sqlalchemy_store.create_registered_model); if the holder deleted it in between, the create
    fails RESOURCE_DOES_NOT_EXIST (seen once in the full suite in the test below). The lock is free
    then: the caller must try again, not fail. The race is replayed here as the server answers it."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from detailflow.platform.registry import LOCK_SUFFIX, Registry

    reg, model = Registry(services.mlflow_tracking_uri), f"lock-{uuid.uuid4().hex[:8]}"
    real, calls = reg.client.create_registered_model, []

    def racing(name, **kwargs):
        calls.append(name)
        if len(calls) == 1:
            raise MlflowException(f"Registered Model with name={name} not found",
                                  error_code=RESOURCE_DOES_NOT_EXIST)
        return real(name, **kwargs)

    reg.client.create_registered_model = racing
    with reg.lock(model, wait_s=10) as token:
        assert reg.client.get_registered_model(model + LOCK_SUFFIX).tags["detailflow.lock.owner"] == token
    assert calls == [model + LOCK_SUFFIX] * 2


@integration
def test_lock_is_mutually_exclusive_and_breaks_stale_locks(services):
    from detailflow.platform.registry import LOCK_SUFFIX, Registry, RegistryError

    reg, model = Registry(services.mlflow_tracking_uri), f"lock-{uuid.uuid4().hex[:8]}"
    inside, overlaps, spans = [0], [], []
    guard = threading.Lock()

    def worker():
        for _ in range(3):
            with reg.lock(model, wait_s=60):
                with guard:
                    inside[0] += 1
                    overlaps.append(inside[0])
                t0 = time.monotonic()
                time.sleep(0.05)
                spans.append((t0, time.monotonic()))
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(spans) == 9 and max(overlaps) == 1  # never two holders at once
    # a holder that died: its lock expired -> the next caller breaks it
    held_by = lambda owner, expires: reg.client.create_registered_model(  # noqa: E731
        model + LOCK_SUFFIX, tags={"detailflow.lock.owner": owner, "detailflow.lock.expires": str(expires)})
    held_by("dead", time.time() - 1)
    with reg.lock(model, wait_s=10) as token:
        assert reg.client.get_registered_model(model + LOCK_SUFFIX).tags["detailflow.lock.owner"] == token
    # a live holder is not broken: the caller times out
    held_by("alive", time.time() + 600)

    with pytest.raises(RegistryError, match="could not acquire"):
        with reg.lock(model, wait_s=1):
            pass
    reg.client.delete_registered_model(model + LOCK_SUFFIX)
