"""Streaming reader: Parquet shards on S3 -> decode, crop, flip -> degraded micro-batches (Ray tasks).

Usage:
    from detailflow.pipelines.data.reader import DegradedStream, ReaderConfig, build_degraded_dataset
    rmap = ResolutionMap.from_config(get_model_config("tiny").tokenizer)
    cfg = ReaderConfig(image_size=32, micro_batch=32, degrade_prob=0.2, seed=0, train=True, num_epochs=None)
    for mb in DegradedStream(storage, "shapes", "train", cfg, rmap, rank=r, world=w, start=pos):
        mb.images, mb.targets, mb.t, mb.position        # uint8 B x 3 x R x R, float B x 3 x c x c, t
    # one finite Ray Dataset (evaluation, benchmarks): one row per micro-batch
    ds = build_degraded_dataset(storage, "shapes", "val", ReaderConfig(32, train=False, fixed_t=8), rmap)
    for img_BCHW, target_BCcc, t in iter_microbatches(ds):
        ...

Planning is lazy (plan.py): the manifest becomes O(row groups) arrays; each Ray task is one WINDOW of
a few row groups of one epoch and derives its micro-batches from (seed, epoch, window) alone: it reads
those row groups from S3 once (checking each shard's size against the manifest), permutes their rows
together, decodes, crops (ADM random-resize crop + flip with a per-row generator from (seed, epoch,
key), or a centre crop), draws t (spec §1.6: one draw per micro-batch, from the plan position; with
shared_t from the step, equal on every rank) and degrades with degrade_to_prefix, emitting ONE row per
micro-batch. Rank r reads its own windows (r, r + world, ...), so a rank's stream is deterministic and
its (epoch, unit, batch) position is what a checkpoint records for exact resume. A DegradedStream
plans chunks of whole epochs, so nothing is planned for epochs not yet reached, and runs each window
as an ordered streaming Ray task (task_stream.py: no Ray Data executor spinning inside the training
worker); build_degraded_dataset wraps the same window tasks in one Ray Dataset for one-pass readers.
Rows carry flat bytes plus shape columns (batch, size, canvas), so micro-batches of different canvas
sizes never meet Ray's fixed-shape tensor columns; iter_microbatches hides this. A t = N row ships no
target bytes: the target is the image itself (degrade_to_prefix is the identity).

The per-micro-batch work (decode + crop, group + degrade) is in batches.py; reading the manifest and
one row group of a shard off S3 in shard_read.py (both re-exported here).

Images that fail to decode (ingest already rejected undecodable files, so this means damage after
ingest) are skipped and counted (column `skipped`, summed by iter_microbatches' `stats`); that
micro-batch is then smaller than micro_batch rather than padded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from detailflow.pipelines.data.batches import decode_crop_batch, degrade_batch, prefix_rng  # noqa: F401
from detailflow.pipelines.data.plan import EpochPlan, Position, RowGroups
from detailflow.pipelines.data.shard_read import (  # noqa: F401 - part of the reader's API
    ShardMismatch,
    read_manifest_checked,
    read_unit_table,
    read_units,
)


@dataclass
class ReaderConfig:
    image_size: int  # R: output crop size in pixels (the tokenizer's image_size)
    micro_batch: int = 32  # images per emitted row = per training step per worker
    degrade_prob: float = 0.2  # p of spec §1.6 (train mode)
    seed: int = 0  # base seed of crops, flips, shuffles and t draws
    train: bool = True  # train: random crop + flip, drawn t, drop the final partial micro-batch
    epoch: int = 0  # first epoch number (enters every seed)
    num_epochs: int | None = 1  # epochs chained into one stream, each re-seeded (None: endless stream)
    fixed_t: int | None = None  # every micro-batch uses this prefix length (evaluation)
    all_t: bool = False  # emit every micro-batch once per admissible t (evaluation curves)
    max_scale: float = 1.25  # ADM short side uniform in [R, max_scale * R]
    flip: bool = True  # horizontal flip with p = 0.5 in train mode
    shuffle_files: bool = True  # train: shard order shuffled per epoch (seeded)
    num_cpus: float = 0.5  # CPUs per task of the one-pass Dataset (build_degraded_dataset); fractional so
    # trainers never starve it (pitfall 3). DegradedStream's tasks reserve none: see its __iter__
    jpeg_draft: bool = True  # let libjpeg scale down large JPEGs during decode (DCT scaling)
    window_groups: int = 16  # row groups per window = per Ray task; a micro-batch mixes all of them
    shared_t: bool = False  # draw t from (seed, step): every rank trains the same t (needed when world > 1)
    prefetch_windows: int = 2  # DegradedStream: window tasks per rank at once (the one consumed + read-ahead)
    prefetch_batches: int | None = None  # DegradedStream: micro-batches a window task may hold unconsumed;
    # None: its whole window, so every read-ahead task decodes on its own CPU while the consumer reads the
    # first (a few: the read-ahead tasks stop after that many and ~one task decodes at a time). Memory:
    # prefetch_windows windows per rank (window_groups x 64 rows: 6 x 1024 images at 256 px = 1.2 GB)

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.image_size < 1:
            raise ValueError("micro_batch and image_size must be >= 1")
        if self.fixed_t is not None and self.all_t:
            raise ValueError("fixed_t and all_t are exclusive")


class MicroBatch(NamedTuple):
    images: object  # uint8 B x 3 x R x R torch tensor
    targets: object  # float [-1, 1] B x 3 x c x c torch tensor
    t: int  # prefix length shared by the micro-batch
    labels: object  # int64 B torch tensor
    keys: list[str]  # source keys, in row order
    skipped: int  # images dropped for decode failures before this micro-batch
    position: Position | None = None  # (epoch, unit, batch) in the rank's stream plan


# ---- dataset builders ------------------------------------------------------------------------------
def read_decode_units(units: dict, *, storage, **decode_kwargs) -> Iterator[dict]:
    """map_batches fn: for each unit, read its row group from S3 and decode + crop it."""
    sizes = units.get("bytes", [0] * len(units["path"]))
    for path, group, size in zip(units["path"], units["row_group"], sizes, strict=True):
        table = read_unit_table(storage, str(path), int(group), int(size))
        batch = {"key": np.array(table["key"].to_pylist(), dtype=object), "label": table["label"].to_numpy(),
                 "image": np.array(table["image"].to_pylist(), dtype=object)}
        yield decode_crop_batch(batch, **decode_kwargs)


def build_image_dataset(storage, name: str, split: str, cfg: ReaderConfig, epoch: int | None = None):
    """Decoded, cropped images: rows {key, label, image uint8 3 x R x R, skipped}."""
    import ray.data

    epoch = cfg.epoch if epoch is None else epoch
    units = read_units(read_manifest_checked(storage, name, split))
    if cfg.train and cfg.shuffle_files:
        order = np.random.default_rng([cfg.seed, epoch, 0x5EED]).permutation(len(units))
        units = [units[i] for i in order]
    # Ray's own read_parquet lists files in a task (~6 s of latency here) and merges small files into
    # one read task; explicit units keep every CPU busy from the first second
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    return ds.map_batches(
        read_decode_units, batch_size=1, batch_format="numpy", num_cpus=cfg.num_cpus,
        fn_kwargs={"storage": storage, "image_size": cfg.image_size, "seed": cfg.seed, "epoch": epoch,
                   "train": cfg.train, "flip": cfg.flip, "max_scale": cfg.max_scale,
                   "jpeg_draft": cfg.jpeg_draft})


def epoch_plan(manifest: dict, cfg: ReaderConfig, world: int = 1) -> EpochPlan:
    return EpochPlan(RowGroups.from_manifest(manifest), seed=cfg.seed, micro_batch=cfg.micro_batch,
                     window_groups=cfg.window_groups, train=cfg.train, world=world,
                     shuffle=cfg.shuffle_files)


@dataclass
class ChunkUnits:
    """The units (windows) of one Ray Dataset of the stream: a few small int arrays, O(units)."""

    epoch: np.ndarray  # epoch of each unit
    unit: np.ndarray  # index in the rank's window list of that epoch
    window: np.ndarray  # window id in the epoch
    skip: np.ndarray  # micro-batches to skip at the start of the unit (resume inside a window)
    first_step: np.ndarray  # stream index of the unit's first emitted micro-batch (shared_t draws)


def window_task(ids: dict, *, storage, rmap, cfg: ReaderConfig, plan: EpochPlan, units: ChunkUnits,
                ) -> Iterator[dict]:
    """map_batches fn over unit ids: read a window's row groups once, emit one row per micro-batch."""
    import torch

    if torch.get_num_threads() != 1:  # Ray runs one task per CPU share: intra-op threads oversubscribe
        torch.set_num_threads(1)
    g = plan.groups
    for i in np.asarray(ids["id"]).tolist():
        epoch, window, skip = int(units.epoch[i]), int(units.window[i]), int(units.skip[i])
        batches = plan.window_batches(epoch, window)[skip:]
        if not batches:
            continue
        members = plan.window_groups_of(epoch, window)
        tables = []
        for gi in members:
            s = int(g.shard[gi])
            t = read_unit_table(storage, g.paths[s], int(g.group[gi]), g.sizes[s])
            tables.append((t["key"].to_pylist(), t["label"].to_numpy(), t["image"]))
        for j, pairs in enumerate(batches):
            raw = {"key": np.array([tables[p][0][r] for p, r in pairs], dtype=object),
                   "label": np.array([tables[p][1][r] for p, r in pairs], np.int32),
                   "image": np.array([tables[p][2][int(r)].as_py() for p, r in pairs], dtype=object)}
            batch = decode_crop_batch(raw, image_size=cfg.image_size, seed=cfg.seed, epoch=epoch,
                                      train=cfg.train, flip=cfg.flip, max_scale=cfg.max_scale,
                                      jpeg_draft=cfg.jpeg_draft)
            b = skip + j
            draw = ([cfg.seed, int(units.first_step[i]) + j, 0x57E9] if cfg.shared_t
                    else [cfg.seed, epoch, window, b, 0x7D])
            out = degrade_batch(batch, rmap=rmap, micro_batch=cfg.micro_batch, degrade_prob=cfg.degrade_prob,
                                seed=cfg.seed, epoch=epoch, train=cfg.train, fixed_t=cfg.fixed_t,
                                all_t=cfg.all_t, drop_partial=False, rng=np.random.default_rng(draw))
            n = len(out["t"])
            if n == 0:  # every image of the micro-batch failed to decode
                continue
            out.update(epoch=np.full(n, epoch, np.int64), unit=np.full(n, int(units.unit[i]), np.int64),
                       index=np.full(n, b, np.int64))
            yield out


