"""The AR code stream's plan at ImageNet ten-crop size (1,281,167 images x 10 views in 1,300 shards,
simulated: manifest only, no data): the driver state is O(blocks), built in well under a second."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np

from detailflow.pipelines.data.code_stream import CodeStream, CodeStreamConfig, simulated_manifest

IMAGENET_TRAIN, VIEWS, SHARDS = 1_281_167, 10, 1300


def imagenet_code_manifest(images: int = IMAGENET_TRAIN) -> dict:
    return simulated_manifest(images, SHARDS, VIEWS)


def _plan_cost(manifest: dict, world: int) -> tuple[float, int, int]:
    """(seconds, tracemalloc peak bytes, batches of rank 0's epoch 3) of planning one epoch."""
    tracemalloc.start()
    t0 = time.perf_counter()
    stream = CodeStream(None, "in", "train", CodeStreamConfig(micro_batch=64), rank=0, world=world,
                        manifest=manifest)
    plan = stream.plan
    batches = sum(plan.window_batch_count(3, w) for w in plan.rank_windows(3, 0))
    wall = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return wall, peak, batches


def test_imagenet_sized_code_plan_is_o_blocks():
    m = imagenet_code_manifest()
    wall, peak, batches = _plan_cost(m, world=64)
    blocks = sum(s["blocks"] for s in m["shards"])
    assert blocks == 16 * SHARDS  # ~985 images per shard: MIN_BLOCKS = 16 blocks of ~62
    # windows of min(16, 20800 // 64) = 16 blocks: 1300 windows, rank 0 reads 0, 64, ..., 1280 (21)
    share = IMAGENET_TRAIN * 21 / 1300
    assert 0.9 * share / 64 < batches < 1.1 * share / 64, batches
    # one int64 per row would be 102 MB; the plan holds a few ints per block (+ the manifest's dicts)
    assert peak < 2e6 and wall < 2.0, (peak, wall)
    # ten times the images in the same shards: memory grows with blocks (x10), not with rows (x100)
    _, peak10, _ = _plan_cost(imagenet_code_manifest(IMAGENET_TRAIN * 10), world=64)
    assert peak10 < 10 * peak


def test_every_image_once_per_epoch_across_ranks_at_scale():
    """Across the 64 ranks of an epoch each block is read by exactly one window (the blocks' union is
    the whole set, no overlap)."""
    plan = CodeStream(None, "in", "train", CodeStreamConfig(micro_batch=64), rank=0, world=64,
                      manifest=imagenet_code_manifest()).plan
    members = np.concatenate([plan.window_groups_of(7, w) for w in range(plan.num_windows)])
    assert np.array_equal(np.sort(members), np.arange(16 * SHARDS))
