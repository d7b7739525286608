"""Generation engine API: slots and cancellation, token budgets, per-pass hooks (previews), asyncio
waiting with the background driver, failures, argument checks. Codes are checked against sampling
each request alone with sampler.sample (an independent path)."""

import asyncio
import threading

import pytest
import torch
from test_engine import alone, make_model

from detailflow.models.engine import CANCELLED, DONE, FAILED, GenerationEngine, Request, RequestCancelled
from detailflow.models.sampler import sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cancel_frees_slots_at_once_and_the_next_request_takes_them():
    model = make_model()  # N=16, g=4: 7 passes
    engine = GenerationEngine(model, slots=2)
    a = engine.submit(Request(1, cfg_scale=2.0, seed=1))  # guided: both slots
    b = engine.submit(Request(2, cfg_scale=1.5, seed=2))
    c = engine.submit(Request(3, seed=3))
    engine.step(), engine.step()
    assert (a.status, b.status, engine.free_slots, engine.waiting) == ("running", "waiting", 0, 2)
    assert a.cancel() and a.status == CANCELLED and engine.free_slots == 2  # freed at once
    assert not a.cancel()  # already settled
    with pytest.raises(RequestCancelled):
        a.result(0)
    assert c.cancel() and engine.waiting == 1  # a waiting request just leaves the queue
    engine.step()
    assert b.status == "running" and b.rows == (0, 1) and b.started_at is not None
    engine.run_until_idle()
    assert torch.equal(b.result(), alone(model, b.request)) and engine.free_slots == 2


def test_cancel_during_a_pass_frees_right_after_it():
    """Cancelled from another thread while the forward pass runs (here: from inside it), the rows stay
    until the pass ends and are free when step() returns; cancelled from a per-pass hook, at once."""
    model = make_model()
    engine = GenerationEngine(model, slots=4)
    keep = engine.submit(Request(0, seed=5))
    victim = engine.submit(Request(4, cfg_scale=1.5, seed=6))
    hooked = engine.submit(Request(2, seed=7),
                           on_pass=lambda rid, prefix, t: t >= 3 and engine.cancel(hooked))
    during = []

    def in_forward(*args):
        if engine.passes == 1 and victim.status == "running":
            during.append((victim.cancel(), engine.free_slots))

    handle = model.norm.register_forward_hook(in_forward)
    try:
        engine.step()
        assert engine.free_slots == 0
        engine.step()  # victim is cancelled inside this pass: its 2 rows are freed once it ends
        assert during == [(True, 0)] and engine.free_slots == 2 and victim.passes_done == 1
        finished = engine.run_until_idle()
    finally:
        handle.remove()
    assert finished == [keep] and victim.status == hooked.status == CANCELLED and hooked.passes_done == 3
    assert torch.equal(keep.result(), alone(model, keep.request)) and engine.free_slots == 4


def test_fifo_admission_and_token_budget_passes():
    model = make_model()
    engine = GenerationEngine(model, slots=3)
    big = engine.submit(Request(0, cfg_scale=2.0, seed=0, tokens=5))  # 2 slots, 5 passes
    wide = engine.submit(Request(1, cfg_scale=2.0, seed=1))  # needs 2: waits although 1 slot is free
    small = engine.submit(Request(2, seed=2, tokens=1))  # FIFO: does not jump the queue
    engine.step()
    assert (big.status, wide.status, small.status) == ("running", "waiting", "waiting")
    finished = []
    while big.status == "running":
        finished += engine.step()
    assert finished == [big] and big.passes_done == 5 and big.result().shape == (5,)
    engine.run_until_idle()
    assert small.passes_done == 1 and small.result().shape == (1,)
    for h in (big, wide, small):
        assert torch.equal(h.result(), alone(model, h.request))


def test_guided_requests_take_aligned_pairs():
    """Two free rows that are not a (2k, 2k+1) pair do not admit a guided request; a pair does."""
    model = make_model()
    engine = GenerationEngine(model, slots=4)
    short = [engine.submit(Request(i, seed=i, tokens=1 if i % 2 == 0 else 0)) for i in range(4)]
    assert [h.rows for h in short] == [(), (), (), ()]
    engine.step()  # rows 0..3 in arrival order; the budget-1 requests on rows 0 and 2 finish
    assert [h.rows for h in short] == [(), (1,), (), (3,)] and engine.free_slots == 2
    guided = engine.submit(Request(5, cfg_scale=2.0, seed=50))
    engine.step()
    assert guided.status == "waiting" and engine.free_slots == 2
    engine.run_until_idle()
    assert guided.rows == () and guided.status == "done"
    for h in short + [guided]:
        assert torch.equal(h.result(), alone(model, h.request))


