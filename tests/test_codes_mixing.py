"""Training order of AR codes, measured on the real local S3 + Ray: one view per image per epoch,
globally shuffled, new micro-batch membership every epoch. The reference numbers come from
simulating uniformly random permutations here (numpy), never from the code under test."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from detailflow.pipelines.data import codes

pytestmark = pytest.mark.integration
N_IMAGES, VIEWS, CLASSES, B, WORKERS = 400, 4, 10, 8, 2


@pytest.fixture(scope="module")
def mix_codes(storage, ray_session):
    # rows in extraction order: the views of an image adjacent, images class-sorted (the worst case
    # for reading in file order); clean[:, 0] / clean[:, 1] carry the image index / view for the test
    n = N_IMAGES * VIEWS
    img, view = np.repeat(np.arange(N_IMAGES), VIEWS), np.tile(np.arange(VIEWS), N_IMAGES)
    clean = np.zeros((n, 16), np.int64)
    clean[:, 0], clean[:, 1] = img, view
    rows = {"key": [f"img{i:04d}" for i in img], "label": img // (N_IMAGES // CLASSES), "view": view,
            "clean": clean, "input": clean, "target": clean}
    m = codes.write_codes(storage, "mix", "train", rows, shard_rows=200)
    assert len(m["shards"]) == 8 and m["num_views"] == VIEWS
    return m


def _epochs(ds, n_epochs: int) -> list[list[np.ndarray]]:
    """Consume like Ray Train: WORKERS streaming_split iterators, each epoch one pass per worker.
    Returns, per epoch, every micro-batch as an array of (image, view) rows."""
    its = ds.streaming_split(WORKERS, equal=True)
    out = [[[] for _ in range(n_epochs)] for _ in range(WORKERS)]

    def run(w):
        for e in range(n_epochs):
            for b in codes.iter_code_batches(its[w], B, correction_prob=0.3, seed=0):
                out[w][e].append(b["clean"][:, :2].numpy())

    threads = [threading.Thread(target=run, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return [[mb for w in range(WORKERS) for mb in out[w][e]] for e in range(n_epochs)]


def _pairs(batches: list[np.ndarray]) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for mb in batches for a in mb for b in mb if a < b}


def _stats(epochs: list[list[np.ndarray]]) -> dict:
    imgs = [[mb[:, 0] for mb in e] for e in epochs]
    p0, p1 = _pairs(imgs[0]), _pairs(imgs[1])
    neighbour = [np.mean([abs(a - b) < B for a, b in _pairs(e)]) for e in imgs]
    labels = [len(set((mb // (N_IMAGES // CLASSES)).tolist())) for e in imgs for mb in e]
    return {"cross_epoch_pair_overlap": len(p0 & p1), "pairs_per_epoch": len(p0),
            "neighbour_pair_fraction": float(np.mean(neighbour)), "labels_per_batch": float(np.mean(labels)),
            "max_rows_of_one_image_in_a_batch": max(int(np.bincount(mb).max()) for e in imgs for mb in e)}


def _simulated(n_sims: int = 300) -> dict:
    """The same statistics for independent uniformly random permutations, batches cut as the workers
    cut them (WORKERS equal parts, batches of B, remainder dropped)."""
    rng = np.random.default_rng(123)

    def epoch():
        perm = rng.permutation(N_IMAGES)
        per = N_IMAGES // WORKERS
        parts = [perm[w * per:(w + 1) * per] for w in range(WORKERS)]
        return [part[i * B:(i + 1) * B] for part in parts for i in range(per // B)]

    sims = [_stats([[np.stack([mb, mb], 1) for mb in epoch()] for _ in range(2)]) for _ in range(n_sims)]
    return {k: (float(np.mean([s[k] for s in sims])), float(np.std([s[k] for s in sims]))) for k in sims[0]}


def test_one_view_per_image_globally_shuffled_every_epoch(storage, mix_codes):
    ds = codes.shuffled_codes_dataset(storage, "mix", "train", seed=0)
    epochs = _epochs(ds, 2)
    for e in epochs:  # every image exactly once per epoch, so no micro-batch holds two rows of one image
        assert sorted(np.concatenate([mb[:, 0] for mb in e]).tolist()) == list(range(N_IMAGES))
    view = [dict(np.concatenate(e).tolist()) for e in epochs]
    counts = np.bincount(list(view[0].values()), minlength=VIEWS)
    changed = np.mean([view[0][i] != view[1][i] for i in range(N_IMAGES)])
    got, ref = _stats(epochs), _simulated()
    before = _stats(_epochs(codes.read_codes_dataset(storage, "mix", "train"), 2))  # file order, all views
    closed_form = ref["pairs_per_epoch"][0] ** 2 / (N_IMAGES * (N_IMAGES - 1) / 2)
    print(f"\nviews chosen in epoch 0: {counts.tolist()} (uniform: {N_IMAGES // VIEWS} each); "
          f"changed between epochs: {changed:.3f} (random: {1 - 1 / VIEWS:.3f})")
    print(f"closed-form expected cross-epoch pair overlap: {closed_form:.1f}")
    for k in got:
        print(f"{k:34s} measured {got[k]:8.3f}   random {ref[k][0]:8.3f} +- {ref[k][1]:.3f}   "
              f"file order (before) {before[k]:8.3f}")
    assert got["max_rows_of_one_image_in_a_batch"] == 1 and before["max_rows_of_one_image_in_a_batch"] > 1
    assert abs(changed - (1 - 1 / VIEWS)) < 0.1 and counts.min() > 0.6 * N_IMAGES / VIEWS
    for k in ("cross_epoch_pair_overlap", "neighbour_pair_fraction", "labels_per_batch"):
        mean, std = ref[k]
        assert abs(got[k] - mean) < 5 * std + 1e-9, (k, got[k], ref[k])
        assert abs(before[k] - mean) > 5 * std, k  # the measure does catch file-order batches


def _rows(ds) -> list[tuple[int, int, int]]:
    """(epoch, image, view) of every row of one pass, in order (one consumer)."""
    out = []
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        out += [(int(e), int(c[0]), int(c[1])) for e, c in zip(b["epoch"], b["clean"], strict=True)]
    return out


def test_epochs_chained_into_one_pass_equal_the_passes_one_epoch_each(storage, mix_codes):
    """A small set chains K epochs into one execution: pass 0 of K = 2 is exactly epochs 0 and 1 of
    K = 1 (same views, same order), pass 1 continues with epochs 2 and 3."""
    one = codes.shuffled_codes_dataset(storage, "mix", "train", seed=4)
    two = codes.shuffled_codes_dataset(storage, "mix", "train", seed=4, epochs_per_pass=2)
    singles = [_rows(one) for _ in range(4)]
    chained = [_rows(two) for _ in range(2)]
    assert chained[0] == singles[0] + singles[1] and chained[1] == singles[2] + singles[3]
    assert [sorted({e for e, _, _ in p}) for p in chained] == [[0, 1], [2, 3]]
    for p in singles:  # each epoch: every image once
        assert sorted(i for _, i, _ in p) == list(range(N_IMAGES))


@pytest.mark.parametrize("rows,views,min_images,expected", [
    (1600, 4, 1000, 3),             # 400 images: 3 epochs reach 1,000
    (1600, 4, 400, 1),
    (12_811_670, 10, 20_000, 1),    # ImageNet ten-crop codes: one epoch per pass
    (640, 1, 20_000, 32),           # the demo's shapes set
])
def test_epochs_per_pass(rows, views, min_images, expected):
    assert codes.epochs_per_pass({"num_rows": rows, "num_views": views}, min_images) == expected
