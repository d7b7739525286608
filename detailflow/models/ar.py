"""DetailFlow's group-parallel autoregressive model (LlamaGen-style GPT, spec §2.1-§2.4).

Usage:
    from detailflow.models.ar import DetailFlowGPT, select_correction_pairs
    model = DetailFlowGPT(get_model_config("tiny").ar)
    codes_in, codes_tgt = select_correction_pairs(clean, inp, tgt, prob=0.3)   # B x [V x] N triplets
    loss = model.loss(codes_in, codes_tgt, class_ids)                           # mean CE over N positions
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-3, betas=(0.9, 0.95))

Sequence layout (length N, spec §2.2), c = causal_num, g = group_size:
    position q:  0      1 .. c          c+1 .. c+g-1     c+g .. N-1
    input     :  cls    t_0 .. t_{c-1}  query_0..g-2     t_{q-g}
    predicts  :  t_q at every position q.
Attention: rows q < c are causal; every other row sees column j iff q // g >= j // g.
Every row therefore sees a *prefix* of the columns, which lets the sampler (sampler.py) run any
block-aligned chunk of positions against a KV cache with no mask at all.
2D RoPE (rope.py) puts position q >= 1 at row (q-1)//g, column (q-1)%g and zeroes the class token's
query/key (a faithful LlamaGen quirk kept so released weights would load and behave the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from detailflow.models.configs import ARConfig
from detailflow.models.rope import apply_rope, rope_2d_tables


def group_causal_mask(seq_len: int, group_size: int, causal_num: int, device=None) -> torch.Tensor:
    """Boolean `may attend` matrix (rows = queries) of spec §2.2."""
    return torch.arange(seq_len, device=device)[None, :] <= visible_until(
        torch.arange(seq_len, device=device), group_size, causal_num)[:, None]


def visible_until(pos, group_size: int, causal_num: int):
    """Last column a row at `pos` may attend to (int or tensor): itself if causal, else its block end."""
    block_end = (pos // group_size + 1) * group_size - 1
    if isinstance(pos, torch.Tensor):
        return torch.where(pos < causal_num, pos, block_end)
    return pos if pos < causal_num else block_end


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # normalise in fp32 even under bf16 (spec §2.1)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # value
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache:
    """Preallocated per-layer keys (already rotated) and values: B x H x N x head_dim each.

    Left uninitialised: a pass only reads positions [0, stop) that earlier passes or itself wrote.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]


