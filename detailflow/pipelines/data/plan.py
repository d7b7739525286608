"""Lazy, seeded micro-batch plan of the degraded stream: O(row groups), never O(samples x epochs).

Usage:
    groups = RowGroups.from_manifest(manifest)                     # G row groups, a few arrays
    plan = EpochPlan(groups, seed=0, micro_batch=32, window_groups=16, train=True, world=8)
    units = plan.rank_windows(epoch=3, rank=5)                     # window ids this rank reads
    members = plan.window_groups_of(epoch=3, window=units[0])      # row-group ids of that window
    batches = plan.window_batches(epoch=3, window=units[0])        # [(group pos, row) x micro_batch, ...]
    for pos in plan.iter_positions(rank=5, start=Position(3, 0, 0)):   # (epoch, unit, batch), lazily
        ...

An epoch orders the G row groups by a seeded permutation (train) or keeps manifest order (eval),
then cuts that order into WINDOWS of `window_groups` consecutive row groups. A window is one Ray
task: it reads its row groups once, permutes all their rows together (train) and cuts micro-batches
of `micro_batch` rows, dropping the window's final partial one in train mode (at most micro_batch - 1
images per window and epoch, a different set each epoch). So a micro-batch mixes images from up to
window_groups row groups (all of ImageNet's 1,000 classes are spread over every shard by ingest), and
membership changes every epoch because both the windows and the permutation inside them do.
Rank r of `world` reads windows r, r + world, r + 2 world, ... of each epoch: ranks never read the
same bytes, and a rank's position (epoch, unit, batch) identifies exactly which micro-batch comes
next, which is what a checkpoint records for exact resume.

Everything here is a pure function of (manifest, seed, epoch, window): any task re-derives its slice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np


class Position(NamedTuple):
    epoch: int  # epoch number (enters every seed)
    unit: int  # index into the rank's window list of that epoch
    batch: int  # micro-batch index inside that window


@dataclass(frozen=True, eq=False)
class RowGroups:
    """The manifest reduced to what the plan needs: one entry per row group (G of them)."""

    paths: tuple[str, ...]  # shard keys, in manifest order
    sizes: tuple[int, ...]  # shard sizes in bytes (checked when a task opens the shard; 0 = unknown)
    shard: np.ndarray  # G int32: index into paths
    group: np.ndarray  # G int32: row group inside the shard (-1: whole shard, old manifests)
    rows: np.ndarray  # G int32: rows in that row group

    @classmethod
    def from_manifest(cls, manifest: dict) -> RowGroups:
        shard, group, rows = [], [], []
        for i, s in enumerate(manifest["shards"]):
            n, per = int(s["rows"]), s.get("row_group_rows")
            if s.get("row_groups") and per:
                k = int(s["row_groups"])
                shard += [i] * k
                group += list(range(k))
                rows += [min(per, n - g * per) for g in range(k)]
            else:
                shard.append(i)
                group.append(-1)
                rows.append(n)
        return cls(paths=tuple(s["key"] for s in manifest["shards"]),
                   sizes=tuple(int(s.get("bytes", 0) or 0) for s in manifest["shards"]),
                   shard=np.asarray(shard, np.int32), group=np.asarray(group, np.int32),
                   rows=np.asarray(rows, np.int32))

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True, eq=False)
class EpochPlan:
    groups: RowGroups  # the row groups of the split
    seed: int  # base seed of the group order and the in-window permutation
    micro_batch: int  # rows per micro-batch
    window_groups: int = 16  # row groups per window (one Ray task); shrunk so every rank has one
    train: bool = True  # train: seeded order + permutation, partial micro-batches dropped
    world: int = 1  # number of ranks sharing the epoch
    shuffle: bool = True  # train only: False keeps manifest order (debugging)

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.window_groups < 1 or self.world < 1:
            raise ValueError("micro_batch, window_groups and world must be >= 1")
        if len(self.groups) < self.world:
            raise ValueError(f"the dataset has {len(self.groups)} row groups, fewer than the {self.world} "
                             "workers that must each read their own; ingest with a smaller row_group_rows")

    # ---- windows -------------------------------------------------------------------------------
    @property
    def window_size(self) -> int:
        """Effective row groups per window: at most window_groups, and small enough that every rank
        gets at least one window per epoch."""
        return max(1, min(self.window_groups, len(self.groups) // self.world))

    @property
    def num_windows(self) -> int:
        return -(-len(self.groups) // self.window_size)

    def group_order(self, epoch: int) -> np.ndarray:
        return _group_order(len(self.groups), self.seed, epoch, self.train and self.shuffle)

    def window_groups_of(self, epoch: int, window: int) -> np.ndarray:
        w = self.window_size
        return self.group_order(epoch)[window * w:(window + 1) * w]

    def rank_windows(self, epoch: int, rank: int) -> range:
        """Window ids of `rank` in `epoch` (the same count every epoch; the windows' members differ)."""
        del epoch
        return range(rank, self.num_windows, self.world)

    # ---- micro-batches ---------------------------------------------------------------------------
    def window_batches(self, epoch: int, window: int) -> list[np.ndarray]:
        """Micro-batches of one window: int arrays n x 2 of (position in window_groups_of, row)."""
        members = self.window_groups_of(epoch, window)
        pairs = np.concatenate([np.stack([np.full(n, i), np.arange(n)], 1)
                                for i, n in enumerate(self.groups.rows[members])]).astype(np.int64)
        if self.train:
            pairs = pairs[np.random.default_rng([self.seed, epoch, window, 0xA11]).permutation(len(pairs))]
            n = len(pairs) // self.micro_batch
        else:
            n = -(-len(pairs) // self.micro_batch)
        return [pairs[i * self.micro_batch:(i + 1) * self.micro_batch] for i in range(n)]

    def window_batch_count(self, epoch: int, window: int) -> int:
        rows = int(self.groups.rows[self.window_groups_of(epoch, window)].sum())
        return rows // self.micro_batch if self.train else -(-rows // self.micro_batch)

    def iter_positions(self, rank: int, start: Position | None = None,
                       epochs: int | None = None) -> Iterator[Position]:
        """Every planned micro-batch position of `rank` from `start` on (lazily; forever by default)."""
        start = start or Position(0, 0, 0)
        epoch = start.epoch
        while epochs is None or epoch < start.epoch + epochs:
            for unit, window in enumerate(self.rank_windows(epoch, rank)):
                if epoch == start.epoch and unit < start.unit:
                    continue
                first = start.batch if (epoch, unit) == (start.epoch, start.unit) else 0
                for b in range(first, self.window_batch_count(epoch, window)):
                    yield Position(epoch, unit, b)
            epoch += 1


@lru_cache(maxsize=4)
def _group_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    # cached: every window task of an epoch on one worker shares the same permutation of G ints
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def next_position(pos: Position) -> Position:
    """The position right after `pos` (a window shorter than that simply yields nothing more)."""
    return Position(pos.epoch, pos.unit, pos.batch + 1)


def resume_start(saved: dict | None) -> Position | None:
    """Where a rank's stream starts from its checkpointed position: the batch after the one consumed
    ({epoch, unit, batch}), or the beginning (None). (A resume at another world size is refused before
    any stream starts: loop_common.check_resume_world.)"""
    if not saved:
        return None
    return next_position(Position(int(saved["epoch"]), int(saved["unit"]), int(saved["batch"])))
