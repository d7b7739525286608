"""One forward pass of the generation engine over rows at different positions (used by engine.py).

Usage (engine.py does this every step):
    runner = EagerRunner(model, slots, device)  # or StaticRunner(model, slots, device, capture=True)
    plan = build_eager_plan(...)                # engine_plan.py (static runners: build_static_plan)
    uniforms_QV = runner.uniforms(plan)         # the engine fills each request's rows from its generator
    runner.run(plan, uniforms_QV)               # forward + CFG + sampling; new codes in runner.codes_SN

The linear layers always run on the packed T x D tokens. Attention: in eager mode one SDPA call per run
(engine_plan.Run: a view of the cache rows, the run's queries a view of the packed tokens, a key mask
only when its rows' stops differ); in static mode one call over all rows [0, R) x g queries with the
per-row key mask. Keys/values of a token go to cache column pos (padding: scratch column N, masked).
The cache (EngineCache) is token-major, S x (N+1) x H x head_dim per layer, so a pass writes all its
keys with one index_copy_ of whole H*head_dim rows; attention reads transposed views. It starts zeroed
so that masked keys are finite (a NaN key would poison even a masked score).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from detailflow.models.ar import DetailFlowGPT
from detailflow.models.engine_plan import PassPlan
from detailflow.models.engine_sampling import draw_rows, guide_rows, guide_runs
from detailflow.models.rope import apply_rope

INT_FIELDS = ("rows_T", "slot_T", "pos_T", "write_T", "pick_Q", "partner_Q", "src_T", "top_k_Q", "stop_R")
FLOAT_FIELDS = ("scale_Q", "temperature_Q", "top_p_Q")


class EngineCache:
    """Per layer keys (rotated) and values of every pool row: S x (N+1) x H x head_dim, zero-initialised;
    column N is the scratch column of padding tokens. k_flat/v_flat: the same memory as (S*(N+1)) x D."""

    def __init__(self, model: DetailFlowGPT, slots: int, device):
        c = model.cfg
        shape = (slots, c.num_tokens + 1, c.heads, c.head_dim)
        dtype = model.tok_emb.weight.dtype
        self.columns = c.num_tokens + 1  # cache columns per row
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.depth)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.depth)]
        self.k_flat = [k.view(-1, c.dim) for k in self.k]
        self.v_flat = [v.view(-1, c.dim) for v in self.v]


def embed_tokens(model: DetailFlowGPT, codes_SN: torch.Tensor, classes_S: torch.Tensor, rows_T: torch.Tensor,
                 pos_T: torch.Tensor) -> torch.Tensor:
    """Input embedding of each token from its row's codes (layout of DetailFlowGPT.embed_range). T x D."""
    c, g = model.cfg.causal_num, model.cfg.group_size
    src_T = torch.where(pos_T <= c, pos_T - 1, pos_T - g).clamp_(min=0)
    x_TD = model.tok_emb(codes_SN[rows_T, src_T])
    x_TD = torch.where((pos_T == 0)[:, None], model.cls_emb(classes_S[rows_T]), x_TD)
    if g > 1:
        is_query_T = (pos_T > c) & (pos_T < c + g)
        x_TD = torch.where(is_query_T[:, None], model.query_emb[(pos_T - c - 1).clamp(0, g - 2)], x_TD)
    return x_TD


