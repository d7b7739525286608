"""Why the tokenizer's ranks must share t: two real DeepSpeed ZeRO-2 ranks (gloo, CPU) train one step
of the smoke tokenizer. Different t >= 2 on the two ranks is fine; t = 1 on one rank skips the
self-correction pass, leaves its parameters without gradients there, and ZeRO-2's all-reduce aborts.
So with world > 1 the reader draws t from the step (ReaderConfig.shared_t): equal on every rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    rank, port, ts = int(sys.argv[1]), sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from detailflow.models.configs import get_model_config
    from detailflow.models.degrade import degrade_to_prefix
    from detailflow.models.tokenizer import DetailFlowTokenizer
    from detailflow.pipelines.train.loop_common import StepAdapter
    from detailflow.platform import deepspeed_glue as dsg
    torch.manual_seed(0)
    model = DetailFlowTokenizer(get_model_config("smoke").tokenizer)
    opt = dsg.make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ds_cfg = dsg.build_ds_config(micro_batch=4, zero_stage=2)
    engine = dsg.init_engine(StepAdapter(model, "training_step"), opt, ds_cfg)
    img = torch.rand(4, 3, 32, 32) * 2 - 1
    t = ts[rank]
    loss, _ = engine(img, degrade_to_prefix(img, t, model.rmap), t, 0)
    engine.backward(loss)
    engine.step()
    print(f"rank {rank} t={t} ok", flush=True)
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("ts,ok", [((16, 8), True), ((16, 1), False)])
def test_zero2_needs_equal_graphs_on_every_rank(tmp_path, ts, ok):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port, arg = str(_port()), ",".join(map(str, ts))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, arg], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:  # a hang is a failure of the collective too
            p.kill()
            outs.append(p.communicate()[0] + "\n<timed out>")
    codes = [p.returncode for p in procs]
    if ok:
        assert codes == [0, 0], "\n".join(o[-2000:] for o in outs)
    else:
        assert any(c != 0 for c in codes), "t=1 on one rank should break ZeRO-2's reduction"
