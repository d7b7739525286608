"""Registry on the real local MLflow server + SeaweedFS: registration from the training runs, the
promotion gate on real evaluations of models that really differ, rollback (API and CLI), and the
generator pyfunc loaded by alias in a fresh Python process.

Models: random-init smoke tokenizer + smoke AR models trained in-process for 0 / 60 / 300 steps
(tests/registry_models.py), exported with save_pretrained to S3 (not the Ray training stages)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
from registry_models import (
    PixelEval,
    build_models,
    expected_images,
    expected_rmse,
    promote_config,
    register_version,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def models(services, storage):
    return build_models(services, storage, f"tests/registry-{uuid.uuid4().hex[:8]}")


_cfg, _register = promote_config, register_version


def _name() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def test_register_links_training_runs_and_is_idempotent(services, storage, models):
    from detailflow.pipelines.registry.register import register
    from detailflow.platform.registry import Registry

    name, reg = _name(), Registry(services.mlflow_tracking_uri)
    out = register(services, name, models.ar_uris["mid"])  # tokenizer: the one the AR export names
    assert out["created"] and out["tokenizer_export"] == models.tok_uri
    tok_mv = reg.version(f"{name}-tokenizer", out["tokenizer_version"])
    # the tokenizer version comes from its training run's logged export model
    assert tok_mv.run_id == models.tok_run_id and models.tok_model_id in tok_mv.source
    gen = reg.version(f"{name}-generator", out["generator_version"])
    assert gen.tags["detailflow.tokenizer.run_id"] == models.tok_run_id
    assert gen.tags["detailflow.ar.export_uri"] == models.ar_uris["mid"]
    run = reg.client.get_run(out["registration_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["detailflow.generator.version"] == gen.version
    # the weights went to S3 directly: no model.safetensors in the tracking server's artefact store for
    # the training run's logged export nor the registration's generator model, listed on S3
    ids = (models.tok_model_id, re.search(r"m-[0-9a-f]{32}", gen.source).group(0))
    held = [k for k in storage.list_keys(services.mlflow_artifact_prefix.strip("/") + "/")
            if any(i in k for i in ids)]
    links = {k.split("/")[-2] for k in held if k.endswith("model.safetensors.link.json")}
    assert links == {"export", "tokenizer", "ar"}  # the tokenizer's export; the generator's two parts
    assert not any(k.endswith("model.safetensors") for k in held), held
    again = register(services, name, models.ar_uris["mid"])
    assert not again["created"] and again["generator_version"] == out["generator_version"]
    assert len(reg.versions(f"{name}-generator")) == 1
    # a tokenizer other than the one the AR model was trained on is refused (same weights, other export)
    from registry_models import upload_export

    other = upload_export(storage, models.tokenizer, {"kind": "tokenizer", "model": "smoke",
                                                 "tokenizer": dataclasses.asdict(models.mc.tokenizer)},
                    models.tok_uri.split("/", 3)[3].replace("/tok/", "/tok-copy/"))
    with pytest.raises(ValueError, match="trained on the codes of"):
        register(services, name, models.ar_uris["mid"], tokenizer=other)


def test_gate_rejects_worse_and_accepts_better(services, models):
    from detailflow.pipelines.registry.promote import promote
    from detailflow.platform.registry import Registry

    name, reg = _name(), Registry(services.mlflow_tracking_uri)
    model = f"{name}-generator"
    cfg = _cfg(name)
    truth = {label: expected_rmse(models, label, cfg.spec()) for label in ("worst", "mid", "best")}
    assert truth["best"] < truth["mid"] < truth["worst"], truth  # the training made them differ
    ev = PixelEval(services, models)
    v_mid, v_worst, v_best = (_register(services, name, models, lb) for lb in ("mid", "worst", "best"))

    first = promote(_cfg(name, version=v_mid), services, evaluator=ev)
    assert first["decision"] == "promoted" and first["reason"] == "no champion yet"
    assert reg.champion(model) == v_mid
    assert first["challenger_metrics"]["pixel_rmse"] == pytest.approx(truth["mid"], rel=1e-6)

    worse = promote(_cfg(name, version=v_worst), services, evaluator=ev)
    assert worse["decision"] == "rejected" and reg.champion(model) == v_mid
    tags = reg.version_tags(model, v_worst)
    assert tags["detailflow.promotion.decision"] == "rejected"
    assert tags["detailflow.promotion.champion_version"] == v_mid
    recorded = {k: json.loads(tags[f"detailflow.promotion.{k}_metrics"])["pixel_rmse"]
                for k in ("challenger", "champion")}
    assert recorded == pytest.approx({"challenger": truth["worst"], "champion": truth["mid"]}, rel=1e-6)
    assert json.loads(tags["detailflow.promotion.gate"]) == cfg.gate()
    assert "detailflow.promotion.decided_at" in tags
    runs = json.loads(tags["detailflow.promotion.eval_run_ids"])
    assert runs["champion"] == ev.calls[0][1]  # the champion's evaluation was reused, not re-run
    assert [v for v, _ in ev.calls] == [v_mid, v_worst]

    better = promote(_cfg(name, version=v_best), services, evaluator=ev)
    assert better["decision"] == "promoted" and reg.champion(model) == v_best
    assert better["improvement"] == pytest.approx(truth["mid"] - truth["best"])
    assert [h["version"] for h in reg.history(model)] == [v_mid, v_best]
    assert reg.alias(model, "challenger") is None  # the promoted challenger is now the champion

    # a margin larger than the improvement keeps the champion: worst -> mid is not enough
    strict = promote(_cfg(name, version=v_mid, margin=truth["worst"]), services, evaluator=ev)
    assert strict["decision"] == "rejected" and reg.champion(model) == v_best


def test_rollback_restores_previous_champion(services, models):
    from click.testing import CliRunner

    from detailflow.cli import main
    from detailflow.pipelines.registry.promote import promote
    from detailflow.platform.registry import Registry

    name, reg = _name(), Registry(services.mlflow_tracking_uri)
    model = f"{name}-generator"
    ev = PixelEval(services, models)
    v1, v2 = _register(services, name, models, "mid"), _register(services, name, models, "best")
    assert promote(_cfg(name, version=v1), services, evaluator=ev)["decision"] == "promoted"
    assert promote(_cfg(name, version=v2), services, evaluator=ev)["decision"] == "promoted"
    assert reg.champion(model) == v2

    runner = CliRunner()
    res = runner.invoke(main, ["registry", "rollback", name, "--reason", "artefacts in class 7"])
    assert res.exit_code == 0, res.output
    assert reg.champion(model) == v1
    assert reg.version_tags(model, v2)["detailflow.rollback.reason"] == "artefacts in class 7"
    assert reg.version_tags(model, v2)["detailflow.rollback.restored"] == v1
    assert reg.version_tags(model, v1)["detailflow.restored.from"] == v2
    assert [h["version"] for h in reg.history(model)] == [v1]
    last = json.loads(reg.client.get_registered_model(model).tags["detailflow.champion.last_rollback"])
    assert (last["from"], last["to"], last["reason"]) == (v2, v1, "artefacts in class 7")

    res = runner.invoke(main, ["registry", "rollback", name, "--reason", "again"])
    assert res.exit_code != 0 and "no previous champion" in res.output
    assert reg.champion(model) == v1

    shown = runner.invoke(main, ["registry", "show", name, "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["aliases"]["champion"] == v1
    rows = {r["version"]: r for r in data["versions"]}
    assert rows[v2]["rolled_back"] == "artefacts in class 7" and rows[v1]["aliases"] == ["champion"]
    listed = runner.invoke(main, ["registry", "list", "--json"])
    assert any(r["name"] == model and r["aliases"].get("champion") == v1 for r in json.loads(listed.output))


FRESH = textwrap.dedent("""
    import json, sys
    import mlflow, numpy as np
    uri, out = sys.argv[1], sys.argv[2]
    model = mlflow.pyfunc.load_model(uri)
    classes = np.array(json.loads(sys.argv[3]), dtype=np.int64)
    a = model.predict(classes, params={"seed": 5, "cfg_scale": 1.5})
    b = model.predict(classes, params={"seed": 5, "cfg_scale": 1.5})
    c = model.predict(classes, params={"seed": 6, "cfg_scale": 1.5})
    coarse = model.predict(classes, params={"seed": 5, "cfg_scale": 1.5, "num_tokens": 4})
    import detailflow.models
    reqs = open(mlflow.pyfunc.get_model_dependencies(uri)).read().split()
    np.savez(out, a=a, b=b, c=c, coarse=coarse)
    print(json.dumps({"models_file": detailflow.models.__file__, "requirements": reqs,
                      "inputs": [s.name for s in model.metadata.get_input_schema().inputs],
                      "params": sorted(p.name for p in model.metadata.get_params_schema().params)}))