def transformer(model: DetailFlowGPT, cache: EngineCache, x_TD: torch.Tensor, pos_T: torch.Tensor,
                flat_T: torch.Tensor, attend) -> torch.Tensor:
    """The blocks over packed tokens; logits (fp32) T x V. Keys/values go to flat cache rows flat_T;
    attend(k_cache, v_cache, q_THd) -> T x H x head_dim is the layout-specific attention."""
    _, cos_NP, sin_NP = model.tables(x_TD.device)
    cos_T1P, sin_T1P = cos_NP[pos_T][:, None], sin_NP[pos_T][:, None]
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        q_THd, k_THd, v_THd = rearrange(attn.wqkv(block.attn_norm(x_TD)), "t (three h d) -> three t h d",
                                        three=3, h=model.cfg.heads)
        q_THd, k_THd = apply_rope(q_THd, cos_T1P, sin_T1P), apply_rope(k_THd, cos_T1P, sin_T1P)
        cache.k_flat[layer].index_copy_(0, flat_T, k_THd.flatten(1))
        cache.v_flat[layer].index_copy_(0, flat_T, v_THd.flatten(1))
        out_THd = attend(cache.k[layer], cache.v[layer], q_THd)
        x_TD = x_TD + attn.drop(attn.wo(out_THd.flatten(1)))
        x_TD = x_TD + block.ffn(block.ffn_norm(x_TD))
    return model.head(model.norm(x_TD)).float()


def forward_tokens(model: DetailFlowGPT, cache: EngineCache, codes_SN, classes_S, t: dict, rows: int,
                   width: int, keys: int) -> torch.Tensor:
    """Static layout: queries scattered into rows [0, rows) x width, one masked attention call."""
    rows_T, slot_T = t["rows_T"], t["slot_T"]
    mask_R11K = (torch.arange(keys, device=codes_SN.device)[None] < t["stop_R"][:rows, None])[:, None, None]

    def attend(k_cache, v_cache, q_THd):
        q_RWHd = q_THd.new_zeros(rows, width, *q_THd.shape[1:])
        q_RWHd[rows_T, slot_T] = q_THd
        keys_RHKd, values_RHKd = k_cache[:rows, :keys].transpose(1, 2), v_cache[:rows, :keys].transpose(1, 2)
        out_RHWd = F.scaled_dot_product_attention(q_RWHd.transpose(1, 2), keys_RHKd, values_RHKd,
                                                  attn_mask=mask_R11K)
        return out_RHWd.transpose(1, 2)[rows_T, slot_T]

    x_TD = embed_tokens(model, codes_SN, classes_S, rows_T, t["pos_T"])
    return transformer(model, cache, x_TD, t["pos_T"], rows_T * cache.columns + t["write_T"], attend)


def embed_eager(model: DetailFlowGPT, codes_SN, classes_S, t: dict, cls_idx, query_idx, query_sel):
    """embed_tokens for the eager plan: one code lookup, then the few class / query tokens patched."""
    x_TD = model.tok_emb(codes_SN[t["rows_T"], t["code_T"]])
    if cls_idx is not None:
        x_TD[cls_idx] = model.cls_emb(classes_S[t["rows_T"][cls_idx]])
    if query_idx is not None:
        x_TD[query_idx] = model.query_emb[query_sel].to(x_TD.dtype)
    return x_TD


def forward_runs(model: DetailFlowGPT, cache: EngineCache, x_TD: torch.Tensor, t: dict, plan: PassPlan,
                 masks: list) -> torch.Tensor:
    """Eager layout: one attention call per run, on views of the cache and of the packed queries."""
    def attend(k_cache, v_cache, q_THd):
        out_THd = None if len(plan.runs) == 1 else torch.empty_like(q_THd)
        for run, mask in zip(plan.runs, masks, strict=True):
            t0, t1 = run.tok0, run.tok0 + run.rows * run.width
            rows = slice(run.row0, run.row0 + run.rows)
            q_RHWd = q_THd[t0:t1].unflatten(0, (run.rows, run.width)).transpose(1, 2)
            o_THd = F.scaled_dot_product_attention(q_RHWd, k_cache[rows, :run.keys].transpose(1, 2),
                                                   v_cache[rows, :run.keys].transpose(1, 2),
                                                   attn_mask=mask).transpose(1, 2).flatten(0, 1)
            if out_THd is None:
                return o_THd
            out_THd[t0:t1] = o_THd
        return out_THd

    return transformer(model, cache, x_TD, t["pos_T"], t["flat_T"], attend)


