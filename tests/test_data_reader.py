"""Streaming reader + code datasets on the real local S3 and Ray: exactly-once splits, seeded crops,
degraded targets, read-time decode failures, multi-epoch streams, code shards, CLI."""

from __future__ import annotations

import io
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from detailflow.models.configs import get_model_config
from detailflow.models.degrade import degrade_to_prefix
from detailflow.models.resolution import ResolutionMap
from detailflow.pipelines.data import codes, synth
from detailflow.pipelines.data.images import center_crop, decode_rgb
from detailflow.pipelines.data.ingest import IngestConfig, ingest
from detailflow.pipelines.data.ingest_shards import encode_table
from detailflow.pipelines.data.reader import (
    ReaderConfig,
    build_degraded_dataset,
    build_image_dataset,
    iter_microbatches,
)

pytestmark = pytest.mark.integration
PER_CLASS = 8  # 80 train images, 10 micro-batches of 8


@pytest.fixture(scope="module")
def rmap():
    return ResolutionMap.from_config(get_model_config("smoke").tokenizer)  # R 32, N 16, g 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, storage, ray_session):
    root = tmp_path_factory.mktemp("shapes")
    synth.write_folder(root, size=40, per_class=PER_CLASS, val_per_class=1, seed=0)
    m = ingest(storage, str(root), IngestConfig(name="rshapes", split="train", shard_mb=0.03, use_ray=False))
    assert m["num_images"] == 10 * PER_CLASS and len(m["shards"]) >= 2
    return m


def _all_keys(storage, manifest):
    keys = []
    for s in manifest["shards"]:
        keys += pq.read_table(io.BytesIO(storage.get_bytes(s["key"])), columns=["key"])["key"].to_pylist()
    return sorted(keys)


def _consume_ranks(storage, cfg, rmap, n):
    """Drain the n per-rank datasets concurrently (as n Ray Train workers would)."""
    results = [[] for _ in range(n)]

    def run(i):
        ds = build_degraded_dataset(storage, "rshapes", "train", cfg, rmap, rank=i, world=n)
        results[i] = list(iter_microbatches(ds, with_info=True))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def test_every_image_once_across_two_workers(shapes, storage, rmap):
    cfg = ReaderConfig(image_size=32, micro_batch=8, train=False)
    per_worker = _consume_ranks(storage, cfg, rmap, 2)
    keys = [k for w in per_worker for mb in w for k in mb.keys]
    assert sorted(keys) == _all_keys(storage, shapes)  # each good image exactly once
    assert all(len(w) > 0 for w in per_worker)
    originals = {}
    for s in shapes["shards"]:
        t = pq.read_table(io.BytesIO(storage.get_bytes(s["key"])))
        originals.update(zip(t["key"].to_pylist(), t["image"].to_pylist(), strict=True))
    mb = per_worker[0][0]
    assert mb.images.dtype == torch.uint8 and mb.images.shape == (8, 3, 32, 32) and mb.t == rmap.num_tokens
    for key, img in zip(mb.keys, mb.images, strict=True):  # eval: centre crop of the decoded original
        assert np.array_equal(img.numpy(), center_crop(decode_rgb(originals[key]), 32))
    assert torch.equal(mb.targets, mb.images.float() / 127.5 - 1)


def _images_by_key(storage, cfg):
    ds = build_image_dataset(storage, "rshapes", "train", cfg)
    out = {}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        out.update({str(k): img for k, img in zip(b["key"], b["image"], strict=True)})
    return out


def test_train_crops_and_flips_are_seeded(shapes, storage):
    cfg = ReaderConfig(image_size=32, micro_batch=8, seed=7)
    a, b = _images_by_key(storage, cfg), _images_by_key(storage, cfg)
    assert len(a) == 80 and a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same seed: identical, whatever the scheduling


