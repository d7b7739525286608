"""SigLIP2 vision tower (Hugging Face names) -> the tokenizer's encoder init.

tests/data/released/siglip2.safetensors is a 3-block tiny tower with SigLIP2's own key names, and
references.safetensors holds the Hugging Face model's patch features for two images (its embeddings,
encoder layers and post-LayerNorm), recorded by scripts/record_released_fixtures.py. After conversion the
project's Encoder, loaded through the real `encoder_init_path` loader, must produce the same features.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from detailflow.models.configs import TokenizerConfig, get_model_config
from detailflow.models.convert_siglip2 import WeightsFormatError, siglip2_to_encoder_init
from detailflow.models.tokenizer import DetailFlowTokenizer
from detailflow.pipelines.registry.weights_import import convert_siglip2_file

DATA = Path(__file__).parent / "data" / "released"
SIG = json.loads((DATA / "manifest.json").read_text())["siglip2"]
REFS = load_file(str(DATA / "references.safetensors"))


def tiny_cfg(**kw) -> TokenizerConfig:
    w = SIG["width"]
    base = dict(image_size=SIG["image"], patch_size=SIG["patch"], num_tokens=16, group_size=4, causal_num=4,
                enc_width=w, enc_depth=SIG["depth"], enc_heads=SIG["heads"], enc_mlp=4 * w, dec_width=16,
                dec_depth=1, dec_heads=2, dec_mlp=32, codebook_size=32, align_weight=0.0,
                align_teacher="none")
    return TokenizerConfig(**dict(base, **kw))


def test_converted_encoder_computes_the_siglip2_tower(tmp_path):
    out = convert_siglip2_file(str(DATA / "siglip2.safetensors"), str(tmp_path / "init.safetensors"),
                               tiny_cfg())
    tok = DetailFlowTokenizer(tiny_cfg(encoder_init_path=out["path"])).eval()  # the real loader
    with torch.no_grad():
        _, patches = tok.encoder(REFS["images"], return_patches=True)
    # patches never attend to the latent slots, so the encoder's patch outputs are the tower's features
    torch.testing.assert_close(patches, REFS["siglip2_patch_features"], atol=1e-5, rtol=1e-4)


def test_first_blocks_are_kept_and_the_rest_dropped():
    state = load_file(str(DATA / "siglip2.safetensors"))
    init = siglip2_to_encoder_init(state, depth=2, num_tokens=16, grid=4)
    p = "vision_model.encoder.layers.1.self_attn."
    want = torch.cat([state[p + "q_proj.weight"], state[p + "k_proj.weight"], state[p + "v_proj.weight"]])
    assert torch.equal(init["transformer.blocks.1.attn.qkv.weight"], want)
    assert not any(k.startswith("transformer.blocks.2.") for k in init)
    assert torch.equal(init["transformer.norm.weight"], state["vision_model.post_layernorm.weight"])


def test_bad_towers_are_named():
    state = load_file(str(DATA / "siglip2.safetensors"))
    with pytest.raises(WeightsFormatError, match="has 3 blocks.*enc_depth=4"):
        siglip2_to_encoder_init(state, depth=4, num_tokens=16, grid=4)
    with pytest.raises(WeightsFormatError, match="position_embedding.weight.*8x8"):
        siglip2_to_encoder_init(state, depth=3, num_tokens=16, grid=8)
    extra = dict(state, **{"vision_model.embeddings.extra": torch.zeros(1)})
    with pytest.raises(WeightsFormatError, match="unexpected keys.*embeddings.extra"):
        siglip2_to_encoder_init(extra, depth=3, num_tokens=16, grid=4)
    missing = {k: v for k, v in state.items() if "layers.0.mlp.fc2.bias" not in k}
    with pytest.raises(WeightsFormatError, match="missing key 'vision_model.encoder.layers.0.mlp.fc2.bias"):
        siglip2_to_encoder_init(missing, depth=3, num_tokens=16, grid=4)


def synthetic_tower(cfg: TokenizerConfig, depth: int) -> dict:
    """SigLIP2 key names at cfg's sizes (what `convert siglip2 --model <name>` expects), random values."""
    g = torch.Generator().manual_seed(0)
    w, m, p = cfg.enc_width, cfg.enc_mlp, "vision_model."
    s = {p + "embeddings.patch_embedding.weight": torch.randn(w, 3 * cfg.patch_size ** 2, generator=g),
         p + "embeddings.patch_embedding.bias": torch.randn(w, generator=g),
         p + "embeddings.position_embedding.weight": torch.randn(cfg.grid_size ** 2, w, generator=g),
         p + "post_layernorm.weight": torch.randn(w, generator=g),
         p + "post_layernorm.bias": torch.randn(w, generator=g),
         p + "head.probe": torch.randn(1, 1, w, generator=g)}
    for n in range(depth):
        q = f"{p}encoder.layers.{n}."
        for name, shape in (("layer_norm1", (w,)), ("layer_norm2", (w,)), ("self_attn.q_proj", (w, w)),
                            ("self_attn.k_proj", (w, w)), ("self_attn.v_proj", (w, w)),
                            ("self_attn.out_proj", (w, w)), ("mlp.fc1", (m, w)), ("mlp.fc2", (w, m))):
            s[q + name + ".weight"] = torch.randn(*shape, generator=g)
            s[q + name + ".bias"] = torch.randn(shape[0], generator=g)
    return s


def test_cli_converts_for_a_named_model(tmp_path):
    from detailflow.cli import main

    cfg = get_model_config("smoke").tokenizer
    save_file(synthetic_tower(cfg, cfg.enc_depth + 1), str(tmp_path / "sig.safetensors"))
    dst = tmp_path / "out" / "init.safetensors"
    src = str(tmp_path / "sig.safetensors")
    res = CliRunner().invoke(main, ["weights", "convert", "siglip2", src, str(dst), "--model", "smoke"])
    assert res.exit_code == 0, res.output
    assert "sha256" in res.output and dst.is_file()
    tok = DetailFlowTokenizer(dataclasses.replace(cfg, encoder_init_path=str(dst)))
    table = load_file(src)["vision_model.embeddings.position_embedding.weight"]
    assert torch.equal(tok.encoder.pos_2d.detach().reshape(-1, cfg.enc_width), table)
    res = CliRunner().invoke(main, ["weights", "convert", "siglip2", src, str(dst),
                                    "--model", "tiny"])  # an 8x8-grid, width-64 model: refused by name
    assert res.exit_code == 1 and "position_embedding.weight" in res.output and "8x8" in res.output