class DegradedStream:
    """One rank's degraded micro-batches from `start` on, as a sequence of Ray Datasets ("chunks").

    Each chunk covers whole epochs and at least `min_chunk_units` windows, so the driver (here: the
    train worker that builds it) holds O(windows of a chunk) small ints whatever the number of
    epochs, and a chunk's boundary (a new Ray Dataset warming up) is rare. Order is preserved, so
    "the last position consumed" says exactly what comes next (exact resume). `version` reads that
    dataset version's immutable manifest instead of the moving pointer (read_manifest_checked)."""

    def __init__(self, storage, name: str, split: str, cfg: ReaderConfig, rmap, *, rank: int = 0,
                 world: int = 1, start: Position | None = None, start_step: int = 0,
                 manifest: dict | None = None, min_chunk_units: int = 64, version: str | None = None):
        if rmap.image_size != cfg.image_size:
            raise ValueError(f"ReaderConfig.image_size={cfg.image_size} but the resolution map is for "
                             f"{rmap.image_size} px")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.storage, self.cfg, self.rmap, self.rank = storage, cfg, rmap, rank
        manifest = manifest if manifest is not None else read_manifest_checked(storage, name, split, version)
        self.plan = epoch_plan(manifest, cfg, world)
        self.start = start or Position(cfg.epoch, 0, 0)
        self.start_step = start_step
        self.min_chunk_units = max(1, min_chunk_units)
        if cfg.train and sum(self.plan.window_batch_count(self.start.epoch, w)
                             for w in range(self.plan.num_windows)) == 0:
            raise ValueError(f"{name}/{split}: no window of {self.plan.window_size} row groups holds "
                             f"micro_batch={cfg.micro_batch} images; lower micro_batch or window_groups")

    @property
    def read_ahead_batches(self) -> int:
        """Micro-batches each window task may hold unconsumed: cfg.prefetch_batches, else the most a
        window holds (a read-ahead task then never waits for the consumer while its CPU is free)."""
        if self.cfg.prefetch_batches:
            return int(self.cfg.prefetch_batches)
        g = self.plan.groups
        return max(1, -(-self.plan.window_size * int(g.rows.max()) // self.cfg.micro_batch))

    @property
    def end_epoch(self) -> int | None:
        return None if self.cfg.num_epochs is None else self.cfg.epoch + self.cfg.num_epochs

    def chunk_units(self, first_epoch: int, step: int) -> tuple[ChunkUnits, int]:
        """The next chunk's units from first_epoch on, and the stream index after its last batch."""
        per_epoch = len(self.plan.rank_windows(first_epoch, self.rank))
        n_epochs = max(1, -(-self.min_chunk_units // per_epoch))
        if self.end_epoch is not None:
            n_epochs = min(n_epochs, self.end_epoch - first_epoch)
        rows = []
        for e in range(first_epoch, first_epoch + n_epochs):
            for u, w in enumerate(self.plan.rank_windows(e, self.rank)):
                if (e, u) < (self.start.epoch, self.start.unit):
                    continue
                skip = self.start.batch if (e, u) == (self.start.epoch, self.start.unit) else 0
                rows.append((e, u, w, skip, step))
                if self.cfg.shared_t:  # only then is the per-window count needed (O(window) each)
                    step += max(0, self.plan.window_batch_count(e, w) - skip)
        arr = np.asarray(rows, np.int64).reshape(-1, 5)
        return ChunkUnits(*(arr[:, k].copy() for k in range(5))), step

    def build(self, units: ChunkUnits):
        import ray.data

        n = len(units.epoch)
        ds = ray.data.range(n, override_num_blocks=n).map_batches(
            window_task, batch_size=1, batch_format="numpy", num_cpus=self.cfg.num_cpus,
            fn_kwargs={"storage": self.storage, "rmap": self.rmap, "cfg": self.cfg, "plan": self.plan,
                       "units": units})
        ds.context.execution_options.preserve_order = True  # exact resume needs the planned order
        # every rank's stream would draw Ray Data's progress bars on the driver console, interleaved
        # with each other; rank 0's Progress line (platform.tracking) is the training's progress
        ds.context.enable_progress_bars = False
        # one block per micro-batch: Ray otherwise buffers a task's output up to 128 MB before the
        # first block leaves it, i.e. the first step waits for ~40 DetailFlow-16 micro-batches
        ds.context.target_max_block_size = 1
        return ds

    def chunks(self) -> Iterator[ChunkUnits]:
        """The plan's chunks in order, until cfg.num_epochs epochs (forever when it is None)."""
        epoch, step = self.start.epoch, self.start_step
        while self.end_epoch is None or epoch < self.end_epoch:
            units, step = self.chunk_units(epoch, step)
            if len(units.epoch):
                yield units
                epoch = int(units.epoch[-1]) + 1
            else:
                epoch += 1

    def datasets(self) -> Iterator:
        """One Ray Dataset per chunk, in order (build_degraded_dataset takes the first)."""
        for units in self.chunks():
            yield self.build(units)

    def task_args(self) -> Iterator[tuple]:
        """(chunk ref, unit index) per window task, in plan order; one object-store copy per chunk."""
        import ray

        for units in self.chunks():
            chunk = ray.put((self.storage, self.rmap, self.cfg, self.plan, units))
            for i in range(len(units.epoch)):
                yield chunk, i

    def __iter__(self) -> Iterator[MicroBatch]:
        """The rank's micro-batches in plan order, read by Ray tasks (task_stream: no Ray Data executor
        in the training worker); memory: prefetch_windows x read_ahead_batches micro-batches.

        In a Ray Train worker the tasks run inside the rank's placement-group bundle, on its node, and
        their CPUs are reserved there by the worker itself (raytrain.worker_resources' reader_cpus,
        raytrain.reader_task_options): never on the head or another node. The tasks themselves ask
        for no free CPU (the stream bounds its own concurrency to prefetch_windows per rank): the
        ranks meet at every collective, so a reader that waits for a free CPU is a cross-rank
        deadlock: rank 0's read-ahead tasks, paused by backpressure, held the demo's only free CPU
        while rank 1's first window waited for it, and rank 0 waited for rank 1 at the first
        all-reduce (seen: the demo's tokenizer stopped at step 0)."""
        from detailflow.pipelines.data.task_stream import ordered_task_stream
        from detailflow.platform.raytrain import reader_task_options

        cfg = self.cfg
        for out in ordered_task_stream(_window_rows, self.task_args(), num_cpus=0,
                                       in_flight=cfg.prefetch_windows, buffered=self.read_ahead_batches,
                                       options=reader_task_options()):
            for i in range(len(out["t"])):
                yield row_to_microbatch({k: v[i:i + 1] for k, v in out.items()})


def _window_rows(chunk: tuple, i: int) -> Iterator[dict]:
    """Ray task (a generator): window unit i of a chunk, one dict per micro-batch (window_task's rows)."""
    storage, rmap, cfg, plan, units = chunk
    yield from window_task({"id": np.array([i])}, storage=storage, rmap=rmap, cfg=cfg, plan=plan, units=units)


def build_degraded_dataset(storage, name: str, split: str, cfg: ReaderConfig, rmap, *, rank: int = 0,
                           world: int = 1, start: Position | None = None):
    """ONE Ray Dataset with rank's micro-batches of cfg.num_epochs epochs (evaluation, tests, benchmarks).

    Training iterates a DegradedStream instead (chunked, so nothing is planned for epochs not reached)."""
    if cfg.num_epochs is None:
        raise ValueError("build_degraded_dataset needs a finite num_epochs; iterate a DegradedStream")
    stream = DegradedStream(storage, name, split, cfg, rmap, rank=rank, world=world, start=start,
                            min_chunk_units=1 << 62)
    return next(stream.datasets())


# ---- consumer ---------------------------------------------------------------------------------------
def row_to_microbatch(row: dict, device="cpu") -> MicroBatch:
    """Decode one emitted row (numpy batch of size 1, index 0) into torch tensors on `device`."""
    import torch

    b, r, c, t = int(row["batch"][0]), int(row["size"][0]), int(row["canvas"][0]), int(row["t"][0])
    images = torch.from_numpy(np.frombuffer(row["images"][0], np.uint8).reshape(b, 3, r, r).copy())
    images = images.to(device, non_blocking=True)
    raw = row["targets"][0]
    if len(raw) == 0:  # t == N: the target is the full image in [-1, 1] (same formula as the reader)
        from detailflow.models.tokenizer import to_model_range

        targets = to_model_range(images)
    else:
        targets = torch.from_numpy(np.frombuffer(raw, np.float32).reshape(b, 3, c, c).copy()).to(device)
    labels = torch.from_numpy(np.frombuffer(row["labels"][0], np.int32).astype(np.int64)).to(device)
    keys = str(row["keys"][0]).split("\n")
    pos = None
    if "epoch" in row:
        pos = Position(int(row["epoch"][0]), int(row["unit"][0]), int(row["index"][0]))
    return MicroBatch(images, targets, t, labels, keys, int(row["skipped"][0]), pos)


def iter_microbatches(ds_or_shard, device="cpu", *, with_info: bool = False, stats: dict | None = None,
                      prefetch_batches: int = 2) -> Iterator:
    """Yield (images uint8 B x 3 x R x R, targets float B x 3 x c x c, t) per micro-batch, or the full
    MicroBatch with with_info=True. `stats` (if given) accumulates batches / images / skipped."""
    # whole blocks (one per Ray task, a few micro-batch rows each): iter_batches(batch_size=1) costs
    # ~0.2 s per row in Ray's batcher here, block iteration almost nothing
    for block in ds_or_shard.iter_batches(batch_size=None, batch_format="numpy",
                                          prefetch_batches=prefetch_batches):
        for i in range(len(block["t"])):
            mb = row_to_microbatch({k: v[i:i + 1] for k, v in block.items()}, device)
            if stats is not None:
                stats["batches"] = stats.get("batches", 0) + 1
                stats["images"] = stats.get("images", 0) + len(mb.keys)
                stats["skipped"] = stats.get("skipped", 0) + mb.skipped
            yield mb if with_info else (mb.images, mb.targets, mb.t)
