"""Record the fixtures that pin the released-weights importer (tests/test_weights_import.py,
tests/test_weights_siglip2.py). Run once, by hand, never in CI; nothing is downloaded.

    pip install --target /tmp/dfref_pkgs --no-deps \
        transformers==4.53.2 huggingface_hub==0.34.4 tokenizers==0.21.4 regex
    PYTHONPATH=/tmp/dfref_pkgs .venv/bin/python scripts/record_released_fixtures.py tests/data/released

With the authors' repository (a work tree of ByteFlow-AI/DetailFlow, e.g. `git archive HEAD | tar -x`),
record the references from THEIR code (how tests/data/released was recorded):

    PYTHONPATH=/tmp/dfref_pkgs .venv/bin/python scripts/record_released_fixtures.py tests/data/released \
        --authors-repo /tmp/authors

`--authors-repo` loads the same random weights strictly into their classes (modelling/tokenizer.py VQModel
built by their VQ_models["VQ-16"] from the fixture's config.json, with SiglipEncoder/SiglipDecoder,
VectorQuantizer; autoregressive/models/gpt.py Transformer) and records their outputs: codes from
VQModel.encode, pixels from VQModel.decode_code at the canvas of their ResolutionDegradation, GPT logits from
Transformer.forward(basic_group_inference=True), CFG by generate.py's formula. It prints the max
|authors - re-implementation| per output (recorded 2026-12-04: 0 for codes and all GPT logits, <= 9.4e-7 for
the pixels). Only what their forward never calls is stood in for: `tools` (json_dump, used by save_config)
and, when timm cannot import (it needs torchvision), timm.layers.trunc_normal_ (init only, overwritten by
the load). Their towers read the SigLIP2 config from $CACHE_DATA_PATH/siglip2-so400m-patch16-naflex: a tiny
random SigLIP2 is saved there, both towers are built "pretrained" from it with every block kept
(encoder_model/decoder_model "siglip2": "siglip2_base" would demand 12 pretrained blocks; the key layout is
the same), and global_token_loss_weight=1 builds their training-only repa_model.* / global_token_proj.*,
which the fixture leaves out (the importer drops them by name).

What it does, on random weights of tiny dimensions (seed 0):
- builds the released tokenizer's state dict in the authors' layout (ByteFlow-AI/DetailFlow,
  modelling/tokenizer.py VQModel with SiglipEncoder/SiglipDecoder): the two towers are real Hugging Face
  `Siglip2VisionModel(...).vision_model` modules (head removed, decoder patch embedding removed, as the
  authors' SiglipEncoder/SiglipDecoder do), plus latent_tokens / refined_tokens / latent_pos_embed /
  mask_token / to_pixel / quant_conv / post_quant_conv / refine_conv / quantize.embedding;
- builds the released GPT's state dict in the authors' layout (autoregressive/models/gpt.py Transformer);
- computes reference outputs with the authors' semantics: the SigLIP2 layers and the position-table resize
  are the Hugging Face modules themselves; the glue around them (latent-token concatenation, the
  create_attn_mask_for_x_z mask, l2 VQ by squared distance, ToPixel's unpatchify, the GPT's sequence
  layout, group-causal mask, 2D RoPE table and split-qkv attention) is re-written here from reading the
  authors' code (without --authors-repo this independent re-computation is what gets recorded; with it, it
  is cross-checked against their code and their outputs are recorded);
- records a synthetic SigLIP2 vision tower (HF names, tiny dims) and its HF output on patch tokens.

Outputs (all small): released_tok.safetensors / released_ar.safetensors (authors' key names; the
65,536-entry `quantize.codebook_used` usage buffer is left out and re-added as zeros by the tests),
siglip2.safetensors, references.safetensors and manifest.json (configs, key names and shapes, the
canvas of each prefix length under the authors' resolution map, CFG scale).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

IMG, PATCH, N, G, CAUSAL = 32, 8, 16, 4, 4
ENC_W, ENC_D, ENC_H, DEC_W, DEC_D, DEC_H = 32, 2, 2, 32, 2, 2
K, CODE_DIM = 64, 8
AR = dict(dim=32, n_layer=2, n_head=2, vocab_size=K, block_size=N, group_size=G, causal_num=CAUSAL,
          num_classes=10, multiple_of=32, norm_eps=1e-5, rope_base=10000.0, class_dropout_prob=0.1)
PREFIXES = [1, 2, 4, 8, 16]
CFG_SCALE = 1.5
TOK_JSON = {
    "image_size": IMG, "max_image_size": IMG, "codebook_size": K, "codebook_embed_dim": CODE_DIM,
    "codebook_l2_norm": True, "codebook_show_usage": True, "commit_loss_beta": 0.25,
    "entropy_loss_ratio": 0.0, "vq_loss_ratio": 1.0, "num_codebooks": 1,
    "encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4],
    "enc_type": "siglip2", "dec_type": "siglip2", "encoder_model": "siglip2_base",
    "decoder_model": "siglip2_base", "num_latent_tokens": N, "enc_pretrained": True,
    "dec_pretrained": False, "enc_patch_size": PATCH, "dec_patch_size": PATCH, "repa": False,
    "causal_encoder": True, "causal_decoder": False, "group_size": G, "causal_num": CAUSAL,
    "global_token_loss_weight": 1.0, "correction_training": True}


def tower(width: int, depth: int, heads: int):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    cfg = Siglip2VisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                              num_attention_heads=heads, num_patches=(IMG // PATCH) ** 2, patch_size=PATCH,
                              layer_norm_eps=1e-6, attn_implementation="eager")
    vm = Siglip2VisionModel(cfg).vision_model
    vm.head = torch.nn.Identity()
    vm.use_head = False
    return vm


def jitter(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def resize_pos(vm, gh: int):
    emb = vm.embeddings
    side = emb.position_embedding_size
    table = emb.position_embedding.weight.reshape(side, side, -1)
    shapes = torch.tensor([[gh, gh]])
    return emb.resize_positional_embeddings(table, shapes, max_length=gh * gh)[0]


def to_patches(img, p):  # (B, 3, H, W) -> (B, L, p*p*3) in (row, col, channel) order
    b, c, h, w = img.shape
    x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def authors_x_z_mask(n, m, x_see_z, z_see_x, z_causal):  # True = blocked (their convention)
    blocked = torch.zeros(n + m, n + m, dtype=torch.bool)
    if not x_see_z:
        blocked[:n, n:] = True
    if not z_see_x:
        blocked[n:, :n] = True
    if z_causal:
        for start in range(n, n + m, G):
            end = start + G
            if start < n + CAUSAL:
                blocked[start:end, start:end] = torch.triu(torch.ones(G, G, dtype=torch.bool), 1)
            blocked[start:end, end:] = True
    return blocked


def run_tower(vm, h, blocked):
    mask = None
    if blocked is not None:
        mask = torch.zeros(blocked.shape).masked_fill(blocked, torch.finfo(torch.float32).min)[None, None]
    for layer in vm.encoder.layers:
        h = layer(h, mask)[0]
    return vm.post_layernorm(h)


def canvas(t: int) -> int:  # token_res_map_func, then the smart resize up to the decoder patch
    b = (IMG - 1) / math.pow(N - 1, 1.5)
    s = max(1, min(IMG, int(IMG - b * math.pow(N - t, 1.5))))
    return max(PATCH, math.ceil(s / PATCH) * PATCH)


def tokenizer_parts(gen):
    enc, dec = tower(ENC_W, ENC_D, ENC_H), tower(DEC_W, DEC_D, DEC_H)
    dec.embeddings.patch_embedding = torch.nn.Identity()
    jitter(enc, gen)
    jitter(dec, gen)
    extra = {
        "encoder.latent_pos_embed": 0.02 * torch.randn(1, N, ENC_W, generator=gen),
        "encoder.latent_tokens": 0.02 * torch.randn(1, N, ENC_W, generator=gen),
        "encoder.refined_tokens": 0.02 * torch.randn(1, N, ENC_W, generator=gen),
        "decoder.latent_pos_embed": 0.02 * torch.randn(1, N, DEC_W, generator=gen),
        "decoder.mask_token": 0.02 * torch.randn(1, 1, DEC_W, generator=gen),
        "decoder.to_pixel.model.weight": 0.1 * torch.randn(PATCH * PATCH * 3, DEC_W, generator=gen),
        "decoder.to_pixel.model.bias": 0.1 * torch.randn(PATCH * PATCH * 3, generator=gen),
        "quant_conv.weight": 0.3 * torch.randn(CODE_DIM, ENC_W, generator=gen),
        "quant_conv.bias": 0.1 * torch.randn(CODE_DIM, generator=gen),
        "post_quant_conv.weight": 0.5 * torch.randn(DEC_W, CODE_DIM, generator=gen),
        "post_quant_conv.bias": 0.1 * torch.randn(DEC_W, generator=gen),
        "refine_conv.weight": 0.3 * torch.randn(ENC_W, CODE_DIM, generator=gen),
        "refine_conv.bias": 0.1 * torch.randn(ENC_W, generator=gen),
        "quantize.embedding.weight": F.normalize(torch.randn(K, CODE_DIM, generator=gen), dim=-1),
    }
    state = {f"encoder.visual_model.{k}": v for k, v in enc.state_dict().items()}
    state.update({f"decoder.visual_model.{k}": v for k, v in dec.state_dict().items()})
    state.update(extra)
    return enc, dec, state


@torch.no_grad()
def tokenizer_reference(enc, dec, s, img):
    gh = IMG // PATCH
    x = enc.embeddings.patch_embedding(to_patches(img, PATCH)) + resize_pos(enc, gh)
    z = (s["encoder.latent_tokens"] + s["encoder.latent_pos_embed"]).expand(img.shape[0], -1, -1)
    h = run_tower(enc, torch.cat([x, z], 1), authors_x_z_mask(gh * gh, N, False, True, True))
    lat = F.normalize(F.linear(h[:, gh * gh:], s["quant_conv.weight"], s["quant_conv.bias"]), dim=-1)
    book = F.normalize(s["quantize.embedding.weight"], dim=-1)
    d = lat.pow(2).sum(-1, keepdim=True) + book.pow(2).sum(-1) - 2 * lat @ book.t()
    codes = d.argmin(-1)
    out = {"images": img, "codes": codes}
    for t in PREFIXES:
        side = canvas(t) // PATCH
        q = F.linear(book[codes[:, :t]], s["post_quant_conv.weight"], s["post_quant_conv.bias"])
        q = q + s["decoder.latent_pos_embed"][:, :t]
        m = (s["decoder.mask_token"] + resize_pos(dec, side)).expand(img.shape[0], -1, -1)
        hd = run_tower(dec, torch.cat([m, q], 1), None)[:, : side * side]  # causal_decoder: False
        px = F.linear(hd, s["decoder.to_pixel.model.weight"], s["decoder.to_pixel.model.bias"])
        px = px.reshape(img.shape[0], side, side, PATCH, PATCH, 3)
        out[f"pixels_t{t}"] = torch.einsum("nhwpqc->nchpwq", px).reshape(img.shape[0], 3, side * PATCH, -1)
    return out


def authors_reference(repo: str, tok: dict, ar: dict, img, codes, classes, work: Path) -> dict:
    """The same outputs computed by the authors' own classes (their VQModel, SiglipEncoder/SiglipDecoder,
    VectorQuantizer, ResolutionDegradation, GPT Transformer) with the fixture weights loaded strictly."""
    import os
    import types

    sys.path.insert(0, repo)
    # `tools` (their package __init__ also pulls hdfs helpers and ruamel.yaml) is imported by tokenizer.py and
    # gpt.py for json_dump, used only by save_config: never called here, so a bare module stands in for it
    sys.modules.setdefault("tools", types.ModuleType("tools")).json_dump = None
    try:  # timm.layers.trunc_normal_ only initialises parameters that load_state_dict then overwrites
        import timm.layers  # noqa: F401
    except ImportError:  # timm needs torchvision; torch's own trunc_normal_ does the same init
        timm = sys.modules["timm"] = types.ModuleType("timm")
        timm.layers = sys.modules["timm.layers"] = types.ModuleType("timm.layers")
        timm.layers.trunc_normal_ = torch.nn.init.trunc_normal_
    # their towers read the SigLIP2 config (and, pretrained, its weights) from $CACHE_DATA_PATH: a tiny one
    enc_cfg = tower(ENC_W, ENC_D, ENC_H).config
    pre = work / "siglip2-so400m-patch16-naflex"
    from transformers import Siglip2VisionModel

    Siglip2VisionModel(enc_cfg).save_pretrained(str(pre))
    os.environ["CACHE_DATA_PATH"] = str(work)
    from autoregressive.models.gpt import ModelArgs, Transformer
    from modelling.detail_token import ResolutionDegradation
    from modelling.tokenizer import VQ_models

    cj = dict(TOK_JSON)
    cj.pop("encoder_ch_mult"), cj.pop("decoder_ch_mult")  # as their load_vq_model does
    # both towers from the (tiny) "pretrained" SigLIP2 with all its blocks: "siglip2" keeps every layer
    # (siglip2_base would demand 12 pretrained blocks); the key layout is the same
    # global_token_loss_weight != 0 builds the frozen teacher (repa_model, "siglip2" is the only one their
    # builder accepts) and the first-token alignment head (global_token_proj): training-only parts
    cj.update(encoder_model="siglip2", decoder_model="siglip2", dec_pretrained=True, repa_model="siglip2",
              repa_patch_size=PATCH)
    vq = VQ_models["VQ-16"](**cj).eval()
    full = dict(tok, **{"quantize.codebook_used": torch.zeros(65536)})
    theirs = {k: tuple(v.shape) for k, v in vq.state_dict().items()}
    extra = sorted({k.split(".")[0] for k in set(theirs) - set(full)})
    assert extra == ["global_token_proj", "repa_model"], extra  # the importer's named drops
    assert all(theirs[k] == tuple(v.shape) for k, v in full.items()), "fixture layout != authors' layout"
    missing, unexpected = vq.load_state_dict(full, strict=False)
    assert not unexpected and all(k.split(".")[0] in extra for k in missing)
    print(f"authors' VQModel: {len(full)} fixture keys loaded; training-only keys not in the fixture: "
          f"{len(missing)} under {extra}")
    rd = ResolutionDegradation(max_img_size=IMG, max_token_num=N, group_size=G, causal_num=CAUSAL, p=1.5,
                               enc_patch_size=PATCH, dec_patch_size=PATCH, min_dec_res=PATCH)
    out = {"images": img}
    with torch.no_grad():
        _, _, info = vq.encode(img)
        out["codes"] = info[-1].reshape(img.shape[0], N)
        for t in PREFIXES:
            out[f"pixels_t{t}"] = vq.decode_code(out["codes"], t, img_size=rd.token2dec_out_res[t])
        gpt = Transformer(ModelArgs(**{k: v for k, v in AR.items()})).eval()
        gpt.load_state_dict(ar, strict=True)

        def logits(idx, cls):
            return gpt(idx, cls, basic_group_inference=True)[0]

        null = torch.full_like(classes, AR["num_classes"])
        cond, uncond = logits(codes[:, : N - G], classes), logits(codes[:, : N - G], null)
        out.update(ar_codes=codes, ar_classes=classes, ar_logits_cond=cond, ar_logits_uncond=uncond,
                   ar_logits_cfg=uncond + (cond - uncond) * CFG_SCALE,  # generate.py's formula
                   ar_prefix_logits=logits(codes[:, : 2 * G], classes)[:, -G:],
                   # the sequential phase (fewer than causal_num codes: no query tokens in the sequence)
                   ar_sequential_logits=logits(codes[:, :2], classes)[:, -1:])
    return out


def ar_state(gen):
    d, hidden = AR["dim"], AR["multiple_of"] * math.ceil(int(2 * 4 * AR["dim"] / 3) / AR["multiple_of"])
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=gen)  # noqa: E731
    s = {"cls_embedding.embedding_table.weight": r(AR["num_classes"] + 1, d),
         "tok_embeddings.weight": r(K, d), "norm.weight": 1 + r(d), "output.weight": r(K, d),
         "spe_tok_embeddings.special_embeddings.weight": r(G - 1, d)}
    for i in range(AR["n_layer"]):
        p = f"layers.{i}."
        s.update({p + "attention.wqkv.weight": r(3 * d, d), p + "attention.wo.weight": r(d, d),
                  p + "feed_forward.w1.weight": r(hidden, d), p + "feed_forward.w3.weight": r(hidden, d),
                  p + "feed_forward.w2.weight": r(d, hidden), p + "attention_norm.weight": 1 + r(d),
                  p + "ffn_norm.weight": 1 + r(d)})
    return s


def rms(x, w):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + AR["norm_eps"])) * w


def ar_logits(s, idx, cls):  # their training-mode forward, dropout off
    d, h = AR["dim"], AR["n_head"]
    hd, half = d // h, d // h // 2
    x = torch.cat([s["cls_embedding.embedding_table.weight"][cls][:, None],
                   s["tok_embeddings.weight"][idx[:, :CAUSAL]],
                   s["spe_tok_embeddings.special_embeddings.weight"][None].expand(len(idx), -1, -1),
                   s["tok_embeddings.weight"][idx[:, CAUSAL:]]], 1)
    L = x.shape[1]
    allowed = torch.tensor([[(j <= i) if i < CAUSAL else (i // G >= j // G) for j in range(L)]
                            for i in range(L)])
    freqs = 1.0 / (AR["rope_base"] ** (torch.arange(0, half, 2).float() / half))
    rows, cols = torch.outer(torch.arange(N // G).float(), freqs), torch.outer(torch.arange(G).float(), freqs)
    grid = torch.cat([rows[:, None].expand(-1, G, -1), cols[None].expand(N // G, -1, -1)], -1).flatten(0, 1)
    cos = torch.cat([torch.zeros(1, half), grid.cos()])[:L]
    sin = torch.cat([torch.zeros(1, half), grid.sin()])[:L]

    def rope(v):  # (B, L, H, hd)
        v2 = v.reshape(*v.shape[:-1], -1, 2)
        c, sn = cos[None, :, None], sin[None, :, None]
        a, b = v2[..., 0], v2[..., 1]
        return torch.stack([a * c - b * sn, b * c + a * sn], -1).flatten(3)

    for i in range(AR["n_layer"]):
        p = f"layers.{i}."
        a = rms(x, s[p + "attention_norm.weight"])
        q, k, v = (a @ s[p + "attention.wqkv.weight"].t()).split([d, d, d], -1)
        q, k, v = (t.reshape(len(x), L, h, hd) for t in (q, k, v))
        q, k = rope(q), rope(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + o.transpose(1, 2).reshape(len(x), L, d) @ s[p + "attention.wo.weight"].t()
        f = rms(x, s[p + "ffn_norm.weight"])
        f = F.silu(f @ s[p + "feed_forward.w1.weight"].t()) * (f @ s[p + "feed_forward.w3.weight"].t())
        x = x + f @ s[p + "feed_forward.w2.weight"].t()
    return rms(x, s["norm.weight"]) @ s["output.weight"].t()


def main(out_dir: str, authors_repo: str | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    enc, dec, tok = tokenizer_parts(gen)
    img = torch.rand(2, 3, IMG, IMG, generator=gen) * 2 - 1
    refs = tokenizer_reference(enc.eval(), dec.eval(), tok, img)
    ar = ar_state(gen)
    codes = torch.randint(0, K, (2, N), generator=gen)
    classes = torch.tensor([3, 7])
    null = torch.full_like(classes, AR["num_classes"])
    cond, uncond = ar_logits(ar, codes[:, : N - G], classes), ar_logits(ar, codes[:, : N - G], null)
    refs.update(ar_codes=codes, ar_classes=classes, ar_logits_cond=cond, ar_logits_uncond=uncond,
                ar_logits_cfg=uncond + CFG_SCALE * (cond - uncond),
                ar_prefix_logits=ar_logits(ar, codes[:, : 2 * G], classes)[:, -G:])
    if authors_repo:
        import tempfile

        with tempfile.TemporaryDirectory() as work, torch.random.fork_rng():  # leave the seed stream as is
            theirs = authors_reference(authors_repo, tok, ar, img, codes, classes, Path(work))
        for k, v in ((k, v) for k, v in theirs.items() if k in refs):  # re-computation vs their code
            diff = (v.double() - refs[k].double()).abs().max().item() if v.shape == refs[k].shape else "shape"
            print(f"{k}: max |authors - re-implementation| = {diff}")
        refs = theirs
    sig = tower(ENC_W, 3, ENC_H)
    jitter(sig, gen)
    sig_state = {f"vision_model.{k}": v for k, v in sig.state_dict().items()}
    with torch.no_grad():
        gh = IMG // PATCH
        tokens = sig.embeddings.patch_embedding(to_patches(img, PATCH)) + resize_pos(sig, gh)
        sig_out = run_tower(sig.eval(), tokens, None)
    refs["siglip2_patch_features"] = sig_out
    save_file({k: v.contiguous() for k, v in tok.items()}, str(out / "released_tok.safetensors"))
    save_file(ar, str(out / "released_ar.safetensors"))
    save_file(sig_state, str(out / "siglip2.safetensors"))
    save_file({k: v.contiguous() for k, v in refs.items()}, str(out / "references.safetensors"))
    tok_keys = {k: list(v.shape) for k, v in tok.items()}
    tok_keys["quantize.codebook_used"] = [65536]
    manifest = {
        "tokenizer_config_json": TOK_JSON,
        "tokenizer_config_yaml": {
            "vq_model": "VQ-16", "image_size": IMG, "max_image_size": IMG, "min_image_size": IMG,
            "content_degradation": "resolution_power", "causal_encoder": True, "causal_decoder": False,
            "degradation_prob": 0.2, "degradation_power": 1.5, "dynamic_resolution_prob": 0,
            "enc_type": "siglip2", "num_latent_tokens": N, "group_size": G, "ema": False},
        "ar_config_json": {**AR, "n_kv_head": None, "ffn_dim_multiplier": None, "initializer_range": 0.02,
                           "token_dropout_p": 0.1, "attn_dropout_p": 0.0, "resid_dropout_p": 0.1,
                           "ffn_dropout_p": 0.1, "drop_path_rate": 0.0, "caption_dim": 2048,
                           "model_type": "c2i", "cls_token_num": 1, "max_batch_size": 32,
                           "max_seq_len": 2048, "learnable_tok_embeddings": True},
        "ar_config_yaml": {"gpt_model": "GPT-L", "group_size": G, "num_latent_tokens": N},
        "heads": {"enc": ENC_H, "dec": DEC_H},
        "tokenizer_keys": tok_keys,
        "ar_keys": {k: list(v.shape) for k, v in ar.items()},
        "canvas": {str(t): canvas(t) for t in PREFIXES},
        "cfg_scale": CFG_SCALE,
        "siglip2": {"depth": 3, "width": ENC_W, "heads": ENC_H, "patch": PATCH, "image": IMG},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    args = sys.argv[1:]
    repo = None
    if "--authors-repo" in args:
        i = args.index("--authors-repo")
        repo = args[i + 1]
        del args[i: i + 2]
    main(args[0] if args else "tests/data/released", repo)