def test_train_microbatches_targets_and_t(shapes, storage, rmap):
    cfg = ReaderConfig(image_size=32, micro_batch=8, degrade_prob=0.7, seed=3, num_epochs=2)
    stats: dict = {}
    mbs = list(iter_microbatches(build_degraded_dataset(storage, "rshapes", "train", cfg, rmap),
                                 with_info=True, stats=stats))
    assert len(mbs) == 20 and stats == {"batches": 20, "images": 160, "skipped": 0}  # 2 epochs x 10
    keys = [k for mb in mbs for k in mb.keys]
    assert sorted(keys) == sorted(_all_keys(storage, shapes) * 2)
    seen: dict[str, list] = {}
    for mb in mbs:
        for k, img in zip(mb.keys, mb.images, strict=True):
            seen.setdefault(k, []).append(img)
    # each epoch re-draws crops and flips (same image twice only by chance)
    assert sum(not torch.equal(*imgs) for imgs in seen.values()) > 60
    assert any(mb.t < rmap.num_tokens for mb in mbs)
    for mb in mbs:
        assert mb.t in rmap.admissible
        c = rmap.canvas_size(mb.t)
        assert mb.targets.shape == (8, 3, c, c) and mb.targets.dtype == torch.float32
        assert torch.equal(mb.targets, degrade_to_prefix(mb.images.float() / 127.5 - 1, mb.t, rmap))


def test_eval_fixed_t_and_all_t(shapes, storage, rmap):
    cfg = ReaderConfig(image_size=32, micro_batch=16, train=False, fixed_t=8)
    fixed = list(iter_microbatches(build_degraded_dataset(storage, "rshapes", "train", cfg, rmap)))
    assert {t for _, _, t in fixed} == {8} and sum(img.shape[0] for img, _, _ in fixed) == 80  # 3-tuples
    c = rmap.canvas_size(8)
    assert all(tgt.shape == (img.shape[0], 3, c, c) for img, tgt, _ in fixed)
    cfg = ReaderConfig(image_size=32, micro_batch=40, train=False, all_t=True)
    every = list(iter_microbatches(build_degraded_dataset(storage, "rshapes", "train", cfg, rmap),
                                   with_info=True))
    assert sorted(mb.t for mb in every) == sorted(rmap.admissible * 2)


def test_read_time_decode_failures_are_skipped_and_counted(shapes, storage, rmap):
    good = pq.read_table(io.BytesIO(storage.get_bytes(shapes["shards"][0]["key"]))).to_pylist()[:6]
    rows = [(r["key"], r["label"], r["image"], r["width"], r["height"]) for r in good]
    rows[1] = ("bad/a.png", 0, b"\x89PNG garbage", 1, 1)
    rows[4] = ("bad/b.png", 0, good[4]["image"][:40], 1, 1)  # truncated after ingest-time checks
    prefix = "datasets/broken/train"
    sha = storage.put_bytes(f"{prefix}/part-00000.parquet", data := encode_table(rows, 256))
    shard = {"name": "part-00000.parquet", "key": f"{prefix}/part-00000.parquet", "sha256": sha, "rows": 6,
             "bytes": len(data)}
    storage.publish_manifest(prefix, {"shards": [shard], "num_images": 6,
                                      "files": {"part-00000.parquet": {"sha256": sha}}})
    stats: dict = {}
    mbs = list(iter_microbatches(build_degraded_dataset(
        storage, "broken", "train", ReaderConfig(image_size=32, micro_batch=2, train=False), rmap),
        stats=stats, with_info=True))
    assert stats["images"] == 4 and stats["skipped"] == 2
    assert not any(k.startswith("bad/") for mb in mbs for k in mb.keys)