def run_eager(model: DetailFlowGPT, cache: EngineCache, codes_SN, classes_S, t: dict, uniforms_QV,
              plan: PassPlan, embed_args: tuple, masks: list, filt) -> torch.Tensor:
    """forward_runs + CFG per run + per-row draw; writes every row's new codes."""
    x_TD = embed_eager(model, codes_SN, classes_S, t, *embed_args)
    logits_TV = forward_runs(model, cache, x_TD, t, plan, masks)
    logits_QV = guide_runs(logits_TV, plan.runs, plan.n_sampled, t["scale_U"])
    new_Q = draw_rows(logits_QV, uniforms_QV, t["temperature_Q"], t["top_k_Q"], t["top_p_Q"], filt,
                      greedy=plan.greedy, tempered=plan.tempered, consume_uniforms=True)
    codes_SN[t["rows_T"], t["write_T"]] = new_Q[t["src_T"]]
    return new_Q


def run_pass(model: DetailFlowGPT, cache: EngineCache, codes_SN, classes_S, t: dict, uniforms_QV, rows: int,
             width: int, keys: int, filt) -> torch.Tensor:
    """Static pass: forward_tokens + CFG + per-row draw over fixed shapes; writes the new codes."""
    logits_TV = forward_tokens(model, cache, codes_SN, classes_S, t, rows, width, keys)
    logits_QV = guide_rows(logits_TV, t["pick_Q"], t["partner_Q"], t["scale_Q"])
    new_Q = draw_rows(logits_QV, uniforms_QV, t["temperature_Q"], t["top_k_Q"], t["top_p_Q"], filt)
    codes_SN[t["rows_T"], t["write_T"]] = new_Q[t["src_T"]]
    return new_Q


class EagerRunner:
    """Packed tokens of the active rows only; shapes change from pass to pass (CPU default)."""

    def __init__(self, model: DetailFlowGPT, slots: int, device):
        c = model.cfg
        self.model, self.device = model, torch.device(device)
        self.cache = EngineCache(model, slots, self.device)
        self.codes_SN = torch.zeros(slots, c.num_tokens + 1, dtype=torch.long, device=self.device)
        self.classes_S = torch.zeros(slots, dtype=torch.long, device=self.device)

    def uniforms(self, plan: PassPlan) -> torch.Tensor:
        return torch.empty(plan.n_sampled, self.model.cfg.vocab_size, device=self.device)

    def run(self, plan: PassPlan, uniforms_QV: torch.Tensor) -> torch.Tensor:
        c, dev = self.model.cfg, self.device
        arr = dict(plan.arrays)
        pos_T = arr["pos_T"]
        arr["code_T"] = np.where(pos_T <= c.causal_num, pos_T - 1, pos_T - c.group_size).clip(0)
        arr["flat_T"] = arr["rows_T"] * self.cache.columns + arr["write_T"]
        t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in arr.items()}
        cls_idx = np.flatnonzero(pos_T == 0)
        query = np.flatnonzero((pos_T > c.causal_num) & (pos_T < c.causal_num + c.group_size))
        as_t = lambda a: torch.from_numpy(a).to(dev) if len(a) else None
        embed_args = (as_t(cls_idx), as_t(query), as_t(pos_T[query] - c.causal_num - 1))
        stop_R = plan.arrays["stop_R"]
        masks = [None if run.start >= 0 else as_t(np.arange(run.keys)[None] < stop_R[
            run.row0:run.row0 + run.rows, None])[:, None, None] for run in plan.runs]
        filt = None if plan.filter is None else torch.from_numpy(plan.filter).to(dev)
        return run_eager(self.model, self.cache, self.codes_SN, self.classes_S, t, uniforms_QV, plan,
                         embed_args, masks, filt)