""")


def test_pyfunc_loads_by_alias_in_fresh_process(services, models, tmp_path):
    from detailflow.pipelines.registry.promote import promote

    name = _name()
    version = _register(services, name, models, "mid")
    assert promote(_cfg(name, version=version), services, evaluator=PixelEval(services, models))["decision"] \
        == "promoted"
    classes = [3, 1, 4, 1, 5]
    script = tmp_path / "load.py"
    script.write_text(FRESH)
    proc = subprocess.run([sys.executable, str(script), f"models:/{name}-generator@champion",
                           str(tmp_path / "out.npz"), json.dumps(classes)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    out = np.load(tmp_path / "out.npz")
    r = models.mc.tokenizer.image_size
    assert out["a"].shape == (5, 3, r, r) and out["a"].dtype == np.uint8
    assert 0 <= out["a"].min() and out["a"].max() <= 255 and out["a"].std() > 0
    np.testing.assert_array_equal(out["a"], out["b"])  # deterministic for a seed
    assert not np.array_equal(out["a"], out["c"])  # and the seed matters
    want = expected_images(models, "mid", np.array(classes), seed=5, cfg_scale=1.5)
    np.testing.assert_array_equal(out["a"], want)  # the same images as the torch modules give
    side = models.tokenizer.rmap.canvas_size(4)
    assert out["coarse"].shape == (5, 3, side, side) and out["coarse"].dtype == np.uint8
    assert "/code/detailflow/models/" in info["models_file"]  # the model carries its own code
    assert info["inputs"] == ["class_ids"] and {"seed", "cfg_scale", "num_tokens"} <= set(info["params"])
    assert any(line.startswith("torch==") for line in info["requirements"])  # pinned
