"""The authors' released DetailFlow checkpoints (ByteFlow-AI/DetailFlow) -> this project's configs and keys.

Usage:
    from detailflow.models.convert_released import (tokenizer_config_from_release, convert_tokenizer,
                                                    ar_config_from_release, convert_ar)
    tok_cfg, notes = tokenizer_config_from_release(config_json, config_yaml, state)
    ours = convert_tokenizer(state, tok_cfg)           # -> DetailFlowTokenizer state dict (strict)
    ar_cfg, notes = ar_config_from_release(ar_json, ar_yaml, ar_state)
    ours = convert_ar(ar_state, ar_cfg)                # -> DetailFlowGPT state dict (strict)

Tokenizer (their VQModel; towers are HF SigLIP2 modules under `encoder.visual_model.` and
`decoder.visual_model.`):
    encoder.visual_model.*  -> encoder.{embed, pos_2d, transformer.*}  (rules in convert_siglip2)
    encoder.latent_tokens (1,N,w) / refined_tokens / latent_pos_embed -> encoder.latent_queries (N,w) /
        refined_queries / latent_pos
    decoder.visual_model.{position_embedding, layers, post_layernorm} -> decoder.{pos_2d, transformer.*}
        (their decoder's patch embedding is an Identity: no weights)
    decoder.mask_token (1,1,w) -> decoder.mask_token (1,w);  decoder.latent_pos_embed -> decoder.latent_pos
    decoder.to_pixel.model -> decoder.to_pixels;  post_quant_conv -> decoder.post_quant
    quant_conv -> quant_conv;  refine_conv -> refine_proj;  quantize.embedding.weight -> quantizer.embedding
    dropped: quantize.codebook_used (training usage monitor), global_token_proj.* (the first-token alignment
        head, training only), repa_model.* / projection.* (frozen teacher)
GPT (their autoregressive/models/gpt.py Transformer; same fused [q; k; v] row layout, RoPE tables are not
weights and are rebuilt identically by models/rope.py):
    cls_embedding.embedding_table -> cls_emb;  tok_embeddings -> tok_emb
    spe_tok_embeddings.special_embeddings.weight -> query_emb;  layers.n.attention.{wqkv, wo} ->
    blocks.n.attn.{wqkv, wo};  layers.n.feed_forward.w{1,2,3} -> blocks.n.ffn.w{1,2,3};
    layers.n.{attention_norm, ffn_norm} -> blocks.n.{attn_norm, ffn_norm};  norm -> norm;  output -> head
Options this implementation cannot reproduce are refused by name (ReleaseOptionError).
"""

from __future__ import annotations

import math

import torch

from detailflow.models.configs import ARConfig, TokenizerConfig
from detailflow.models.convert_siglip2 import (
    StateTaker,
    WeightsFormatError,
    count_layers,
    position_table,
    tower_blocks,
)

# encoder_model / decoder_model -> attention heads, as their model_builder builds it: the pretrained towers
# are SigLIP2-so400m (16 heads, whatever the number of blocks kept); siglip2_base from scratch has 12
_HEADS = {("siglip2_base", False): 12, ("siglip2_base", True): 16, ("siglip2_large", True): 16,
          ("siglip2", True): 16}
TOK_DROPPED = [r"quantize\.codebook_used", r"global_token_proj\..*", r"repa_model\..*", r"projection\..*"]


class ReleaseOptionError(ValueError):
    """The released config uses an option this implementation does not support; names the field."""


def _need(cfg: dict, field: str, ok, why: str, source: str = "config.json") -> None:
    if field in cfg and not ok(cfg[field]):
        raise ReleaseOptionError(f"{source}: {field}={cfg[field]!r} is not supported ({why})")


def _heads(model: str | None, pretrained: bool, override: int | None, field: str) -> int:
    if override:
        return int(override)
    key = (model, bool(pretrained)) if model == "siglip2_base" else (model, True)
    if key not in _HEADS:
        raise ReleaseOptionError(f"config.json: {field}={model!r} is not a known SigLIP2 tower "
                                 "(siglip2_base, siglip2_large, siglip2); pass the head count explicitly")
    return _HEADS[key]