class StaticRunner(EagerRunner):
    """Fixed shapes per bucket of rows (1, 2, 4, ..., slots); capture=True records one CUDA graph per
    (bucket, filter on/off) and replays it; compile=True also torch.compiles the pass first (CUDA)."""

    def __init__(self, model: DetailFlowGPT, slots: int, device, capture: bool = False,
                 compile_pass: bool = False):
        super().__init__(model, slots, device)
        if capture and self.device.type != "cuda":
            raise ValueError("CUDA graph capture needs a CUDA device")
        self.capture, self.slots = capture, slots
        self.buckets = sorted({min(1 << i, slots) for i in range(slots.bit_length() + 1)})
        self.fn = torch.compile(run_pass, dynamic=False) if compile_pass else run_pass
        self.graphs: dict = {}  # (bucket, filter) -> (graph|None, ints, floats, uniforms, out, stage, call)
        self.copied: dict = {}  # (bucket, filter) -> CUDA event after the last copy out of that stage
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def warmup(self, filters: tuple[bool, ...] = (False, True)) -> None:
        """Build (and capture) every bucket's pass now instead of at its first use."""
        for b in self.buckets:
            for filt in filters:
                self._entry(b, filt)

    def bucket(self, rows_needed: int) -> int:
        return next(b for b in self.buckets if b >= rows_needed)

    def _entry(self, bucket: int, filt: bool):
        key = (bucket, filt)
        if key not in self.graphs:
            c, n_tok = self.model.cfg, bucket * self.model.cfg.group_size
            pin = self.device.type == "cuda"
            ints = torch.zeros(len(INT_FIELDS), n_tok, dtype=torch.long, device=self.device)
            floats = torch.ones(len(FLOAT_FIELDS), n_tok, device=self.device)
            stage = (torch.zeros(ints.shape, dtype=torch.long, pin_memory=pin),
                     torch.zeros(floats.shape, pin_memory=pin))
            uniforms = torch.full((n_tok, c.vocab_size), 0.5, device=self.device)
            ints[INT_FIELDS.index("write_T")] = c.num_tokens  # idle plan: all writes to the scratch column
            ints[INT_FIELDS.index("stop_R")] = 1
            ints[INT_FIELDS.index("pick_Q")] = ints[INT_FIELDS.index("src_T")] = torch.arange(n_tok)
            ints[INT_FIELDS.index("partner_Q")] = torch.arange(n_tok)
            t = self._views(ints, floats)
            call = lambda: self.fn(self.model, self.cache, self.codes_SN, self.classes_S, t, uniforms, bucket,
                                   c.group_size, c.num_tokens + 1, "all" if filt else None)
            graph, out = None, None
            if self.capture:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):  # warm-up (and compilation) outside the graph, idle plan
                        call()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = call()
            self.graphs[key] = (graph, ints, floats, uniforms, out, stage, call)
        return self.graphs[key]

    @staticmethod
    def _views(ints: torch.Tensor, floats: torch.Tensor) -> dict:
        views = {k: ints[i] for i, k in enumerate(INT_FIELDS)}
        return {**views, **{k: floats[i] for i, k in enumerate(FLOAT_FIELDS)}}

    def uniforms(self, plan: PassPlan) -> torch.Tensor:
        return self._entry(plan.rows, plan.filter is not None)[3]

    def run(self, plan: PassPlan, uniforms_QV: torch.Tensor) -> torch.Tensor:
        key = (plan.rows, plan.filter is not None)
        graph, ints, floats, _, out, (stage_i, stage_f), call = self._entry(*key)
        if key in self.copied:  # the stage may be rewritten once its last copy is done (the pass before
            self.copied[key].synchronize()  # the previous one): the GPU still runs ahead by one pass
        for i, k in enumerate(INT_FIELDS):
            stage_i[i].numpy()[:] = plan.arrays[k]
        for i, k in enumerate(FLOAT_FIELDS):
            stage_f[i].numpy()[:] = plan.arrays[k]
        ints.copy_(stage_i, non_blocking=True)
        floats.copy_(stage_f, non_blocking=True)
        if self.device.type == "cuda":
            self.copied.setdefault(key, torch.cuda.Event()).record()
        if graph is None:
            return call()
        graph.replay()
        return out  # lives in the graphs' shared pool: valid until another bucket's replay (unused)
