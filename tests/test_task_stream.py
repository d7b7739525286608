"""ordered_task_stream: objects in submission order, bounded read-ahead, errors surface (real Ray)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from detailflow.pipelines.data.task_stream import ordered_task_stream


@pytest.fixture(autouse=True)
def _tasks_by_value(ray_session):
    """Ray workers cannot import this test module: ship the task functions below by value."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _numbers(i: int, n: int, seed: int):
    rng = random.Random(seed * 1000 + i)
    for j in range(n):
        time.sleep(rng.uniform(0, 0.02))  # tasks finish out of order; the stream must not
        yield (i, j)


def _logged(i: int, n: int, folder: str):
    Path(folder, f"started-{i}").touch()
    for j in range(n):
        Path(folder, f"produced-{i}-{j}").touch()
        yield j


def _fails_at(i: int, bad: int):
    if i == bad:
        raise ValueError(f"boom in task {i}")
    yield i


@pytest.mark.parametrize("in_flight,buffered", [(1, 1), (2, 4), (4, 2)])
def test_objects_come_in_submission_order(ray_session, in_flight, buffered):
    args = [(i, 1 + i % 4, 7) for i in range(9)]
    got = list(ordered_task_stream(_numbers, args, num_cpus=0.25, in_flight=in_flight, buffered=buffered))
    assert got == [(i, j) for i, n, _ in args for j in range(n)]


def test_read_ahead_is_bounded_by_in_flight_and_buffered(ray_session, tmp_path):
    stream = ordered_task_stream(_logged, [(i, 50, str(tmp_path)) for i in range(10)], num_cpus=0.25,
                                 in_flight=2, buffered=3)
    assert next(stream) == 0
    time.sleep(3)  # long enough for unbounded tasks to produce everything
    started = sorted(p.name for p in tmp_path.glob("started-*"))
    assert started == ["started-0", "started-1"]  # 10 arguments, 2 tasks at once
    for i in (0, 1):
        produced = len(list(tmp_path.glob(f"produced-{i}-*")))
        # task 0: the one taken + `buffered` waiting (+1 being yielded); task 1: nothing taken yet
        assert produced <= 1 + 3 + 1, (i, produced)
    assert list(stream)[:3] == [1, 2, 3]  # draining the rest still works, in order


def test_a_task_error_reaches_the_consumer_after_the_earlier_objects(ray_session):
    got = []
    with pytest.raises(ValueError, match="boom in task 2"):
        for x in ordered_task_stream(_fails_at, [(i, 2) for i in range(5)], num_cpus=0.25):
            got.append(x)
    assert got == [0, 1]


def test_arguments_are_checked(ray_session):
    with pytest.raises(ValueError, match="in_flight"):
        next(ordered_task_stream(_numbers, [(0, 1, 0)], in_flight=0))


HALF_REGISTERED = '''
import builtins, os, time
if getattr(builtins, "_halfreg_registered", False):  # what torch does on a second import in a process
    raise RuntimeError("Only a single TORCH_LIBRARY can be used to register the namespace halfreg")
builtins._halfreg_registered = True
while os.path.exists(os.path.join(os.path.dirname(__file__), "slow")):
    time.sleep(0.05)
'''


def _imports_halfreg(i: int, folder: str):
    import os
    import sys

    if i == 0:
        yield "quick"
        return
    Path(folder, f"pid-{i}").write_text(str(os.getpid()))
    sys.path.insert(0, folder)
    import halfreg  # noqa: F401 - the import is the point

    yield os.getpid()


def test_an_abandoned_stream_kills_its_tasks_workers_so_none_is_reused_half_imported(ray_session,
                                                                                     tmp_path):
    """A plain ray.cancel raises KeyboardInterrupt in the task; landing inside a first `import torch`
    it left torch half-registered in a worker Ray then reused, and every later task there failed on
    import (seen in the suite: the prims namespace). halfreg.py models that import: registered once per
    process, and slow while the `slow` file exists."""
    import psutil
    import ray

    (tmp_path / "halfreg.py").write_text(HALF_REGISTERED)
    (tmp_path / "slow").touch()
    stream = ordered_task_stream(_imports_halfreg, [(0, str(tmp_path)), (1, str(tmp_path))], num_cpus=0.25,
                                 in_flight=2)
    assert next(stream) == "quick"
    deadline = time.time() + 60
    while not (tmp_path / "pid-1").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # task 1 is inside the import
    worker = int((tmp_path / "pid-1").read_text())
    stream.close()  # the consumer stops early: task 1 is cancelled mid-import
    (tmp_path / "slow").unlink()
    def gone() -> bool:
        return not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE

    deadline = time.time() + 30
    while not gone() and time.time() < deadline:
        time.sleep(0.2)
    assert gone(), "the interrupted worker lives on, to be reused with a half-done import"
    imports = ray.remote(lambda folder: list(_imports_halfreg(2, folder))[0]).options(num_cpus=0.25)
    pids = ray.get([imports.remote(str(tmp_path)) for _ in range(4)], timeout=120)
    assert worker not in pids
