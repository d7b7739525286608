"""The tokenizer export is an INFERENCE export: a training config naming s3:// teacher / perceptual /
discriminator weights and an encoder init (files no downstream stage has) still exports and loads, and
the loaded tokenizer decodes exactly as the in-memory training model does."""

from __future__ import annotations

import dataclasses
import json
import tempfile

import pytest
import torch

from detailflow.models.export import save_pretrained
from detailflow.models.tokenizer import DetailFlowTokenizer
from detailflow.pipelines.train.tokenizer import TokenizerStageConfig, export_config, tokenizer_config

MISSING = "s3://nowhere-bucket/weights/{}"  # never written: loading any of them would fail
TRAINING_ONLY_FILES = {
    "align_teacher": "siglip2", "align_teacher_path": MISSING.format("siglip2.pt2"),
    "align_teacher_sha256": "0" * 64, "perceptual_weight": 1.0,
    "perceptual_net_path": MISSING.format("lpips.pt"), "gan_weight": 0.2,
    "disc_net_path": MISSING.format("dino.pt"),
    "encoder_init_path": MISSING.format("siglip2-enc.safetensors"),
}


def _trained_model():
    """The in-memory model of the run: same trained modules (the align head is fed by a stand-in
    teacher here; the real one needs the missing file, and the head is training-only anyway)."""
    cfg = TokenizerStageConfig(model="smoke", model_overrides=TRAINING_ONLY_FILES)
    train_tok = tokenizer_config(cfg)
    torch.manual_seed(0)
    model = DetailFlowTokenizer(dataclasses.replace(train_tok, align_teacher="thumbnail",
                                                    perceptual_weight=0.0, gan_weight=0.0,
                                                    encoder_init_path=None)).eval()
    return cfg, model


def _write_export(cfg, model, directory) -> dict:
    """What the driver writes (checkpoints.export_consolidated): inference module, inference state."""
    from detailflow.pipelines.train.tokenizer import inference_model
    from detailflow.platform.checkpoints import inference_state

    export_cfg = export_config(cfg, "tokenizer-smoke-test")
    net = inference_model(export_cfg)
    net.load_state_dict(inference_state(model.state_dict()), strict=True)
    save_pretrained(net, export_cfg, directory)
    return export_cfg


def test_export_config_names_no_training_only_file():
    cfg, _ = _trained_model()
    text = json.dumps(export_config(cfg, "run"))
    assert "s3://" not in text, text
    tok = export_config(cfg, "run")["tokenizer"]
    assert tok["align_teacher_path"] is None and tok["perceptual_net_path"] is None
    assert tok["disc_net_path"] is None and tok["encoder_init_path"] is None
    assert tok["perceptual_weight"] == 0.0 and tok["gan_weight"] == 0.0


@pytest.mark.integration
def test_load_tokenizer_of_an_s3_recipe_decodes_like_the_trained_model(storage):
    from detailflow.pipelines.train.exports import export_prefix, load_tokenizer

    cfg, model = _trained_model()
    run = "tokenizer-smoke-inference-export"
    with tempfile.TemporaryDirectory() as d:
        _write_export(cfg, model, d)
        for name in ("model.safetensors", "config.json"):
            storage.upload_file(f"{d}/{name}", f"{export_prefix(run)}/{name}")
    tok, config = load_tokenizer(storage, run)
    assert tok.teacher is None and tok.perceptual is None and tok.align_head is None
    img = torch.rand(3, 3, model.cfg.image_size, model.cfg.image_size) * 2 - 1
    with torch.no_grad():
        codes = model.encode(img)
        assert torch.equal(tok.encode(img), codes)
        for t in model.rmap.admissible[:: max(1, len(model.rmap.admissible) // 3)]:
            assert torch.equal(tok.decode(codes[:, :t], t), model.decode(codes[:, :t], t)), t


def test_an_older_export_naming_training_files_still_loads(tmp_path):
    """An export written before the inference export (config.json with the training paths, weights
    with the align head) loads for inference without touching any of the named files."""
    from detailflow.platform.checkpoints import load_inference_tokenizer

    cfg, model = _trained_model()

    old_cfg = {"kind": "tokenizer", "model": "smoke", "tokenizer": dataclasses.asdict(tokenizer_config(cfg))}
    save_pretrained(model, old_cfg, tmp_path)
    tok = load_inference_tokenizer(tmp_path, old_cfg).eval()
    img = torch.rand(2, 3, model.cfg.image_size, model.cfg.image_size) * 2 - 1
    with torch.no_grad():
        codes = model.encode(img)
        t = model.rmap.admissible[-1]
        assert torch.equal(tok.decode(codes, t), model.decode(codes, t))


def test_an_export_whose_weights_do_not_fit_its_config_names_the_differences(tmp_path):
    """The inference loader (one copy, shared by load_tokenizer, the pyfunc and serving) lists the
    entries that do not fit, with their shapes, rather than torch's bare strict-load error."""
    from detailflow.models.export import StateDictMismatch
    from detailflow.platform.checkpoints import load_inference_tokenizer

    cfg, model = _trained_model()
    fields = dataclasses.asdict(tokenizer_config(cfg))
    export_cfg = {"kind": "tokenizer", "model": "smoke",
                  "tokenizer": {**fields, "codebook_size": 2 * fields["codebook_size"]}}
    save_pretrained(model, export_cfg, tmp_path)
    want = r"shape mismatches \(1\): quantizer.embedding file \(64, 8\) vs module \(128, 8\)"
    with pytest.raises(StateDictMismatch, match=want):
        load_inference_tokenizer(tmp_path, export_cfg)
