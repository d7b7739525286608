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
