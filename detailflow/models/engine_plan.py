"""Per-pass plans of the generation engine: which cache rows run which positions (used by engine.py).

Usage:
    rows = RowState.empty(slots)                                    # the engine fills it at admission
    plan = build_eager_plan(rows, plan_start_P, plan_len_P, vocab)  # CPU default: packed, in runs
    plan = build_static_plan(rows, plan_start_P, plan_len_P, vocab, num_tokens, group_size, bucket=B)

Row r of the pool runs the chunk [start_r, start_r + len_r) of the decode plan (len 1 in the causal
phase, g after). Every query of a chunk sees exactly the key columns [0, stop_r), stop_r = start_r +
len_r (causal_num is a multiple of g: a group chunk is one attention block, a causal chunk one token).
A guided request owns an aligned pair of rows (2k: conditional, 2k+1: null class).

Eager plan: the real tokens only, in physical row order, cut into runs: physically consecutive rows of
one chunk length, all guided pairs or all single rows, and close key lengths. A run is one attention
call on a view of the cache (no copies), its queries a view of the packed tokens, its CFG two strided
views of its logits (cond/null interleave by pair). Static plan (bucket B): rows [0, B) x g tokens
each, padding tokens marked (their keys/values go to the scratch column N), every token sampled, so
a bucket's passes all have the same shapes (CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_KEY_SPREAD = 24  # eager: a run is cut where its rows' key lengths would differ by more (wasted keys)


@dataclass
class RowState:
    """Per cache row (S rows) settings of the request occupying it, as numpy arrays (CPU)."""
    pass_R: np.ndarray  # int64: index of the row's next pass in the decode plan; -1 = free row
    twin_R: np.ndarray  # int64: the other row of a guided request (cond <-> null class); itself otherwise
    primary_R: np.ndarray  # bool: the row whose tokens are sampled (the conditional one; free rows True)
    scale_R: np.ndarray  # float32: CFG scale of the request (1 = no guidance)
    temperature_R: np.ndarray  # float32: sampling temperature (0 = greedy)
    top_k_R: np.ndarray  # int64: top-k (0 = no truncation)
    top_p_R: np.ndarray  # float32: nucleus mass (1 = no truncation)

    @classmethod
    def empty(cls, slots: int) -> RowState:
        return cls(np.full(slots, -1, np.int64), np.arange(slots, dtype=np.int64), np.ones(slots, bool),
                   np.ones(slots, np.float32), np.ones(slots, np.float32), np.zeros(slots, np.int64),
                   np.ones(slots, np.float32))

    def free(self, row: int) -> None:
        self.pass_R[row], self.twin_R[row], self.primary_R[row] = -1, row, True
        self.scale_R[row] = self.temperature_R[row] = self.top_p_R[row] = 1.0
        self.top_k_R[row] = 0


@dataclass
class Run:
    """Physically consecutive rows [row0, row0 + rows) that share one attention call (eager plan)."""
    row0: int  # first cache row
    rows: int  # number of rows (2 per guided request)
    width: int  # tokens per row (its chunk length)
    keys: int  # key columns read: the longest stop of its rows
    start: int  # the rows' common chunk start, or -1 when they differ (then a key mask is needed)
    guided: bool  # rows are (conditional, null-class) pairs
    tok0: int  # index of its first token in T
    q0: int  # index of its first sampled token in Q


@dataclass
class PassPlan:
    """One pass: index arrays (numpy; the runners turn them into tensors) and the pass's layout."""
    arrays: dict  # field name -> numpy array: per token (_T), per sampled token (_Q) or per row (_R)
    rows: int  # R: cache rows [0, R) the pass may touch
    n_sampled: int  # Q: sampled tokens (static: all T)
    runs: list[Run] | None  # eager: the attention calls; static: None (one padded call over [0, R))
    filter: np.ndarray | str | None  # Q indices that truncate (eager), "all" (static, some do) or None
    greedy: bool  # some sampled token has temperature 0 (else the argmax branch is skipped)
    tempered: bool  # some sampled token has a temperature other than 1 (else no division)
    q_offset_R: np.ndarray  # int64: index in Q of each row's first sampled token
    len_R: np.ndarray  # int64: real tokens each row runs this pass (0 = free row)
    stop_R: np.ndarray  # int64: prefix length of each row after the pass (0 for free rows)


def _chunks(rows: RowState, plan_start_P, plan_len_P, n_rows: int):
    p_R = rows.pass_R[:n_rows]
    act_R = p_R >= 0
    start_R = np.where(act_R, plan_start_P[p_R.clip(0)], 0)
    len_R = np.where(act_R, plan_len_P[p_R.clip(0)], 0)
    return act_R, start_R, len_R, start_R + len_R


def _sampling(arrays: dict, rows: RowState, row_Q: np.ndarray, vocab: int) -> np.ndarray:
    """Per sampled token settings into arrays; returns which tokens truncate (top-k / top-p)."""
    arrays.update(scale_Q=rows.scale_R[row_Q], temperature_Q=rows.temperature_R[row_Q],
                  top_k_Q=rows.top_k_R[row_Q], top_p_Q=rows.top_p_R[row_Q])
    return ((arrays["top_k_Q"] > 0) & (arrays["top_k_Q"] < vocab)) | (arrays["top_p_Q"] < 1.0)