def tokenizer_config_from_release(cj: dict, cy: dict, state: dict,
                                  heads: dict | None = None) -> tuple[TokenizerConfig, list[str]]:
    """config.json (their ModelArgs) + config.yaml (training options) + state dict -> TokenizerConfig."""
    heads = heads or {}
    for f, ok, why in (("enc_type", lambda v: v == "siglip2", "only SigLIP2 ViT towers"),
                       ("dec_type", lambda v: v == "siglip2", "only SigLIP2 ViT towers"),
                       ("codebook_l2_norm", bool, "the quantiser is l2-normalised"),
                       ("num_codebooks", lambda v: v == 1, "one codebook"),
                       ("causal_encoder", bool, "the encoder's latents are group-causal"),
                       ("causal_decoder", lambda v: not v, "the decoder attends bidirectionally"),
                       ("repa", lambda v: not v, "no REPA decoder-feature alignment"),
                       ("entropy_loss_ratio", lambda v: not v, "no codebook entropy loss"),
                       ("correction_training", bool, "the encoder always has the self-correction path")):
        _need(cj, f, ok, why)
    for f, ok, why in (("content_degradation", lambda v: v == "resolution_power", "only R(t) degradation"),
                       ("dynamic_resolution_prob", lambda v: not v, "one training resolution"),
                       ("causal_decoder", lambda v: not v, "the decoder attends bidirectionally")):
        _need(cy, f, ok, why, "config.yaml")
    size = cj.get("image_size", cy.get("image_size"))
    for src, cfg in (("config.json", cj), ("config.yaml", cy)):
        if cfg.get("max_image_size", size) != size:
            raise ReleaseOptionError(f"{src}: max_image_size={cfg['max_image_size']!r} differs from "
                                     f"image_size={size} (only one resolution is supported)")
    patch = cj.get("enc_patch_size", 16)
    if cj.get("dec_patch_size", patch) != patch:
        raise ReleaseOptionError(f"config.json: dec_patch_size={cj['dec_patch_size']} differs from "
                                 f"enc_patch_size={patch} (one patch size for both towers)")
    enc_p, dec_p = "encoder.visual_model.", "decoder.visual_model."
    try:
        embed = state[enc_p + "embeddings.patch_embedding.weight"]
        fc1e = state[enc_p + "encoder.layers.0.mlp.fc1.weight"]
        mask, fc1d = state["decoder.mask_token"], state[dec_p + "encoder.layers.0.mlp.fc1.weight"]
        book, lat = state["quantize.embedding.weight"], state["encoder.latent_tokens"]
    except KeyError as e:
        raise WeightsFormatError(f"tokenizer state dict: missing key {e.args[0]!r}") from None
    n = int(cj.get("num_latent_tokens", lat.shape[1]))
    for what, got, want in (("num_latent_tokens", lat.shape[1], n),
                            ("codebook_size", book.shape[0], cj.get("codebook_size", book.shape[0])),
                            ("codebook_embed_dim", book.shape[1],
                             cj.get("codebook_embed_dim", book.shape[1])),
                            ("enc_patch_size", embed.shape[1], 3 * patch * patch)):
        if got != want:
            raise WeightsFormatError(f"config.json {what} does not match the weights: {got} vs {want}")
    group = int(cj.get("group_size", cy.get("group_size", 1)))
    cfg = TokenizerConfig(
        image_size=int(size), patch_size=int(patch), num_tokens=n, group_size=group,
        causal_num=int(cj.get("causal_num") or group), alpha=float(cy.get("degradation_power", 1.5)),
        enc_width=embed.shape[0], enc_depth=count_layers(state, enc_p),
        enc_heads=_heads(cj.get("encoder_model"), cj.get("enc_pretrained", True), heads.get("enc"),
                         "encoder_model"),
        enc_mlp=fc1e.shape[0], dec_width=mask.shape[-1], dec_depth=count_layers(state, dec_p),
        dec_heads=_heads(cj.get("decoder_model"), cj.get("dec_pretrained", False), heads.get("dec"),
                         "decoder_model"),
        dec_mlp=fc1d.shape[0], codebook_size=book.shape[0], code_dim=book.shape[1],
        commit_beta=float(cj.get("commit_loss_beta", 0.25)),
        codebook_weight=float(cj.get("vq_loss_ratio", 1.0)),
        noise_topk=min(50, book.shape[0]),  # their encode_image hard-codes top_k=50
        degrade_prob=float(cy.get("degradation_prob", 0.2)), self_correction=True,
        align_weight=0.0, align_teacher="none", perceptual_weight=0.0, gan_weight=0.0,
    )
    notes = ["training-only parts dropped: the first-token alignment head (global_token_proj), the codebook "
             "usage buffer; the export is inference-ready (align/perceptual/GAN off: set them to fine-tune)"]
    return cfg, notes


