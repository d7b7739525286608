"""The lazy micro-batch plan (plan.py), checked by independent enumeration: coverage per epoch, rank
disjointness, determinism, epoch-to-epoch change, mixing against the random baseline, and the cost of
planning an ImageNet-sized manifest for 250 epochs."""

from __future__ import annotations

import itertools
import time
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from detailflow.pipelines.data.plan import EpochPlan, Position, RowGroups


def _manifest(rows_per_shard, group_rows=4):
    return {"shards": [{"key": f"s{i}", "rows": n, "row_groups": -(-n // group_rows), "bytes": 100 + i,
                        "row_group_rows": group_rows} for i, n in enumerate(rows_per_shard)]}


def _rows_of(plan: EpochPlan, epoch: int, window: int) -> list[list[tuple[int, int]]]:
    """Micro-batches of a window as (global row-group id, row) pairs."""
    members = plan.window_groups_of(epoch, window)
    return [[(int(members[p]), int(r)) for p, r in b] for b in plan.window_batches(epoch, window)]


def _epoch_rows(plan: EpochPlan, epoch: int, rank: int) -> list[list[tuple[int, int]]]:
    return [b for w in plan.rank_windows(epoch, rank) for b in _rows_of(plan, epoch, w)]


def test_row_groups_from_manifest():
    g = RowGroups.from_manifest(_manifest([10, 7]))
    assert list(g.rows) == [4, 4, 2, 4, 3] and list(g.shard) == [0, 0, 0, 1, 1]
    assert list(g.group) == [0, 1, 2, 0, 1] and g.paths == ("s0", "s1") and g.sizes == (100, 101)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("train", [True, False])
def test_epoch_covers_rows_at_most_once_across_ranks(world, train):
    m = _manifest([10, 7, 9, 12, 5])
    g = RowGroups.from_manifest(m)
    plan = EpochPlan(g, seed=3, micro_batch=4, window_groups=2, train=train, world=world)
    every = [(gi, r) for gi, n in enumerate(g.rows) for r in range(n)]
    rows = [x for rank in range(world) for b in _epoch_rows(plan, 0, rank) for x in b]
    assert len(rows) == len(set(rows)) and set(rows) <= set(every)
    if train:  # each window drops only its own final partial micro-batch
        expect = sum(int(g.rows[plan.window_groups_of(0, w)].sum()) // 4 * 4 for w in range(plan.num_windows))
        assert len(rows) == expect
        assert all(len(b) == 4 for rank in range(world) for b in _epoch_rows(plan, 0, rank))
    else:
        assert sorted(rows) == sorted(every)  # eval: every row exactly once
    assert all(len(plan.rank_windows(0, r)) >= 1 for r in range(world))


def test_plan_is_seeded_and_changes_every_epoch():
    g = RowGroups.from_manifest(_manifest([16] * 8))
    a = EpochPlan(g, seed=1, micro_batch=4, window_groups=4)
    b = EpochPlan(g, seed=1, micro_batch=4, window_groups=4)
    assert _epoch_rows(a, 0, 0) == _epoch_rows(b, 0, 0)  # a pure function of (manifest, seed, epoch)
    assert _epoch_rows(a, 1, 0) != _epoch_rows(a, 0, 0)
    assert _epoch_rows(EpochPlan(g, seed=2, micro_batch=4, window_groups=4), 0, 0) != _epoch_rows(a, 0, 0)


def test_iter_positions_resumes_exactly():
    g = RowGroups.from_manifest(_manifest([9, 13, 6, 11]))
    plan = EpochPlan(g, seed=0, micro_batch=3, window_groups=2, world=2)
    full = list(itertools.islice(plan.iter_positions(rank=1), 40))
    for k in (0, 1, 5, 17):
        nxt = full[k]
        assert list(itertools.islice(plan.iter_positions(rank=1, start=nxt), 40 - k)) == full[k:]
    # positions enumerate exactly the planned micro-batches of each epoch, in order
    e0 = [p for p in full if p.epoch == 0]
    assert len(e0) == len(_epoch_rows(plan, 0, 1)) and e0[0] == Position(0, 0, 0)


def test_mixing_distinct_groups_and_pair_cooccurrence_near_random():
    """ImageNet-like: 64-row groups, each a random draw of classes; micro-batch 32, windows of 16."""
    groups, per, mb = 96, 64, 32
    g = RowGroups.from_manifest(_manifest([per] * groups, group_rows=per))
    plan = EpochPlan(g, seed=0, micro_batch=mb, window_groups=16)
    distinct = [len({gi for gi, _ in b}) for b in _epoch_rows(plan, 0, 0)]
    # 32 rows out of 16 groups of 64: the expected number of distinct groups is 16(1 - C(960,32)/C(1024,32))
    expect = 16 * (1 - np.prod([(960 - i) / (1024 - i) for i in range(mb)]))
    print(f"distinct row groups per micro-batch: mean {np.mean(distinct):.2f} (closed form {expect:.2f}, "
          f"old plan 1-2)")
    assert abs(np.mean(distinct) - expect) < 0.5 and min(distinct) >= 8

    def pairs(epoch):
        out = Counter()
        for b in _epoch_rows(plan, epoch, 0):
            ids = sorted(gi * per + r for gi, r in b)
            out.update(itertools.combinations(ids, 2))
        return out

    p0, p1 = pairs(0), pairs(1)
    shared = sum(min(p0[k], p1[k]) for k in p0)
    # random baseline: a pair seen in epoch 0 meets again in epoch 1 with probability (mb-1)/(n-1)
    n = groups * per
    baseline = len(p0) * (mb - 1) / (n - 1)
    print(f"pairs co-occurring in epochs 0 and 1: {shared} (random baseline {baseline:.0f} of {len(p0)})")
    assert shared < 3 * baseline + 10  # the old plan repeated ~all pairs of a row group every epoch


def test_imagenet_sized_plan_is_cheap_and_independent_of_epochs():
    """1,281,167 rows in 1,300 shards of 64-row groups: planning touches O(row groups) only."""
    rows = np.full(1300, 1281167 // 1300)
    rows[: 1281167 % 1300] += 1
    m = _manifest(rows.tolist(), group_rows=64)
    tracemalloc.start()
    t0 = time.perf_counter()
    plan = EpochPlan(RowGroups.from_manifest(m), seed=0, micro_batch=16, window_groups=16, world=16)
    first = list(itertools.islice(plan.iter_positions(rank=3, start=Position(249, 0, 0)), 10))
    batches = plan.window_batches(249, plan.rank_windows(249, 3)[0])
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(plan.groups) == sum(-(-int(n) // 64) for n in rows) and first[0] == Position(249, 0, 0)
    assert len(batches) == 64  # 16 groups x 64 rows / 16
    assert dt < 5 and peak < 50e6, (dt, peak)


def test_too_few_row_groups_for_the_workers_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than the 4 workers"):
        EpochPlan(RowGroups.from_manifest(_manifest([5], group_rows=4)), seed=0, micro_batch=2, world=4)


@pytest.mark.parametrize("micro_batch,window_groups", [(32, 16), (4, 16), (5, 3)])
def test_read_ahead_tasks_may_hold_their_whole_window(micro_batch, window_groups):
    """Every window task of a rank's stream runs to the end of its window without waiting for the
    consumer (Ray's generator backpressure pauses a task at read_ahead_batches unconsumed): else only
    the consumed task decodes and reader_tasks CPUs give ~one CPU's images (data_throughput.py)."""
    from detailflow.models.configs import get_model_config
    from detailflow.models.resolution import ResolutionMap
    from detailflow.pipelines.data.reader import DegradedStream, ReaderConfig

    rmap = ResolutionMap.from_config(get_model_config("tiny").tokenizer)
    m = _manifest([64 * 5 + 17] * 40, group_rows=64)  # 5 full row groups and one of 17 rows per shard
    cfg = ReaderConfig(image_size=rmap.image_size, micro_batch=micro_batch, window_groups=window_groups,
                       prefetch_windows=6)
    stream = DegradedStream(None, "x", "train", cfg, rmap, rank=1, world=3, manifest=m)
    plan = stream.plan
    most = max(len(plan.window_batches(e, w)) for e in range(3) for w in range(plan.num_windows))
    assert most >= 64 * (stream.plan.window_size - 1) // micro_batch  # far more than the old bound of 4
    assert stream.read_ahead_batches >= most
    cfg4 = ReaderConfig(image_size=rmap.image_size, micro_batch=micro_batch, prefetch_batches=4)
    pinned = DegradedStream(None, "x", "train", cfg4, rmap, manifest=m)
    assert pinned.read_ahead_batches == 4  # an explicit bound is kept