def build_eager_plan(rows: RowState, plan_start_P: np.ndarray, plan_len_P: np.ndarray,
                     vocab: int) -> PassPlan:
    """Real tokens of every active row in physical order, cut into runs (module docstring)."""
    act = np.flatnonzero(rows.pass_R >= 0)
    n_rows = int(act[-1]) + 1
    act_R, start_R, len_R, stop_R = _chunks(rows, plan_start_P, plan_len_P, n_rows)
    prim = act[rows.primary_R[act]]  # one unit per request, in physical order
    guided_U = rows.scale_R[prim] > 1.0
    n_U = 1 + guided_U
    w_U, stop_U = len_R[prim], stop_R[prim]
    runs, q_U = [], np.cumsum(w_U) - w_U
    tok_U = np.cumsum(w_U * n_U) - w_U * n_U
    if (rows.twin_R[prim[guided_U]] != prim[guided_U] + 1).any():
        raise AssertionError("a guided request must own an aligned pair of rows")
    first, lo, hi = 0, int(stop_U[0]), int(stop_U[0])
    for u in range(1, len(prim) + 1):
        if u < len(prim):
            s = int(stop_U[u])
            if prim[u] == prim[u - 1] + n_U[u - 1] and guided_U[u] == guided_U[first] \
                    and w_U[u] == w_U[first] and max(hi, s) - min(lo, s) <= MAX_KEY_SPREAD:
                lo, hi = min(lo, s), max(hi, s)
                continue
        seg = slice(first, u)
        starts = start_R[prim[seg]]
        runs.append(Run(int(prim[first]), int(n_U[seg].sum()), int(w_U[first]), int(stop_U[seg].max()),
                        int(starts[0]) if (starts == starts[0]).all() else -1, bool(guided_U[first]),
                        int(tok_U[first]), int(q_U[first])))
        if u < len(prim):
            first, lo, hi = u, int(stop_U[u]), int(stop_U[u])
    rows_T = np.repeat(act, len_R[act])
    n_tok = rows_T.shape[0]
    slot_T = np.arange(n_tok) - np.repeat(np.cumsum(len_R[act]) - len_R[act], len_R[act])
    pos_T = start_R[rows_T] + slot_T
    q_offset_R = np.zeros(n_rows, np.int64)
    q_offset_R[prim] = q_U
    q_offset_R[rows.twin_R[prim]] = q_U  # a null-class row copies its twin's codes
    arrays = dict(rows_T=rows_T, pos_T=pos_T, write_T=pos_T, src_T=q_offset_R[rows_T] + slot_T,
                  stop_R=stop_R, scale_U=rows.scale_R[prim[guided_U]])
    row_Q = np.repeat(prim, w_U)
    need_Q = _sampling(arrays, rows, row_Q, vocab)
    temp_Q = arrays["temperature_Q"]
    filt = np.flatnonzero(need_Q) if need_Q.any() else None
    tempered = bool(((temp_Q != 1.0) & (temp_Q > 0)).any())
    return PassPlan(arrays, n_rows, int(w_U.sum()), runs, filt, bool((temp_Q <= 0).any()), tempered,
                    q_offset_R, len_R, np.where(act_R, stop_R, 0))


def build_static_plan(rows: RowState, plan_start_P: np.ndarray, plan_len_P: np.ndarray, vocab: int,
                      num_tokens: int, group_size: int, bucket: int) -> PassPlan:
    """Rows [0, bucket) x g tokens, padding marked, every token sampled (fixed shapes)."""
    act_R, start_R, len_R, stop_R = _chunks(rows, plan_start_P, plan_len_P, bucket)
    stop_R = np.where(act_R, stop_R, 1)  # free rows see column 0 (finite, never used)
    rows_T = np.repeat(np.arange(bucket), group_size)
    tok = np.arange(rows_T.shape[0])
    slot_T = tok % group_size
    valid_T = slot_T < len_R[rows_T]
    pos_T = np.where(valid_T, start_R[rows_T] + slot_T, 0)
    twin_tok_T = rows.twin_R[:bucket][rows_T] * group_size + slot_T  # the twin row's token, same slot
    stop_pad = np.zeros(rows_T.shape[0], np.int64)  # packed with the per-token fields
    stop_pad[:bucket] = stop_R
    arrays = dict(rows_T=rows_T, slot_T=slot_T, pos_T=pos_T, write_T=np.where(valid_T, pos_T, num_tokens),
                  pick_Q=tok, partner_Q=twin_tok_T, stop_R=stop_pad,
                  src_T=np.where(rows.primary_R[:bucket][rows_T], tok, twin_tok_T))
    need_Q = _sampling(arrays, rows, rows_T, vocab)
    return PassPlan(arrays, bucket, rows_T.shape[0], None, "all" if (need_Q & valid_T).any() else None,
                    True, True, np.arange(bucket) * group_size, len_R, np.where(act_R, stop_R, 0))