def _squeeze(src: StateTaker, key: str, shape: tuple) -> torch.Tensor:
    t = src.take(key)
    if t.numel() != math.prod(shape):
        raise WeightsFormatError(f"{src.what}: {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t.reshape(shape)


def convert_tokenizer(state: dict, cfg: TokenizerConfig) -> dict:
    """Their VQModel state dict -> DetailFlowTokenizer state dict; every tensor consumed or named dropped."""
    src = StateTaker(dict(state), "tokenizer state dict")
    enc_p, dec_p, n, grid = "encoder.visual_model.", "decoder.visual_model.", cfg.num_tokens, cfg.grid_size
    ew, dw = cfg.enc_width, cfg.dec_width
    out = {"encoder.embed.weight": src.take(enc_p + "embeddings.patch_embedding.weight"),
           "encoder.embed.bias": src.take(enc_p + "embeddings.patch_embedding.bias"),
           "encoder.pos_2d": position_table(src, enc_p, grid),
           "encoder.latent_queries": _squeeze(src, "encoder.latent_tokens", (n, ew)),
           "encoder.refined_queries": _squeeze(src, "encoder.refined_tokens", (n, ew)),
           "encoder.latent_pos": _squeeze(src, "encoder.latent_pos_embed", (n, ew)),
           "decoder.pos_2d": position_table(src, dec_p, grid),
           "decoder.mask_token": _squeeze(src, "decoder.mask_token", (1, dw)),
           "decoder.latent_pos": _squeeze(src, "decoder.latent_pos_embed", (n, dw)),
           "quantizer.embedding": src.take("quantize.embedding.weight")}
    out.update(tower_blocks(src, enc_p, "encoder.transformer.", cfg.enc_depth, ew))
    out.update(tower_blocks(src, dec_p, "decoder.transformer.", cfg.dec_depth, dw))
    for theirs, ours in (("decoder.to_pixel.model", "decoder.to_pixels"),
                         ("post_quant_conv", "decoder.post_quant"),
                         ("quant_conv", "quant_conv"), ("refine_conv", "refine_proj")):
        for part in ("weight", "bias"):
            out[f"{ours}.{part}"] = src.take(f"{theirs}.{part}")
    src.finish(TOK_DROPPED)
    return {k: v.contiguous() for k, v in out.items()}


def ar_config_from_release(cj: dict, cy: dict, state: dict) -> tuple[ARConfig, list[str]]:
    """config.json (their GPT ModelArgs) + config.yaml + state dict -> ARConfig."""
    for f, ok, why in (("model_type", lambda v: v == "c2i", "class-conditional only"),
                       ("cls_token_num", lambda v: v == 1, "one class token"),
                       ("n_kv_head", lambda v: v in (None, cj.get("n_head")), "no grouped-query attention"),
                       ("ffn_dim_multiplier", lambda v: v is None, "SwiGLU width 2/3*4*dim rounded up"),
                       ("class_dropout_prob", lambda v: v > 0, "CFG needs the null-class row"),
                       ("attn_dropout_p", lambda v: not v, "no attention dropout"),
                       ("drop_path_rate", lambda v: not v, "no drop-path"),
                       ("learnable_tok_embeddings", bool, "token embeddings are trained")):
        _need(cj, f, ok, why)
    for f in ("dim", "n_layer", "n_head", "vocab_size", "block_size", "num_classes"):
        if f not in cj:
            raise ReleaseOptionError(f"config.json: missing field {f!r} of the released GPT config")
    group = int(cj.get("group_size", cy.get("group_size", 1)))
    cfg = ARConfig(vocab_size=int(cj["vocab_size"]), num_classes=int(cj["num_classes"]),
                   num_tokens=int(cj["block_size"]), group_size=group,
                   causal_num=int(cj.get("causal_num") or group),
                   dim=int(cj["dim"]), depth=int(cj["n_layer"]), heads=int(cj["n_head"]),
                   ffn_multiple_of=int(cj.get("multiple_of", 256)), norm_eps=float(cj.get("norm_eps", 1e-5)),
                   rope_base=float(cj.get("rope_base", 10000.0)),
                   class_dropout=float(cj.get("class_dropout_prob", 0.1)),
                   token_dropout=float(cj.get("token_dropout_p", 0.1)),
                   resid_dropout=float(cj.get("resid_dropout_p", 0.1)),
                   ffn_dropout=float(cj.get("ffn_dropout_p", 0.1)))
    have = count_layers({k.replace("layers.", "encoder.layers.", 1): v for k, v in state.items()}, "")
    if have != cfg.depth:
        raise WeightsFormatError(f"config.json n_layer={cfg.depth} but the state dict has {have} layers")
    return cfg, ["RoPE tables and the group-causal mask are rebuilt (not weights)"]


def convert_ar(state: dict, cfg: ARConfig) -> dict:
    """Their GPT state dict -> DetailFlowGPT state dict, shapes checked against cfg."""
    src = StateTaker(dict(state), "GPT state dict")
    d, h = cfg.dim, cfg.ffn_hidden
    out = {"cls_emb.weight": src.take("cls_embedding.embedding_table.weight", (cfg.num_classes + 1, d)),
           "tok_emb.weight": src.take("tok_embeddings.weight", (cfg.vocab_size, d)),
           "query_emb": src.take("spe_tok_embeddings.special_embeddings.weight", (cfg.group_size - 1, d)),
           "norm.weight": src.take("norm.weight", (d,)),
           "head.weight": src.take("output.weight", (cfg.vocab_size, d))}
    for n in range(cfg.depth):
        s, o = f"layers.{n}.", f"blocks.{n}."
        out.update({o + "attn.wqkv.weight": src.take(s + "attention.wqkv.weight", (3 * d, d)),
                    o + "attn.wo.weight": src.take(s + "attention.wo.weight", (d, d)),
                    o + "ffn.w1.weight": src.take(s + "feed_forward.w1.weight", (h, d)),
                    o + "ffn.w3.weight": src.take(s + "feed_forward.w3.weight", (h, d)),
                    o + "ffn.w2.weight": src.take(s + "feed_forward.w2.weight", (d, h)),
                    o + "attn_norm.weight": src.take(s + "attention_norm.weight", (d,)),
                    o + "ffn_norm.weight": src.take(s + "ffn_norm.weight", (d,))})
    src.finish([r"freqs_cis", r"causal_mask"])
    return {k: v.contiguous() for k, v in out.items()}
