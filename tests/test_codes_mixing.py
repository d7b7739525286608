"""Training order of AR codes (code_stream.CodeStream) on the real local S3 + Ray: per epoch one view per
image and a seeded order, both checked against the closed form written out here with numpy (never
with the plan functions under test); exact resume mid-epoch; epochs chained in one stream."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest

from detailflow.pipelines.data import codes
from detailflow.pipelines.data.code_stream import CodeStream, CodeStreamConfig
from detailflow.pipelines.data.plan import next_position

pytestmark = pytest.mark.integration
N_IMAGES, VIEWS, CLASSES, B, WORLD = 400, 4, 10, 8, 2
SHARD_IMAGES, BLOCK, WINDOW = 50, 25, 4


@pytest.fixture(scope="module")
def mix_codes(storage, ray_session):
    # rows in extraction order: the views of an image adjacent, images class-sorted;
    # clean[:, 0] / clean[:, 1] carry the image index / view for the test
    n = N_IMAGES * VIEWS
    img, view = np.repeat(np.arange(N_IMAGES), VIEWS), np.tile(np.arange(VIEWS), N_IMAGES)
    clean = np.zeros((n, 16), np.int64)
    clean[:, 0], clean[:, 1] = img, view
    rows = {"key": [f"img{i:04d}" for i in img], "label": img // (N_IMAGES // CLASSES), "view": view,
            "clean": clean, "input": clean, "target": clean}
    m = codes.write_codes(storage, "mix", "train", rows, shard_rows=SHARD_IMAGES * VIEWS, block_images=BLOCK)
    assert len(m["shards"]) == N_IMAGES // SHARD_IMAGES and m["num_views"] == VIEWS
    return m


def _shard_first_image(manifest: dict) -> list[int]:
    """Manifest order is by shard key (a hash of its first row): the first image of each shard."""
    by_name = {codes.shard_name(f"img{i:04d}", 0): i for i in range(0, N_IMAGES, SHARD_IMAGES)}
    return [by_name[s["name"]] for s in manifest["shards"]]


def _expected(manifest: dict, seed: int, epoch: int, rank: int) -> list[np.ndarray]:
    """Closed form of one rank's epoch: (image, view) rows of each micro-batch."""
    shard_first = _shard_first_image(manifest)
    blocks = N_IMAGES // BLOCK
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(blocks)
    w = min(WINDOW, blocks // WORLD)
    out = []
    for window in range(rank, -(-blocks // w), WORLD):
        rows = []
        for g in order[window * w:(window + 1) * w]:
            j = int(np.random.default_rng([seed, epoch, int(g), 0xD1A6]).integers(VIEWS))
            first = shard_first[g // (SHARD_IMAGES // BLOCK)] + (g % (SHARD_IMAGES // BLOCK)) * BLOCK
            rows += [(first + p, (p + j) % VIEWS) for p in range(BLOCK)]
        rows = np.asarray(rows)[np.random.default_rng([seed, epoch, window, 0xA11]).permutation(len(rows))]
        out += [rows[i * B:(i + 1) * B] for i in range(len(rows) // B)]
    return out


def _cfg(seed: int) -> CodeStreamConfig:
    return CodeStreamConfig(micro_batch=B, seed=seed, correction_prob=0.3, window_groups=WINDOW)


def test_view_and_order_are_the_closed_form_of_seed_and_epoch(storage, mix_codes):
    seen = {}
    for rank in range(WORLD):
        got = list(CodeStream(storage, "mix", "train", _cfg(3), rank=rank, world=WORLD, epochs=2))
        want = _expected(mix_codes, 3, 0, rank) + _expected(mix_codes, 3, 1, rank)
        assert len(got) == len(want) > 0  # both epochs in one uninterrupted stream
        for b, rows in zip(got, want, strict=True):
            np.testing.assert_array_equal(b["clean"][:, :2].numpy(), rows)
            assert b["position"].epoch in (0, 1) and (b["view"].numpy() == rows[:, 1]).all()
            seen.setdefault(b["position"].epoch, []).append(rows)
    for rows in seen.values():  # each image at most once per epoch, all but the dropped remainders
        imgs = np.concatenate(rows)[:, 0]
        assert len(set(imgs.tolist())) == len(imgs) >= N_IMAGES - (N_IMAGES // BLOCK // WINDOW) * (B - 1)
    v0 = dict(np.concatenate(seen[0]).tolist())
    v1 = dict(np.concatenate(seen[1]).tolist())
    both = sorted(set(v0) & set(v1))
    counts = np.bincount(list(v0.values()), minlength=VIEWS)
    assert counts.min() > 0.8 * len(v0) / VIEWS  # diagonal layout: views evenly spread in an epoch
    assert np.mean([v0[i] != v1[i] for i in both]) > 0.4  # views change between epochs (random: 0.75)
    # another seed is another order
    other = next(iter(CodeStream(storage, "mix", "train", _cfg(4), rank=0, world=WORLD)))
    np.testing.assert_array_equal(other["clean"][:, :2].numpy(), _expected(mix_codes, 4, 0, 0)[0])


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(storage, mix_codes):
    full = list(islice(CodeStream(storage, "mix", "train", _cfg(5), rank=1, world=WORLD), 40))
    per_epoch = len(_expected(mix_codes, 5, 0, 1))
    for k in (5, per_epoch - 1, per_epoch + 3):  # inside epoch 0, its last batch, inside epoch 1
        rest = list(islice(CodeStream(storage, "mix", "train", _cfg(5), rank=1, world=WORLD,
                                      start=next_position(full[k]["position"])), 40 - k - 1))
        assert [b["position"] for b in rest] == [b["position"] for b in full[k + 1:]]
        for a, b in zip(rest, full[k + 1:], strict=True):
            assert a["key"] == b["key"] and (a["input"] == b["input"]).all()
            assert (a["corrected"] == b["corrected"]).all()
    assert full[per_epoch]["position"].epoch == 1  # the epoch after, not epoch 0 replayed


def test_old_layout_is_refused_with_a_clear_error(storage, mix_codes):
    shards = [{k: v for k, v in s.items() if k != "layout"} for s in mix_codes["shards"]]
    old = {**mix_codes, "shards": shards}
    with pytest.raises(ValueError, match="re-run extract-codes"):
        CodeStream(storage, "mix", "train", _cfg(0), manifest=old)