def test_hooks_see_growing_prefixes_of_the_final_codes():
    model = make_model()
    seen, own = [], []
    engine = GenerationEngine(model, slots=4, on_pass=lambda rid, p, t: seen.append((rid, p.clone(), t)))
    h = engine.submit(Request(3, cfg_scale=1.5, seed=9, tokens=12),
                      on_pass=lambda rid, p, t: own.append(t))
    other = engine.submit(Request(5, seed=10))
    engine.run_until_idle()
    mine = [(p, t) for rid, p, t in seen if rid == h.id]
    assert [t for _, t in mine] == own == [1, 2, 3, 4, 8, 12]
    assert all(p.shape == (t,) and torch.equal(p, h.result()[:t]) for p, t in mine)
    assert sorted({rid for rid, _, _ in seen}) == [h.id, other.id]


def test_failing_hook_fails_only_its_request():
    model = make_model()
    engine = GenerationEngine(model, slots=4)
    bad = engine.submit(Request(1, seed=1), on_pass=lambda *a: 1 / 0)
    good = engine.submit(Request(2, seed=2))
    engine.run_until_idle()
    assert bad.status == FAILED and good.status == DONE and engine.free_slots == 4
    with pytest.raises(ZeroDivisionError):
        bad.result(0)
    assert torch.equal(good.result(), alone(model, good.request))


def test_async_wait_with_background_driver():
    model = make_model()
    engine = GenerationEngine(model, slots=4)
    reqs = [Request(i % 6, cfg_scale=1.0 + (i % 2), top_k=5 * (i % 3), seed=20 + i) for i in range(5)]

    async def main():
        handles = [engine.submit(r) for r in reqs]
        slow = engine.submit(Request(0, seed=99))
        codes = await asyncio.gather(*(h.wait() for h in handles))
        task = asyncio.ensure_future(engine.submit(Request(1, seed=98)).wait())
        await asyncio.sleep(0)
        task.cancel()  # the awaiting task goes away -> the request is cancelled
        with pytest.raises(asyncio.CancelledError):
            await task
        await slow.wait()
        return codes

    engine.start()
    try:
        codes = asyncio.run(main())
    finally:
        engine.stop()
    for r, got in zip(reqs, codes, strict=True):
        assert torch.equal(got, alone(model, r))
    assert engine.idle and engine.free_slots == 4 and engine._thread is None


def test_threads_submit_while_driver_runs():
    model = make_model()
    engine = GenerationEngine(model, slots=6)
    engine.start()
    handles, lock = [], threading.Lock()

    def client(k):
        for i in range(3):
            h = engine.submit(Request((k + i) % 6, cfg_scale=1.5, seed=100 + 10 * k + i))
            with lock:
                handles.append(h)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    try:
        results = [h.result(timeout=60) for h in handles]
    finally:
        engine.stop()
    for h, got in zip(handles, results, strict=True):
        assert torch.equal(got, alone(model, h.request))


def test_generate_and_bad_arguments():
    model = make_model()
    engine = GenerationEngine(model, slots=1)
    codes = engine.generate([Request(0, seed=1), Request(1, temperature=0.0, tokens=3)])
    ref = sample(model, torch.tensor([1]), temperature=0.0)[0, :3]
    assert torch.equal(codes[0], alone(model, Request(0, seed=1))) and torch.equal(codes[1], ref)
    for bad in [Request(7), Request(-1), Request(0, cfg_scale=0.5), Request(0, temperature=-1),
                Request(0, top_k=-1), Request(0, top_p=0.0), Request(0, top_p=1.5), Request(0, tokens=17),
                Request(0, top_k=2**70)]:  # 2**70 used to pass submit and break admission half-way
        with pytest.raises(ValueError):
            engine.submit(bad)
    assert engine.idle and engine.free_slots == 1 and len(engine.generate([Request(0, seed=2)])) == 1
    with pytest.raises(ValueError, match="2 slots"):
        engine.submit(Request(0, cfg_scale=1.5))
    with pytest.raises(ValueError, match="mode"):
        GenerationEngine(model, mode="fast")
    with pytest.raises(ValueError, match="CUDA"):
        GenerationEngine(model, mode="graph", device="cpu")