def test_code_shards_round_trip(storage, ray_session):
    rng = np.random.default_rng(0)
    n, length = 50, 16
    clean = rng.integers(0, 64, (n, length))
    rows = {"key": [f"k{i // 2}" for i in range(n)], "label": rng.integers(0, 10, n),
            "view": np.arange(n) % 2, "clean": clean, "input": (clean + 1) % 64, "target": (clean + 2) % 64}
    m = codes.write_codes(storage, "tok-test", "train", rows, shard_rows=20, meta={"tokenizer": "smoke"})
    assert m["num_rows"] == n and len(m["shards"]) == 3 and m["num_tokens"] == length
    run = codes.run_prefix("tok-test", "train", m["run"])  # shards live in the run's own prefix
    assert all(s["key"].startswith(run + "/part-") for s in m["shards"]) and m["num_views"] == 2
    ds = codes.read_codes_dataset(storage, "tok-test", "train")
    batches = list(codes.iter_code_batches(ds, batch_size=8, correction_prob=0.5, seed=0, drop_last=False))
    assert sum(len(b["label"]) for b in batches) == n
    for b in batches:
        assert b["input"].dtype == torch.int64 and b["input"].shape[1] == length
        used = b["corrected"]
        assert torch.equal(b["input"][~used], b["clean"][~used])
        assert torch.equal(b["target"][used], (b["clean"][used] + 2) % 64)
    with pytest.raises(FileNotFoundError, match="not published"):
        codes.read_codes_dataset(storage, "tok-missing", "train")