class Attention(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.heads = cfg.heads
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.drop = nn.Dropout(cfg.resid_dropout)

    def forward(self, x_BLD, cos, sin, mask, cache: KVCache | None, layer: int, start: int):
        q, k, v = rearrange(self.wqkv(x_BLD), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            stop = start + x_BLD.shape[1]
            cache.k[layer][:, :, start:stop] = k
            cache.v[layer][:, :, start:stop] = v
            k, v = cache.k[layer][:, :, :stop], cache.v[layer][:, :, :stop]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.drop(self.wo(rearrange(out, "b h l d -> b l (h d)")))


class Block(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden, cfg.ffn_dropout)

    def forward(self, x, cos, sin, mask, cache, layer, start):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, start)
        return x + self.ffn(self.ffn_norm(x))


class DetailFlowGPT(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)  # own table, not tied to the VQ codebook
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # row num_classes = null class (CFG)
        self.query_emb = nn.Parameter(torch.empty(cfg.group_size - 1, cfg.dim))  # inserted once after t_{c-1}
        self.emb_drop = nn.Dropout(cfg.token_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._tables: dict[str, tuple] = {}  # per device: (mask, cos, sin); kept out of state_dict/.to()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.normal_(self.query_emb, 0.0, 0.02)
        nn.init.zeros_(self.head.weight)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask N x N bool, cos, sin N x head_dim/2 fp32), built once per device."""
        key = str(device)
        if key not in self._tables:
            c = self.cfg
            mask = group_causal_mask(c.num_tokens, c.group_size, c.causal_num, device=device)
            cos, sin = rope_2d_tables(c.num_tokens, c.group_size, c.head_dim, c.rope_base, device=device)
            self._tables[key] = (mask, cos, sin)
        return self._tables[key]

    def drop_classes(self, class_ids_B: torch.Tensor) -> torch.Tensor:
        """Replace labels by the null class with probability class_dropout (train mode only)."""
        if not self.training or self.cfg.class_dropout <= 0:
            return class_ids_B
        drop = torch.rand(class_ids_B.shape, device=class_ids_B.device) < self.cfg.class_dropout
        return torch.where(drop, torch.full_like(class_ids_B, self.null_class), class_ids_B)

    def embed_range(self, codes_BT: torch.Tensor, class_ids_B: torch.Tensor, start: int, stop: int):
        """Input embeddings of sequence positions [start, stop) (layout in the module docstring).

        codes_BT holds t_0, t_1, ... and must contain every code those positions read.
        """
        c, g = self.cfg.causal_num, self.cfg.group_size
        pieces = []
        if start == 0:
            pieces.append(self.cls_emb(class_ids_B)[:, None])
        lo, hi = max(start, 1), min(stop, c + 1)  # positions 1..c read t_{q-1}
        if lo < hi:
            pieces.append(self.tok_emb(codes_BT[:, lo - 1:hi - 1]))
        lo, hi = max(start, c + 1), min(stop, c + g)  # the g-1 query embeddings
        if lo < hi:
            pieces.append(self.query_emb[lo - c - 1:hi - c - 1].expand(codes_BT.shape[0], -1, -1))
        lo = max(start, c + g)  # positions >= c+g read t_{q-g}
        if lo < stop:
            pieces.append(self.tok_emb(codes_BT[:, lo - g:stop - g]))
        return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]

    def run(self, x_BLD: torch.Tensor, start: int = 0, cache: KVCache | None = None,
            last: int | None = None) -> torch.Tensor:
        """Transformer over positions [start, start+L); logits (fp32) of the last `last` positions.

        Without a cache start must be 0 (the whole prefix is recomputed); with one, earlier positions'
        keys/values are read from it and this chunk's are written into it.
        """
        stop = start + x_BLD.shape[1]
        if stop > self.cfg.num_tokens:
            raise ValueError(f"positions up to {stop} exceed the sequence length {self.cfg.num_tokens}")
        if cache is None and start != 0:
            raise ValueError("without a KV cache the whole prefix must be run (start=0)")
        mask, cos, sin = self.tables(x_BLD.device)
        # Every row sees a prefix of the columns: if the first row already sees up to stop-1, all do.
        dense = visible_until(start, self.cfg.group_size, self.cfg.causal_num) >= stop - 1
        attn_mask = None if dense else mask[start:stop, :stop]
        cos, sin = cos[start:stop], sin[start:stop]
        x = self.emb_drop(x_BLD)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_mask, cache, i, start)
        if last is not None:
            x = x[:, -last:]
        return self.head(self.norm(x)).float()

    def new_cache(self, batch: int, device=None, dtype: torch.dtype | None = None) -> KVCache:
        c = self.cfg
        dtype = dtype or self.tok_emb.weight.dtype
        device = device or self.tok_emb.weight.device
        return KVCache(c.depth, batch, c.heads, c.num_tokens, c.head_dim, dtype, device)

    def forward(self, input_ids_BL: torch.Tensor, class_ids_B: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: input = the first N-g codes (longer inputs are cut); logits B x N x V."""
        n, g = self.cfg.num_tokens, self.cfg.group_size
        if input_ids_BL.dim() != 2 or input_ids_BL.shape[1] < n - g:
            raise ValueError(f"input_ids must be B x L with L >= N-g = {n - g}, "
                             f"got {tuple(input_ids_BL.shape)}")
        if class_ids_B.shape != input_ids_BL.shape[:1]:
            raise ValueError(f"class_ids {tuple(class_ids_B.shape)} does not match "
                             f"batch {input_ids_BL.shape[0]}")
        x = self.embed_range(input_ids_BL[:, :n - g], self.drop_classes(class_ids_B), 0, n)
        return self.run(x)

    def loss(self, codes_in_BN: torch.Tensor, codes_target_BN: torch.Tensor,
             class_ids_B: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all N positions and the batch (spec §2.4)."""
        logits = self.forward(codes_in_BN, class_ids_B)
        return F.cross_entropy(logits.flatten(0, 1), codes_target_BN.flatten().long())

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on >= 2-D parameters (matrices, embeddings), none on 1-D (norm gains)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]


def select_correction_pairs(clean: torch.Tensor, inp: torch.Tensor, target: torch.Tensor, prob: float = 0.3,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: (input, target) with probability `prob`, else (clean, clean) (spec §2.3).

    Triplets are B x N, or B x V x N (then one of the V views is picked uniformly per sample).
    Returns (codes_in_BN, codes_target_BN) for DetailFlowGPT.loss.
    """
    if not (clean.shape == inp.shape == target.shape) or clean.dim() not in (2, 3):
        raise ValueError(f"triplets must share a B x N or B x V x N shape: {clean.shape}, {inp.shape}, "
                         f"{target.shape}")
    device = clean.device
    gen_device = generator.device if generator is not None else device
    batch = clean.shape[0]
    if clean.dim() == 3:
        view = torch.randint(clean.shape[1], (batch,), generator=generator, device=gen_device).to(device)
        rows = torch.arange(batch, device=device)
        clean, inp, target = clean[rows, view], inp[rows, view], target[rows, view]
    use = (torch.rand(batch, generator=generator, device=gen_device) < prob).to(device)[:, None]
    return torch.where(use, inp, clean), torch.where(use, target, clean)
