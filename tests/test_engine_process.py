"""The engine in its own process (serving/engine_process.py) answers what sampling each request alone
answers (sampler.sample, same seed), streams growing prefixes, cancels, counts passes as the plan says,
and fails what it held with a clear error when its process dies; the child exits when the replica does."""

import asyncio
import os
import signal
import time

import pytest
import torch
from test_engine import alone, make_model, mixed_requests

from detailflow.models.engine import CANCELLED, DONE, FAILED, Request
from detailflow.models.sampler import decode_plan
from detailflow.platform.serving.engine_process import EngineProcess, EngineProcessDied

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def wait_until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def model():
    return make_model(n=24, g=4, c=8)


@pytest.fixture(scope="module")
def engine(model):
    eng = EngineProcess(model, slots=6, torch_threads=1)
    yield eng
    eng.stop()
    assert eng.proc.returncode == 0


def test_requests_equal_sampling_each_alone(model, engine):
    reqs = mixed_requests(9, model.cfg.num_tokens, seed0=40)  # CFG, temperature, top-k/p, budgets

    async def main():
        return await asyncio.gather(*(engine.submit(r).wait() for r in reqs))

    for r, got in zip(reqs, asyncio.run(main()), strict=True):
        assert torch.equal(got, alone(model, r)), r
    assert engine.pid != os.getpid() and engine.idle


def test_one_request_takes_the_plans_passes_and_streams_growing_prefixes(model, engine):
    plan = decode_plan(model.cfg.num_tokens, model.cfg.group_size, model.cfg.causal_num)
    wait_until(lambda: engine.active == 0 and engine.waiting == 0)
    before = engine.passes
    seen = []
    h = engine.submit(Request(2, cfg_scale=1.5, seed=3), on_pass=lambda rid, p, t: seen.append((p, t)))
    codes = h.result(timeout=60)
    assert h.status == DONE and torch.equal(codes, alone(model, h.request))
    assert h.passes_needed == len(plan)
    wait_until(lambda: engine.passes - before == len(plan))  # the child's counter page, one pass each
    wait_until(lambda: engine.free_slots == engine.slots)
    assert [t for _, t in seen] == [stop for _, stop in plan][:-1]  # the last one comes as the result
    assert all(torch.equal(p, codes[:t]) for p, t in seen)


def test_cancel_releases_the_waiter_and_the_childs_rows(model):
    deaths = []
    eng = EngineProcess(model, slots=2, simulated_pass_s=0.05, on_death=deaths.append)  # slow passes:
    try:  # cancel lands mid-request
        long = eng.submit(Request(1, cfg_scale=1.5, seed=1))  # both rows
        queued = eng.submit(Request(2, seed=2))
        wait_until(lambda: eng.active == 1)
        assert eng.cancel(long) and long.status == CANCELLED and not eng.cancel(long)
        assert torch.equal(queued.result(timeout=60), alone(model, queued.request))
        wait_until(lambda: eng.free_slots == 2 and eng.active == 0)
    finally:
        eng.stop()
    assert deaths == []  # a stop asked for is no death


def test_a_killed_engine_process_fails_what_it_held_and_refuses_more(model):
    deaths = []
    eng = EngineProcess(model, slots=2, simulated_pass_s=0.05, on_death=deaths.append)
    held = [eng.submit(Request(i, seed=i)) for i in range(3)]
    wait_until(lambda: eng.passes > 0)
    os.kill(eng.pid, signal.SIGKILL)
    for h in held:
        with pytest.raises(EngineProcessDied, match="exited with code -9"):
            h.result(timeout=30)
        assert h.status == FAILED
    assert not eng.alive and "code -9" in eng.dead_reason
    wait_until(lambda: deaths == [eng.dead_reason])  # told once, after the handles failed
    with pytest.raises(EngineProcessDied):
        eng.submit(Request(0))
    eng.stop()  # idempotent on a dead child


def test_the_child_exits_when_the_replica_is_killed(tmp_path):
    """A replica stand-in (a Python process holding an EngineProcess) gets SIGKILL: its engine process
    must not outlive it (it sees its socket close)."""
    import subprocess
    import sys

    import psutil

    script = tmp_path / "replica.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from ar_models import make_model\n"
        "from detailflow.platform.serving.engine_process import EngineProcess\n"
        "eng = EngineProcess(make_model(), slots=2)\n"
        "print(eng.pid, flush=True)\n"
        "time.sleep(600)\n")
    replica = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(replica.stdout.readline()))
        assert child.ppid() == replica.pid
        replica.kill()
        replica.wait(timeout=30)

        def gone() -> bool:  # exited (a zombie until whoever adopted it reaps it) or reaped
            try:
                return child.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_until(gone, timeout=30)
    finally:
        replica.kill()


def test_a_child_that_cannot_start_says_why(model):
    with pytest.raises(EngineProcessDied, match="failed to start: ValueError: mode must be"):
        EngineProcess(model, slots=2, mode="warp")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_process_on_cuda_with_graphs_matches_sampling_alone_up_to_near_ties(dtype):
    """The GPU path: the child captures CUDA graphs, draws on the device, and its bf16 weights cross as
    bf16 (safetensors); codes match sampling alone except at counted near-ties (as test_engine_gpu)."""
    from test_engine_gpu import divergences

    model = make_model(32, 8, 8, dim=64, heads=4).cuda().to(dtype)
    reqs = mixed_requests(10, 32, seed0=11)
    eng = EngineProcess(model, slots=24, mode="graph", device="cuda", generator_device="cuda")
    try:
        codes = [h.result(timeout=120) for h in [eng.submit(r) for r in reqs]]
    finally:
        eng.stop()
    found = divergences(model, reqs, codes)
    assert len(found) <= len(reqs) // 3, f"{len(found)} of {len(reqs)} sequences diverged"
    assert all(gap <= 2 * noise + 1e-4 for gap, noise in found), f"not near-ties: (gap, noise) {found}"