def test_cli_synth_ingest_show(storage, ray_session, tmp_path):
    from detailflow.cli import main

    runner = CliRunner()
    for args in (["data", "--help"], ["data", "ingest", "--help"], ["data", "synth", "--help"]):
        assert runner.invoke(main, args).exit_code == 0
    r = runner.invoke(main, ["data", "synth", "--out", str(tmp_path / "s"), "--per-class", "2",
                             "--size", "16"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["data", "ingest", str(tmp_path / "s"), "--name", "clitest", "--local"])
    assert r.exit_code == 0 and "20 images, 10 classes" in r.output, r.output
    r = runner.invoke(main, ["data", "show", "clitest", "--out", str(tmp_path / "sheet.png")])
    assert r.exit_code == 0 and (tmp_path / "sheet.png").stat().st_size > 0, r.output
    assert runner.invoke(main, ["data", "verify", "clitest"]).exit_code == 0
    r = runner.invoke(main, ["data", "show", "nosuchset"])
    assert r.exit_code == 1 and "not published" in r.output


def test_stream_resumes_at_the_next_planned_microbatch(shapes, storage, rmap):
    """A DegradedStream restarted at a position yields exactly the rest of the plan, in plan order,
    with the same images and t as the uninterrupted stream."""
    from itertools import islice

    from detailflow.pipelines.data.plan import next_position
    from detailflow.pipelines.data.reader import DegradedStream, epoch_plan

    cfg = ReaderConfig(image_size=32, micro_batch=4, seed=5, num_epochs=None, window_groups=1)
    full = list(islice(DegradedStream(storage, "rshapes", "train", cfg, rmap, rank=1, world=2,
                                      min_chunk_units=2), 30))
    plan = epoch_plan(shapes, cfg, world=2)
    assert [mb.position for mb in full] == list(islice(plan.iter_positions(rank=1), 30))  # planned order
    cut = 13
    rest = list(islice(DegradedStream(storage, "rshapes", "train", cfg, rmap, rank=1, world=2,
                                      start=next_position(full[cut - 1].position)), 30 - cut))
    assert [mb.position for mb in rest] == [mb.position for mb in full[cut:]]
    for a, b in zip(rest, full[cut:], strict=True):
        assert a.keys == b.keys and a.t == b.t and torch.equal(a.images, b.images)


def test_reader_refuses_a_shard_that_differs_from_its_manifest(shapes, storage, rmap):
    from detailflow.pipelines.data.reader import ShardMismatch

    bad = dict(shapes, shards=[dict(s, bytes=s["bytes"] + 1) for s in shapes["shards"]])
    cfg = ReaderConfig(image_size=32, micro_batch=8, train=False)
    from detailflow.pipelines.data.reader import DegradedStream

    with pytest.raises(Exception, match="manifest says") as info:
        next(iter(DegradedStream(storage, "rshapes", "train", cfg, rmap, manifest=bad)))
    assert "ShardMismatch" in repr(info.value) or isinstance(info.value, ShardMismatch)


def test_shared_t_is_equal_on_every_rank_at_every_step(shapes, storage, rmap):
    """With world > 1 the trainer sets shared_t: the ranks read different images but draw the same t
    at the same step (from the step, no broadcast); without it the draws are per micro-batch."""
    from itertools import islice

    from detailflow.pipelines.data.reader import DegradedStream

    def ts(shared, rank, start_step=0):
        cfg = ReaderConfig(image_size=32, micro_batch=4, seed=2, degrade_prob=0.9, num_epochs=None,
                           window_groups=1, shared_t=shared)
        return [(mb.t, mb.keys[0]) for mb in islice(DegradedStream(
            storage, "rshapes", "train", cfg, rmap, rank=rank, world=2, start_step=start_step), 12)]

    a, b = ts(True, 0), ts(True, 1)
    assert [t for t, _ in a] == [t for t, _ in b] and len({t for t, _ in a}) > 1
    assert not {k for _, k in a} & {k for _, k in b}  # different images, same t
    plain0, plain1 = ts(False, 0), ts(False, 1)
    assert [t for t, _ in plain0] != [t for t, _ in plain1]


@pytest.mark.parametrize("prefetch_windows,prefetch_batches", [(1, 1), (2, 4)])
def test_training_stream_equals_the_one_pass_dataset(shapes, storage, rmap, prefetch_windows,
                                                     prefetch_batches):
    """The training path (DegradedStream: ordered Ray tasks, several chunks) and the one-pass Ray
    Dataset (build_degraded_dataset, whose exactly-once split is tested above) emit the same
    micro-batches in the same order: same keys, t, images, targets and plan positions."""
    from detailflow.pipelines.data.reader import DegradedStream

    cfg = ReaderConfig(image_size=32, micro_batch=4, seed=3, num_epochs=3, window_groups=2,
                       prefetch_windows=prefetch_windows, prefetch_batches=prefetch_batches)
    stream = list(DegradedStream(storage, "rshapes", "train", cfg, rmap, rank=0, world=2, min_chunk_units=2))
    one_pass = list(iter_microbatches(build_degraded_dataset(storage, "rshapes", "train", cfg, rmap,
                                                             rank=0, world=2), with_info=True))
    assert len(stream) == len(one_pass) > 10 and {mb.position.epoch for mb in stream} == {0, 1, 2}
    for a, b in zip(stream, one_pass, strict=True):
        assert (a.position, a.keys, a.t) == (b.position, b.keys, b.t)
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


def test_rank_streams_in_lockstep_need_no_free_cpu(shapes, storage, rmap):
    """Ranks meet at every all-reduce, so a reader that must wait for a free CPU can deadlock them (the
    read-ahead of one rank, paused by backpressure, holding the CPU the other rank's reader needs).
    With every CPU of the cluster reserved, two rank streams consumed in lockstep still advance."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from detailflow.pipelines.data.reader import DegradedStream

    pg = placement_group([{"CPU": ray.available_resources()["CPU"]}])  # trainers + others hold them all
    ray.get(pg.ready(), timeout=60)
    cfg = ReaderConfig(image_size=32, micro_batch=4, seed=1, num_epochs=None, window_groups=1,
                       prefetch_windows=2, prefetch_batches=1)
    steps = []

    def lockstep():
        ranks = [iter(DegradedStream(storage, "rshapes", "train", cfg, rmap, rank=r, world=2))
                 for r in (0, 1)]
        for _ in range(12):
            steps.append([next(it).position for it in ranks])

    worker = threading.Thread(target=lockstep, daemon=True)
    try:
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive(), f"the streams stalled after {len(steps)} steps"
        assert len(steps) == 12
    finally:
        remove_placement_group(pg)
