"""Released DetailFlow checkpoints -> this project's modules: equivalence with the authors' computation.

Fixtures (tests/data/released, written once by scripts/record_released_fixtures.py --authors-repo):
tiny random weights in the authors' key layout, loaded strictly into the authors' own classes
(ByteFlow-AI/DetailFlow VQModel and GPT Transformer), and the outputs THEIR code computes (encoder codes,
decoder pixels at several prefix lengths, GPT logits with and without CFG). Each test writes those weights
as the released files look (torch checkpoint {"model", "ema"} in <run>/checkpoints/, config.json +
config.yaml two folders up), imports them and compares outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from detailflow.models.convert_released import ReleaseOptionError
from detailflow.models.convert_siglip2 import WeightsFormatError
from detailflow.models.sampler import guide
from detailflow.pipelines.registry.weights_import import load_released

DATA = Path(__file__).parent / "data" / "released"
MANIFEST = json.loads((DATA / "manifest.json").read_text())
REFS = load_file(str(DATA / "references.safetensors"))
PREFIXES = [1, 2, 4, 8, 16]


def tok_state() -> dict:
    state = load_file(str(DATA / "released_tok.safetensors"))
    state["quantize.codebook_used"] = torch.zeros(65536)  # left out of the fixture (usage buffer)
    return state


def ar_state() -> dict:
    return load_file(str(DATA / "released_ar.safetensors"))


def write_release(root: Path, kind: str, ckpt, cfg_json: dict | None = None,
                  cfg_yaml: dict | None = None) -> str:
    """<root>/<kind>/checkpoints/0001.pt + <root>/<kind>/config.{json,yaml}, as the authors ship them."""
    run = root / kind
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg_json or MANIFEST[f"{kind}_config_json"]))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg_yaml or MANIFEST[f"{kind}_config_yaml"]))
    path = run / "checkpoints" / "0001.pt"
    torch.save(ckpt, path)
    return str(path)


def release(tmp_path, tok=None, ar=None, tok_json=None, ar_json=None, tok_yaml=None):
    raw = {k: v + 0.5 for k, v in ar_state().items()}  # a distinguishable non-EMA copy
    tok_ref = write_release(tmp_path, "tokenizer", tok or {"model": tok_state()}, tok_json, tok_yaml)
    ar_ref = write_release(tmp_path, "ar", ar or {"model": raw, "ema": ar_state()}, ar_json)
    return tok_ref, ar_ref


def load(tmp_path, **kw):
    tok_ref, ar_ref = release(tmp_path, **{k: v for k, v in kw.items() if k != "weights"})
    return load_released(None, tok_ref, ar_ref, generator_weights=kw.get("weights", "ema"),
                         heads=MANIFEST["heads"])


def test_fixture_keys_are_the_recorded_authors_layout():
    assert {k: list(v.shape) for k, v in tok_state().items()} == MANIFEST["tokenizer_keys"]
    assert {k: list(v.shape) for k, v in ar_state().items()} == MANIFEST["ar_keys"]


def test_tokenizer_codes_and_prefix_pixels_match_the_authors(tmp_path):
    rel = load(tmp_path)
    codes = rel.tokenizer.encode(REFS["images"])
    assert codes.unique().numel() > 3  # the fixture exercises more than one code
    assert torch.equal(codes, REFS["codes"])
    with torch.no_grad():
        for t in PREFIXES:
            want = REFS[f"pixels_t{t}"]
            assert rel.tokenizer.rmap.canvas_size(t) == MANIFEST["canvas"][str(t)] == want.shape[-1]
            got = rel.tokenizer.decode(REFS["codes"], t)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_ar_logits_match_with_and_without_cfg(tmp_path):
    rel = load(tmp_path)
    codes, classes = REFS["ar_codes"], REFS["ar_classes"]
    null = torch.full_like(classes, rel.ar.null_class)
    with torch.no_grad():
        both = rel.ar(torch.cat([codes, codes]), torch.cat([classes, null]))
        torch.testing.assert_close(both[:2], REFS["ar_logits_cond"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(both[2:], REFS["ar_logits_uncond"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(guide(both, MANIFEST["cfg_scale"]), REFS["ar_logits_cfg"],
                                   atol=1e-4, rtol=1e-4)
        g = rel.ar_cfg.group_size  # a sampling-time prefix: [cls, first 2 groups + queries], last group
        x = rel.ar.embed_range(codes, classes, 0, 3 * g)
        torch.testing.assert_close(rel.ar.run(x, last=g), REFS["ar_prefix_logits"], atol=1e-4, rtol=1e-4)
        x = rel.ar.embed_range(codes, classes, 0, 3)  # sequential phase: [cls, t_0, t_1] -> logits of t_2
        torch.testing.assert_close(rel.ar.run(x, last=1), REFS["ar_sequential_logits"], atol=1e-4, rtol=1e-4)


def test_ema_or_raw_generator_weights_are_selectable(tmp_path):
    ema, raw = load(tmp_path / "e"), load(tmp_path / "r", weights="model")
    assert torch.equal(ema.ar.tok_emb.weight, ar_state()["tok_embeddings.weight"])
    assert torch.equal(raw.ar.tok_emb.weight, ar_state()["tok_embeddings.weight"] + 0.5)
    assert ema.sources["ar"]["weights"] == "ema" and raw.sources["ar"]["weights"] == "model"


def test_missing_extra_and_misshaped_keys_are_named(tmp_path):
    state = tok_state()
    del state["encoder.refined_tokens"]
    with pytest.raises(WeightsFormatError, match="missing key 'encoder.refined_tokens'"):
        load(tmp_path / "a", tok={"model": state})
    state = tok_state()
    state["decoder.extra_head.weight"] = torch.zeros(2)
    with pytest.raises(WeightsFormatError, match="unexpected keys.*decoder.extra_head.weight"):
        load(tmp_path / "b", tok={"model": state})
    bad_ar = ar_state()
    bad_ar["layers.1.attention.wo.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsFormatError, match=r"layers.1.attention.wo.weight.*\(3, 3\)"):
        load(tmp_path / "c", ar={"ema": bad_ar})
    state = tok_state()
    state["post_quant_conv.weight"] = torch.zeros(5, 8)
    with pytest.raises(WeightsFormatError, match=r"decoder.post_quant.weight: \(5, 8\)"):
        load(tmp_path / "d", tok={"model": state})


@pytest.mark.parametrize("where, field, value", [
    ("tok_json", "causal_decoder", True), ("tok_json", "repa", True), ("tok_json", "num_codebooks", 2),
    ("tok_yaml", "dynamic_resolution_prob", 0.5), ("ar_json", "n_kv_head", 1),
    ("ar_json", "ffn_dim_multiplier", 1.3), ("ar_json", "model_type", "t2i"),
    ("ar_json", "class_dropout_prob", 0.0),
])
def test_unsupported_options_are_refused_by_name(tmp_path, where, field, value):
    key = {"tok_json": "tokenizer_config_json", "tok_yaml": "tokenizer_config_yaml",
           "ar_json": "ar_config_json"}
    cfg = dict(MANIFEST[key[where]], **{field: value})
    with pytest.raises(ReleaseOptionError, match=f"{field}={value!r} is not supported"):
        load(tmp_path, **{where: cfg})


class NotATensor:
    pass


def test_pickles_that_are_not_plain_state_dicts_are_refused(tmp_path):
    with pytest.raises(WeightsFormatError, match="weights_only=True"):
        load(tmp_path / "a", tok={"model": tok_state(), "obj": NotATensor()})
    with pytest.raises(WeightsFormatError, match="'model' is a list, not a state dict"):
        load(tmp_path / "b", tok={"model": [1, 2]})
    with pytest.raises(WeightsFormatError, match=r"no 'ema' state dict.*\['model'\]"):
        load(tmp_path / "c", ar={"model": ar_state()})


def test_mismatched_pair_and_missing_configs_are_refused(tmp_path):
    ar_json = dict(MANIFEST["ar_config_json"], group_size=8, causal_num=8)
    with pytest.raises(ValueError, match="group_size 8 vs 4"):
        load(tmp_path / "a", ar_json=ar_json)
    tok_ref, ar_ref = release(tmp_path / "b")
    (Path(tok_ref).parent.parent / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="config.json \\+ config.yaml"):
        load_released(None, tok_ref, ar_ref, heads=MANIFEST["heads"])


def test_heads_follow_the_authors_tower_names():
    from detailflow.models.convert_released import tokenizer_config_from_release

    cfg, _ = tokenizer_config_from_release(MANIFEST["tokenizer_config_json"],
                                           MANIFEST["tokenizer_config_yaml"], tok_state(), heads=None)
    assert (cfg.enc_heads, cfg.dec_heads) == (16, 12)  # pretrained so400m blocks / siglip2_base from scratch
    bad = dict(MANIFEST["tokenizer_config_json"], encoder_model="clip")
    with pytest.raises(ReleaseOptionError, match="encoder_model='clip'"):
        tokenizer_config_from_release(bad, MANIFEST["tokenizer_config_yaml"], tok_state())


def test_released_pipeline_file_runs_import_then_the_trained_model_gates():
    from detailflow.pipelines.runner.spec import load_pipeline
    from detailflow.pipelines.runner.stages import KINDS

    path = Path(__file__).parent.parent / "configs" / "pipelines" / "released-detailflow-16.yaml"
    spec = load_pipeline(path, KINDS)
    assert [s.kind for s in spec.stages] == ["import-released", "evaluate-generator", "promote", "deploy"]
    assert spec.stages[2].params["overrides"]["ar"] == "${stages.import.ar}"


@pytest.mark.integration
def test_imported_release_registers_promotes_and_serves(ray_session, services, storage, tmp_path):
    """Released files on S3 -> `detailflow weights import detailflow` -> the exports every stage reads ->
    registry register -> champion -> the real Serve endpoint returns the imported model's images."""
    import requests
    from click.testing import CliRunner

    from detailflow.cli import main
    from detailflow.pipelines.registry.register import register
    from detailflow.pipelines.train.exports import load_ar, load_tokenizer
    from detailflow.platform.serving import testing as st
    from detailflow.platform.serving.config import parse_serve_config
    from detailflow.platform.serving.deploy import delete_app, deploy_app
    from detailflow.platform.serving.images import from_png

    name = st.unique_name("rel")
    tok_ref, ar_ref = release(tmp_path)
    uris = {}
    for kind, ref in (("tokenizer", tok_ref), ("ar", ar_ref)):
        local = Path(ref)
        base = f"released/{name}/{kind}"
        storage.upload_file(local, f"{base}/checkpoints/{local.name}")
        for cfg in ("config.json", "config.yaml"):
            storage.upload_file(local.parent.parent / cfg, f"{base}/{cfg}")
        uris[kind] = storage.uri(f"{base}/checkpoints/{local.name}")
    res = CliRunner().invoke(main, ["weights", "import", "detailflow", "--tokenizer", uris["tokenizer"],
                                    "--generator", uris["ar"], "--name", name, "--enc-heads", "2",
                                    "--dec-heads", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    tok, _ = load_tokenizer(storage, f"{name}-tokenizer")  # what extract-codes / evaluation load
    assert torch.equal(tok.encode(REFS["images"]), REFS["codes"])
    ar, ar_config, ar_uri = load_ar(storage, out["ar"]["uri"])  # what eval generator / serving load
    assert ar_config["tokenizer"] == out["tokenizer"]["uri"] and ar_config["weights"] == "ema"
    with torch.no_grad():
        torch.testing.assert_close(ar(REFS["ar_codes"], REFS["ar_classes"]), REFS["ar_logits_cond"],
                                   atol=1e-4, rtol=1e-4)
    version = register(services, name, ar=ar_uri)["generator_version"]
    st.promote_now(services, name, version)
    keys = tmp_path / "api-keys"
    keys.write_text("dfk_test_released_0123456789\n")
    app = f"rel{name[-6:]}"
    deploy_app(parse_serve_config(st.test_serve_config(name, str(keys), app=app, route=f"/{app}",
                                                       port=st.free_port(), max_replicas=1)))
    try:
        r = requests.post(f"http://127.0.0.1:{st.http_port()}/{app}/v1/generate",
                          json={"class_ids": [3], "num_images": 1, "seed": 7, "cfg_scale": 1.5},
                          headers={"Authorization": "Bearer dfk_test_released_0123456789"}, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:300]
        assert r.headers["x-model-version"] == version and r.headers["x-tokens"] == "16"
        assert from_png(r.content).shape == (3, 32, 32)
    finally:
        delete_app(app)
