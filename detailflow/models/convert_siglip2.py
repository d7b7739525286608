"""SigLIP2 vision-tower state dicts (Hugging Face `Siglip2VisionModel` names) -> this project's ViT names.

Usage:
    from detailflow.models.convert_siglip2 import siglip2_to_encoder_init
    init = siglip2_to_encoder_init(hf_state, depth=12, num_tokens=128, grid=16)   # Encoder state dict

Mapping rules (one tower, prefix P = "vision_model."; n < depth):
    P.embeddings.patch_embedding.{weight,bias}    -> embed.{weight,bias}     (Linear 3*p*p -> width; same
                                                     (row, column, channel) pixel order as vit.patchify)
    P.embeddings.position_embedding.weight (s*s, w) -> pos_2d (s, s, w)        (s must equal the patch grid)
    P.encoder.layers.n.layer_norm1 / layer_norm2   -> transformer.blocks.n.norm1 / norm2
    P.encoder.layers.n.self_attn.{q,k,v}_proj      -> transformer.blocks.n.attn.qkv (rows [q; k; v], fused)
    P.encoder.layers.n.self_attn.out_proj          -> transformer.blocks.n.attn.proj
    P.encoder.layers.n.mlp.fc1 / fc2               -> transformer.blocks.n.fc1 / fc2
    P.post_layernorm                                -> transformer.norm
Dropped on purpose: layers >= depth (the recipe keeps the first enc_depth blocks), the pooling head
(P.head.*) and a full Siglip2Model's text tower / logit scale. Anything else left over is an error.
SigLIP2 has no latent slots: latent_queries / refined_queries / latent_pos are drawn as Encoder does
(normal std 0.02, truncated normal std 0.02) from `seed`, so the init file is complete.
"""

from __future__ import annotations

import re

import torch


class WeightsFormatError(ValueError):
    """A state dict that does not have the layout a converter expects; the message names the key."""


class StateTaker:
    """Hands out a source state dict's tensors by name and remembers which were taken."""

    def __init__(self, state: dict, what: str):
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise WeightsFormatError(f"{what}: entries that are not tensors: {bad[:5]}")
        self.state, self.what, self.taken = state, what, set()

    def take(self, key: str, shape: tuple | None = None) -> torch.Tensor:
        if key not in self.state:
            raise WeightsFormatError(f"{self.what}: missing key {key!r}")
        value = self.state[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise WeightsFormatError(f"{self.what}: {key!r} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(shape)}")
        self.taken.add(key)
        return value

    def has(self, key: str) -> bool:
        return key in self.state

    def finish(self, dropped: list[str] = ()) -> list[str]:
        """Raise naming every key neither taken nor matched by a `dropped` regex; returns the dropped keys."""
        left = sorted(k for k in self.state if k not in self.taken)
        drop = [k for k in left if any(re.fullmatch(p, k) for p in dropped)]
        extra = [k for k in left if k not in drop]
        if extra:
            raise WeightsFormatError(f"{self.what}: unexpected keys ({len(extra)}): {extra[:10]}")
        return drop


def count_layers(state: dict, prefix: str) -> int:
    """Number of `{prefix}encoder.layers.N.` blocks present (0 if none)."""
    pat = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    ids = {int(m.group(1)) for k in state if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def tower_blocks(src: StateTaker, prefix: str, dst: str, depth: int, width: int) -> dict:
    """Blocks 0..depth-1 and the post-LayerNorm of a SigLIP2 tower -> `{dst}blocks.n.*` / `{dst}norm.*`."""
    out = {}
    for n in range(depth):
        s, d = f"{prefix}encoder.layers.{n}.", f"{dst}blocks.{n}."
        for part in ("weight", "bias"):
            qkv = [src.take(f"{s}self_attn.{x}_proj.{part}") for x in "qkv"]
            for x, t in zip("qkv", qkv, strict=True):
                if t.shape[0] != width:
                    raise WeightsFormatError(f"{src.what}: {s}self_attn.{x}_proj.{part} has shape "
                                             f"{tuple(t.shape)}, expected width {width} rows")
            out[f"{d}attn.qkv.{part}"] = torch.cat(qkv, dim=0)
            for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
                         ("self_attn.out_proj", "attn.proj"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
                out[f"{d}{b}.{part}"] = src.take(f"{s}{a}.{part}")
    for part in ("weight", "bias"):
        out[f"{dst}norm.{part}"] = src.take(f"{prefix}post_layernorm.{part}")
    return out


def position_table(src: StateTaker, prefix: str, grid: int) -> torch.Tensor:
    """The learned s*s x w position table as s x s x w; s must be the model's patch grid."""
    key = f"{prefix}embeddings.position_embedding.weight"
    table = src.take(key)
    side = round(table.shape[0] ** 0.5)
    if table.ndim != 2 or side * side != table.shape[0] or side != grid:
        raise WeightsFormatError(f"{src.what}: {key!r} has shape {tuple(table.shape)}; expected a "
                                 f"{grid}x{grid} table ({grid * grid} rows) for the model's patch grid")
    return table.reshape(side, side, -1)


def latent_init(num_tokens: int, width: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "latent_queries": torch.randn(num_tokens, width, generator=gen) * 0.02,
        "refined_queries": torch.randn(num_tokens, width, generator=gen) * 0.02,
        "latent_pos": torch.nn.init.trunc_normal_(torch.empty(num_tokens, width), std=0.02, generator=gen),
    }


def siglip2_to_encoder_init(state: dict, depth: int, num_tokens: int, grid: int, seed: int = 0,
                            prefix: str = "vision_model.") -> dict:
    """A SigLIP2 vision tower's state dict -> a complete `Encoder` state dict (see the module docstring)."""
    src = StateTaker(dict(state), "SigLIP2 state dict")
    have = count_layers(state, prefix)
    if have < depth:
        raise WeightsFormatError(f"SigLIP2 state dict has {have} blocks under {prefix!r}encoder.layers, "
                                 f"the encoder needs enc_depth={depth}")
    embed_w = src.take(f"{prefix}embeddings.patch_embedding.weight")
    width = embed_w.shape[0]
    out = {"embed.weight": embed_w, "embed.bias": src.take(f"{prefix}embeddings.patch_embedding.bias"),
           "pos_2d": position_table(src, prefix, grid)}
    out.update(tower_blocks(src, prefix, "transformer.", depth, width))
    out.update(latent_init(num_tokens, width, seed))
    p = re.escape(prefix)
    later = "|".join(str(n) for n in range(depth, have))
    dropped = [p + r"head\..*", r"text_model\..*", r"logit_(scale|bias)"]
    src.finish(dropped + ([p + rf"encoder\.layers\.({later})\..*"] if later else []))
    return {k: v.contiguous() for k, v in out.items()}
