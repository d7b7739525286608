"""Generation engine == sampling each request alone (sampler.sample, same seed): single requests, mixed
batches (class, CFG, temperature, top-k, top-p, token budget), requests joining mid-flight, the per-row
sampler, and bf16 with fixed shapes (divergences only at counted near-ties)."""

import copy

import numpy as np
import pytest
import torch
from ar_models import make_model

from detailflow.models.engine import GenerationEngine, Request
from detailflow.models.engine_plan import build_eager_plan
from detailflow.models.engine_sampling import draw_rows
from detailflow.models.sampler import decode_plan, draw, draw_uniforms, guide, sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GEOMETRIES = [(16, 4, 4), (32, 8, 8), (24, 4, 8)]  # (N, g, causal_num)
MODES = ["eager", "static"]


def alone(model, r: Request, device="cpu") -> torch.Tensor:
    """The independent reference: the request sampled by itself with the existing sampler (CPU codes;
    the generator on `device`, as the engine's generator_device)."""
    t = r.tokens or model.cfg.num_tokens
    return sample(model, torch.tensor([r.class_id], device=device), cfg_scale=r.cfg_scale,
                  temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                  generator=torch.Generator(device).manual_seed(r.seed))[0, :t].cpu()


def mixed_requests(n_req: int, num_tokens: int, seed0: int = 0) -> list[Request]:
    scales, temps, ks = [1.0, 1.5, 3.0], [1.0, 0.7, 0.0, 1.3, 1.0], [0, 10, 0, 3]
    ps, budgets = [1.0, 1.0, 0.8, 0.9, 0.5], [0, 5, num_tokens // 2 + 3, 1, num_tokens, 2]
    return [Request(i % 7, cfg_scale=scales[i % 3], temperature=temps[i % 5], top_k=ks[i % 4],
                    top_p=ps[i % 5], seed=seed0 + i, tokens=budgets[i % 6])
            for i in range(n_req)]  # class 6 = the null class


@pytest.mark.parametrize("n,g,c", GEOMETRIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_single_request_equals_sample_alone(n, g, c, mode, cfg_scale):
    model = make_model(n, g, c)
    engine = GenerationEngine(model, slots=3, mode=mode)
    for seed in range(2):
        r = Request(seed + 1, cfg_scale=cfg_scale, seed=seed)
        h = engine.submit(r)
        engine.run_until_idle()
        assert torch.equal(h.result(), alone(model, r)), f"seed {seed}"
        assert h.passes_done == c + (n - c) // g
    assert engine.passes == 2 * (c + (n - c) // g)  # one forward pass per step


@pytest.mark.parametrize("n,g,c", GEOMETRIES)
@pytest.mark.parametrize("mode", MODES)
def test_mixed_batch_equals_sample_alone(n, g, c, mode):
    model = make_model(n, g, c)
    reqs = mixed_requests(12, n)
    engine = GenerationEngine(model, slots=24, mode=mode)  # room for all of them at once
    handles = [engine.submit(r) for r in reqs]
    engine.run_until_idle()
    for r, h in zip(reqs, handles, strict=True):
        assert torch.equal(h.result(), alone(model, r)), r
        assert h.result().shape == (r.tokens or n,)
    full = c + (n - c) // g
    assert engine.passes == full  # they all shared the same passes
    assert max(h.passes_done for h in handles) == full and min(h.passes_done for h in handles) == 1


@pytest.mark.parametrize("mode", MODES)
def test_requests_join_mid_flight(mode):
    """New requests join at the next pass and run next to older ones at other positions; slots freed by
    finished requests are reused. Codes still equal sampling alone."""
    n, g, c = 32, 8, 8  # 11 passes: 8 one-token passes, then 3 group passes
    model = make_model(n, g, c)
    seen = {}  # request id -> list of (engine pass, t)
    record = lambda rid, prefix, t: seen.setdefault(rid, []).append((engine.passes, t))
    engine = GenerationEngine(model, slots=5, mode=mode, on_pass=record)
    reqs = mixed_requests(9, n, seed0=40)
    handles, done = [], []
    for i, r in enumerate(reqs):
        handles.append(engine.submit(r))
        for _ in range(i % 3):  # 0-2 passes between arrivals
            done += engine.step()
    done += engine.run_until_idle()
    assert sorted(h.id for h in done) == list(range(9))
    for r, h in zip(reqs, handles, strict=True):
        assert torch.equal(h.result(), alone(model, r)), r
        ts = [t for _, t in seen[h.id]]
        plan_t = [min(e, h.tokens) for _, e in decode_plan(n, g, c)][:h.passes_needed]
        assert ts == plan_t  # one pass per step, in decode-plan order, capped at its budget
        passes = [p for p, _ in seen[h.id]]
        assert passes == list(range(passes[0], passes[0] + len(passes)))  # no pass skipped
    # some pass ran a causal-phase request (t < c) next to a group-phase one (t > c)
    by_pass = {}
    for rows in seen.values():
        for p, t in rows:
            by_pass.setdefault(p, []).append(t)
    assert any(min(ts) <= c and max(ts) > c + g for ts in by_pass.values())
    assert engine.passes < sum(h.passes_done for h in handles)
    assert engine.free_slots == 5 and engine.idle


def test_eager_plan_runs_cover_every_token_once():
    """Mid-flight, with guided and unguided requests at many positions: the eager plan's runs are
    physically consecutive, homogeneous rows whose tokens tile T in row order, and several kinds of run
    (masked / uniform start, guided / unguided, widths 1 and g) occur; the codes stay equal (above)."""
    n, g, c = 32, 8, 8
    model = make_model(n, g, c)
    engine = GenerationEngine(model, slots=16)
    kinds = set()
    reqs = [Request(i % 6, cfg_scale=1.0 if i % 4 == 0 else 1.5, seed=70 + i) for i in range(12)]
    for r in reqs:
        engine.submit(r)
        with engine._lock:
            engine._admit()
        if engine.active:
            plan = build_eager_plan(engine.rows, engine.plan_start_P, engine.plan_len_P, model.cfg.vocab_size)
            rows_T, tok = plan.arrays["rows_T"], 0
            assert list(rows_T) == sorted(rows_T)  # physical order
            for run in plan.runs:
                assert run.tok0 == tok
                rows = range(run.row0, run.row0 + run.rows)
                assert all(plan.len_R[r] == run.width for r in rows)
                assert all((engine.rows.scale_R[r] > 1) == run.guided for r in rows)
                assert run.keys == max(plan.stop_R[r] for r in rows)
                assert list(rows_T[tok:tok + run.rows * run.width]) == np.repeat(rows, run.width).tolist()
                tok += run.rows * run.width
                kinds.add((run.guided, run.width, run.start >= 0))
            assert tok == len(rows_T) and len(plan.runs) >= 1
        engine.step()
    done = engine.run_until_idle()
    assert all(torch.equal(h.result(), alone(model, h.request)) for h in done)
    assert {(True, 1), (False, 1), (True, g), (False, g)} <= {k[:2] for k in kinds}
    assert {True, False} <= {k[2] for k in kinds if k[1] == g}  # masked and unmasked group runs


def test_draw_rows_matches_sampler_draw_per_row():
    """The per-row sampler against sampler.draw run on each row by itself with its own settings."""
    gen = torch.Generator().manual_seed(0)
    settings = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 12, 0.9), (0.0, 3, 0.5), (2.0, 64, 1.0),
                (1.0, 1, 1.0), (0.5, 0, 0.05)]
    q = len(settings) * 5
    logits = torch.randn(q, 64, generator=gen) * 3
    u = torch.rand(q, 64, generator=gen)
    temp = torch.tensor([s[0] for s in settings] * 5)
    top_k = torch.tensor([s[1] for s in settings] * 5)
    top_p = torch.tensor([s[2] for s in settings] * 5)
    expected = torch.cat([draw(logits[i:i + 1, None], u[i:i + 1, None], temp[i].item(), top_k[i].item(),
                               top_p[i].item())[:, 0] for i in range(q)])
    need = torch.tensor([(0 < k < 64) or p < 1 for k, p in zip(top_k.tolist(), top_p.tolist(), strict=True)])
    assert torch.equal(draw_rows(logits, u, temp, top_k, top_p, "all"), expected)
    assert torch.equal(draw_rows(logits, u, temp, top_k, top_p, need.nonzero()[:, 0]), expected)
    plain = temp.clone().fill_(1.0)
    assert torch.equal(draw_rows(logits, u, plain, top_k * 0, top_p * 0 + 1, None),
                       draw(logits[:, None], u[:, None])[:, 0])


def guided_tf_logits(model, codes_1N, r: Request) -> torch.Tensor:
    """Teacher-forcing logits (fp32 out) of one request's codes, guided like sampler.sample does."""
    cls = torch.tensor([r.class_id], device=codes_1N.device)
    with torch.no_grad():
        logits = model(codes_1N, cls).float()
        if r.cfg_scale > 1:
            uncond = model(codes_1N, torch.full_like(cls, model.null_class)).float()
            logits = guide(torch.cat([logits, uncond]), r.cfg_scale)
    return logits[0]


def first_divergence(model, model32, r: Request, ref: torch.Tensor, got: torch.Tensor, device="cpu"):
    """None if equal; else (gap, noise) at the first position where they differ: gap = |difference of
    the two tokens' perturbed scores| in fp32 (teacher forcing on the common prefix, the request's own
    uniforms); noise = the low-precision model's own logit error there, max over the vocabulary of
    |model - fp32 copy| / T. A flip is float noise when gap <= 2 * noise (each path errs by ~noise)."""
    diff = (ref != got).nonzero()
    if not len(diff):
        return None
    pos, cfg = int(diff[0]), model32.cfg
    codes = torch.zeros(1, cfg.num_tokens, dtype=torch.long, device=device)
    codes[0, :ref.shape[0]] = ref.to(device)
    logits32, logits_low = guided_tf_logits(model32, codes, r)[pos], guided_tf_logits(model, codes, r)[pos]
    temp = r.temperature or 1.0
    noise = float((logits_low - logits32).abs().max()) / temp
    gen = torch.Generator(device).manual_seed(r.seed)
    for start, stop in decode_plan(cfg.num_tokens, cfg.group_size, cfg.causal_num):
        u = draw_uniforms(1, stop - start, cfg.vocab_size, gen, device)
        if start <= pos < stop:
            scores = logits32 / temp - u[0, pos - start].log().neg().log()
            return abs(float(scores[ref[pos]] - scores[got[pos]])), noise
    raise AssertionError("position outside the plan")


def test_bf16_static_shapes_diverge_only_at_near_ties():
    """bf16 with padded fixed shapes computes the logits with other matmul shapes than sampling alone,
    so a token may differ where two perturbed scores are within bf16 noise (then the rest of that
    sequence differs too). Count those sequences; every first divergence must be such a near-tie."""
    model = make_model(32, 8, 8, dim=64, heads=4).to(torch.bfloat16)
    model32 = copy.deepcopy(model).float()
    reqs = [Request(i % 6, cfg_scale=[1.0, 1.5, 3.0][i % 3], seed=i) for i in range(12)]
    results = {}
    for mode in MODES:
        engine = GenerationEngine(model, slots=24, mode=mode)
        handles = [engine.submit(r) for r in reqs]
        engine.run_until_idle()
        found = [first_divergence(model, model32, r, alone(model, r), h.result())
                 for r, h in zip(reqs, handles, strict=True)]
        results[mode] = [f for f in found if f is not None]
    for mode, found in results.items():
        assert len(found) <= len(reqs) // 3, f"{mode}: {len(found)}/{len(reqs)} sequences diverged"
        assert all(gap <= 2 * noise for gap, noise in found), f"{mode}: not a near-tie (gap, noise) {found}"
