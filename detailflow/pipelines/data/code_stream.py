"""AR training stream over code shards: per-epoch view and order from (seed, epoch), worker-side.

Usage:
    from detailflow.pipelines.data.code_stream import CodeStream, CodeStreamConfig
    cfg = CodeStreamConfig(micro_batch=64, seed=0, correction_prob=0.3)
    for b in CodeStream(storage, "tok-v3", "train", cfg, rank=r, world=w, start=pos):
        b["input"], b["target"], b["label"], b["position"]        # LongTensors B x N, B; plan.Position

The plan is plan.EpochPlan over the code set's BLOCKS (codes.py's view-diagonal layout: a block is
BLOCK_IMAGES images stored as V row groups, row group j holding view (p + j) mod V of the image at
position p): the driver state is O(blocks) small ints (ImageNet ten-crop: ~1,300 blocks), never
O(rows), and nothing is sorted. Per epoch e:
  - block order and windows: EpochPlan (seeded permutation of the blocks, cut into windows of
    window_groups blocks; rank r reads windows r, r + world, ...);
  - view choice: block g reads ONLY its row group j = diagonal(seed, e, g) (uniform in [0, V)), so
    every image appears exactly once per epoch, with a view uniform over epochs, and the other
    V - 1 views are never read;
  - order inside a window: EpochPlan.window_batches (seeded permutation of all the window's images),
    cut into micro-batches; the (input, target) / (clean, clean) choice is codes.select_pairs'.
Each window is one Ray task (task_stream.ordered_task_stream) that derives all of this from (seed,
epoch, window) alone. A batch's position (epoch, unit, batch) says exactly which batch comes next:
a stream started at next_position(last consumed) continues with the next unconsumed batch of the
same epoch (exact resume, what the AR checkpoint records).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from detailflow.pipelines.data.codes import (
    BLOCK_IMAGES,
    FORMAT,
    LAYOUT,
    MIN_BLOCKS,
    read_code_table,
    read_published_manifest,
    select_pairs,
    table_to_batch,
)
from detailflow.pipelines.data.plan import EpochPlan, Position, RowGroups


@dataclass
class CodeStreamConfig:
    micro_batch: int = 64  # images per yielded batch (per rank, per step)
    seed: int = 0  # base seed of block order, view choice, in-window order and pair draws
    correction_prob: float = 0.3  # per-sample probability of the (input, target) pair (spec §2.3)
    window_groups: int = 16  # blocks per window = per Ray task; a batch mixes up to this many blocks
    prefetch_windows: int = 2  # window tasks per rank at once (the one consumed + read-ahead)
    prefetch_batches: int = 4  # batches a window task may hold unconsumed
    num_cpus: float = 0.0  # CPUs each window task asks for: 0, its CPUs are reserved in the rank's bundle
    # (raytrain.worker_resources / reader_task_options)


def diagonal(seed: int, epoch: int, block: int, num_views: int) -> int:
    """Row group of `block` (within the block) read in `epoch`: uniform in [0, num_views)."""
    return int(np.random.default_rng([seed, epoch, block, 0xD1A6]).integers(num_views))


def code_blocks(manifest: dict) -> tuple[RowGroups, int]:
    """The manifest as plan units (one per block: shard index, block index, images) and V."""
    shards = manifest["shards"]
    old = [s["key"] for s in shards if s.get("layout") != LAYOUT]
    if old:
        raise ValueError(f"code shard {old[0]} (and {len(old) - 1} more) predate the {LAYOUT} layout the "
                         "training stream reads; re-run extract-codes with --force")
    views = {int(s["num_views"]) for s in shards}
    if len(views) != 1:
        raise ValueError(f"code shards disagree on the number of views per image: {sorted(views)}")
    shard, block, rows = [], [], []
    for i, s in enumerate(shards):
        k, n = int(s["block_images"]), int(s["images"])
        for b in range(int(s["blocks"])):
            shard.append(i)
            block.append(b)
            rows.append(min(k, n - b * k))
    groups = RowGroups(paths=tuple(s["key"] for s in shards), sizes=tuple(int(s["bytes"]) for s in shards),
                       shard=np.asarray(shard, np.int32), group=np.asarray(block, np.int32),
                       rows=np.asarray(rows, np.int32))
    return groups, views.pop()


def simulated_manifest(images: int, shards: int, views: int = 10, tokens: int = 256) -> dict:
    """A code-set manifest of `images` x `views` rows in `shards` shards, metadata only (no shard
    exists): for planning at scale in tests and benchmarks/reader_scale.py."""
    per = [images // shards + (i < images % shards) for i in range(shards)]
    out = []
    for i, n in enumerate(per):
        k = min(BLOCK_IMAGES, max(1, -(-n // MIN_BLOCKS)))  # write_code_shard's default
        out.append({"key": f"codes/simulated/train/r-0/part-{i:05d}.parquet", "rows": n * views,
                    "bytes": n * views * tokens * 12, "num_views": views, "layout": LAYOUT, "images": n,
                    "block_images": k, "blocks": -(-n // k), "row_groups": -(-n // k) * views})
    return {"format": FORMAT, "num_rows": images * views, "num_views": views, "num_tokens": tokens,
            "shards": out}


def window_code_batches(plan: EpochPlan, num_views: int, cfg: CodeStreamConfig, storage, epoch: int,
                        unit: int, window: int, skip: int) -> Iterator[dict]:
    """Ray task (a generator): the micro-batches of one window from batch `skip` on, as numpy dicts
    (select_pairs' keys + epoch/unit/index)."""
    batches = plan.window_batches(epoch, window)[skip:]
    if not batches:
        return
    import ray

    here = ray.get_runtime_context()
    node, group = here.get_node_id(), here.get_placement_group_id()
    g = plan.groups
    parts = []
    for gi in plan.window_groups_of(epoch, window).tolist():
        s = int(g.shard[gi])
        row_group = int(g.group[gi]) * num_views + diagonal(cfg.seed, epoch, gi, num_views)
        parts.append(table_to_batch(read_code_table(storage, g.paths[s], row_group, g.sizes[s])))
    for j, pairs in enumerate(batches):
        rows = {k: np.stack([parts[p][k][r] for p, r in pairs]) if k in ("clean", "input", "target")
                else np.asarray([parts[p][k][r] for p, r in pairs]) for k in parts[0]}
        out = select_pairs(rows, cfg.correction_prob, cfg.seed, epoch)
        out["key"] = rows["key"].astype(object)
        out.update(epoch=epoch, unit=unit, index=skip + j, reader_node=node, reader_pg=group or "")
        yield out


class CodeStream:
    """One rank's AR batches from `start` on, forever (or `epochs` epochs), in plan order."""

    def __init__(self, storage, version: str, split: str, cfg: CodeStreamConfig, *, rank: int = 0,
                 world: int = 1, start: Position | None = None, manifest: dict | None = None,
                 epochs: int | None = None, placement=None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        manifest = manifest if manifest is not None else read_published_manifest(storage, version, split)
        groups, self.num_views = code_blocks(manifest)
        self.plan = EpochPlan(groups, seed=cfg.seed, micro_batch=cfg.micro_batch,
                              window_groups=cfg.window_groups, train=True, world=world)
        if not any(self.plan.window_batch_count(0, w) for w in self.plan.rank_windows(0, rank)):
            raise ValueError(f"codes {version}/{split}: no window of rank {rank} holds micro_batch="
                             f"{cfg.micro_batch} images; lower micro_batch or raise window_groups")
        self.storage, self.cfg, self.rank, self.epochs = storage, cfg, rank, epochs
        self.start = start or Position(0, 0, 0)
        self.placement = placement  # task options; default: raytrain.reader_task_options() at iteration

    def task_args(self) -> Iterator[tuple]:
        """(plan, V, cfg, storage, epoch, unit, window, skip) per window task, lazily, in plan order."""
        import ray

        shared = ray.put((self.plan, self.num_views, self.cfg, self.storage))  # one copy per stream
        epoch = self.start.epoch
        while self.epochs is None or epoch < self.start.epoch + self.epochs:
            for unit, window in enumerate(self.plan.rank_windows(epoch, self.rank)):
                if (epoch, unit) < (self.start.epoch, self.start.unit):
                    continue
                skip = self.start.batch if (epoch, unit) == (self.start.epoch, self.start.unit) else 0
                yield shared, epoch, unit, window, skip
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        import torch

        from detailflow.pipelines.data.task_stream import ordered_task_stream
        from detailflow.platform.raytrain import reader_task_options

        cfg = self.cfg
        options = self.placement if self.placement is not None else reader_task_options()
        for out in ordered_task_stream(_window_task, self.task_args(), num_cpus=cfg.num_cpus,
                                       in_flight=cfg.prefetch_windows, buffered=cfg.prefetch_batches,
                                       options=options):
            batch = {k: torch.from_numpy(out[k].copy()) for k in ("input", "target", "clean", "label", "view",
                                                          "corrected")}
            batch["key"] = out["key"].tolist()
            batch["position"] = Position(int(out["epoch"]), int(out["unit"]), int(out["index"]))
            batch["reader_node"] = out["reader_node"]  # where the window task ran (placement checks):
            batch["reader_pg"] = out["reader_pg"]  # its node and placement group ("" for none)
            yield batch


def _window_task(shared: tuple, epoch: int, unit: int, window: int, skip: int) -> Iterator[dict]:
    plan, num_views, cfg, storage = shared
    yield from window_code_batches(plan, num_views, cfg, storage, epoch, unit, window, skip)
