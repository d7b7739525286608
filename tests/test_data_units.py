"""Unit tests of the data plane that need no services: decode, crops, synth, IDX, t draws, code pairs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from detailflow.models.configs import get_model_config
from detailflow.models.degrade import degrade_to_prefix, prefix_probabilities
from detailflow.models.resolution import ResolutionMap
from detailflow.pipelines.data import codes, idx, images, reader, synth


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w=40, h=30, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---- decode --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: _encode(_rgb().convert("CMYK"), "JPEG"),
    lambda: _encode(_rgb().convert("L"), "PNG"),
    lambda: _encode(_rgb().convert("P"), "PNG"),
    lambda: _encode(_rgb().convert("RGBA"), "PNG"),
    lambda: _encode(_rgb(), "JPEG", quality=90),
])
def test_decode_accepts_modes_and_converts_to_rgb(make):
    data = make()
    w, h, _, _ = images.inspect_image(data)
    img = images.decode_rgb(data)
    assert (w, h) == (40, 30) and img.mode == "RGB" and img.size == (40, 30)


@pytest.mark.parametrize("data,reason", [
    (b"", "zero-byte"),
    (b"this is not an image\n", "cannot identify"),
    (_encode(_rgb(64, 64), "JPEG", quality=95)[:400], "(?i)truncated"),
    (_encode(_rgb(64, 64), "JPEG", quality=95)[:3000], "(?i)truncated"),
])
def test_decode_rejects_bad_bytes_with_reason(data, reason):
    with pytest.raises(images.DecodeError, match=reason):
        images.inspect_image(data)
    with pytest.raises(images.DecodeError):
        images.decode_rgb(data)


def test_jpeg_draft_keeps_short_side_and_is_close():
    big = Image.fromarray(synth.render(3, 512, np.random.default_rng(0))).resize((600, 512))
    data = _encode(big, "JPEG", quality=95)
    full = images.center_crop(images.decode_rgb(data), 64).astype(float)
    draft = images.center_crop(images.decode_rgb(data, draft_size=80), 64).astype(float)
    assert np.abs(full - draft).mean() < 8.0  # DCT scaling ~ box filter: small differences only


# ---- crops ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(40, 30), (300, 200), (64, 64)])
def test_random_resized_crop_shape_and_determinism(size):
    img = _rgb(*size)
    a = images.random_resized_crop(img, 32, images.row_rng(1, 0, "k"))
    b = images.random_resized_crop(img, 32, images.row_rng(1, 0, "k"))
    c = images.random_resized_crop(img, 32, images.row_rng(1, 1, "k"))
    assert a.shape == (3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)  # another epoch, another crop


def test_flip_and_short_side_distribution():
    # a horizontal ramp: a flipped crop decreases left to right
    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (256, 1, 3)))
    flips, shorts = 0, set()
    for i in range(200):
        rng = images.row_rng(0, 0, f"k{i}")
        shorts.add(int(images.row_rng(0, 0, f"k{i}").integers(32, 41)))
        arr = images.random_resized_crop(ramp, 32, rng)
        flips += int(arr[0, 0, 0] > arr[0, 0, -1])
    assert 70 < flips < 130  # p = 0.5
    assert shorts == set(range(32, 41))  # short side uniform over [R, 1.25 R]
    no_flip = [images.random_resized_crop(ramp, 32, images.row_rng(0, 0, f"k{i}"), flip=False)
               for i in range(20)]
    assert all(a[0, 0, 0] <= a[0, 0, -1] for a in no_flip)


def test_center_crop_is_centred():
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, 10:50] = 255  # exactly the centre 40 x 40 square
    out = images.center_crop(Image.fromarray(arr), 40)
    assert out.shape == (3, 40, 40) and out.min() == 255
    assert images.center_crop(Image.fromarray(arr), 20).shape == (3, 20, 20)


def test_row_rng_depends_on_key_only():
    draws = [images.row_rng(5, 2, k).integers(0, 1 << 30) for k in ["a", "b", "a"]]
    assert draws[0] == draws[2] != draws[1]


# ---- synth ---------------------------------------------------------------------------------------
def test_synth_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth.write_folder(a, size=16, per_class=2, val_per_class=1, seed=3)
    synth.write_folder(b, size=16, per_class=2, val_per_class=1, seed=3)
    fa = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(fa) == 30 and fa == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)
    assert sorted(d.name for d in (a / "train").iterdir()) == synth.CLASS_NAMES
    other = synth.render(0, 16, np.random.default_rng([4, 0, 0, 0]))
    assert not np.array_equal(other, np.asarray(Image.open(a / "train" / synth.CLASS_NAMES[0] /
                                                           f"{synth.CLASS_NAMES[0]}_000000.png")))


@pytest.mark.parametrize("class_id", range(10))
def test_synth_class_conditional_stripes_and_palette(class_id):
    shape_id, pal = divmod(class_id, 2)
    period = 2 + pal
    stripe_a, stripe_b = (np.round(np.array(c) * 255) for c in synth._PALETTE_COLOURS[pal][:2])
    for seed in range(3):
        img = synth.render(class_id, 48, np.random.default_rng(seed)).astype(int)
        in_a = np.all(np.abs(img - stripe_a) <= 1, axis=-1)
        in_b = np.all(np.abs(img - stripe_b) <= 1, axis=-1)
        shape = in_a | in_b
        assert shape.sum() > 48  # the shape is there, painted in its palette's stripe colours
        # stripes repeat with the class's period along x (even shapes) or y (odd shapes)
        ax = 1 if shape_id % 2 == 0 else 0
        both = shape & np.roll(shape, -period, axis=ax)
        both[(slice(None), slice(-period, None)) if ax == 1 else (slice(-period, None), slice(None))] = False
        assert np.array_equal(in_a[both], np.roll(in_a, -period, axis=ax)[both])
        nxt = shape & np.roll(shape, -1, axis=ax)
        assert (in_a[nxt] != np.roll(in_a, -1, axis=ax)[nxt]).mean() > 0.3  # not constant: real stripes


# ---- IDX -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["imgs.idx", "imgs.idx.gz"])
def test_idx_round_trip_and_import(tmp_path, name):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1, 0, 2, 2], np.uint8)
    idx.write_idx(tmp_path / name, imgs)
    idx.write_idx(tmp_path / "labels.idx", labels)
    assert np.array_equal(idx.read_idx(tmp_path / name), imgs)
    counts = idx.import_idx(tmp_path / name, tmp_path / "labels.idx", tmp_path / "out", split="train")
    assert sorted(counts.values()) == [2, 2, 3]
    files = sorted((tmp_path / "out" / "train").rglob("*.png"))
    assert len(files) == 7
    third = np.asarray(Image.open(tmp_path / "out/train/01_trouser/train_000003.png"))
    assert third.shape == (32, 32, 3) and np.array_equal(third[2:30, 2:30, 1], imgs[3])
    assert third[:2].max() == 0  # zero padding, no resampling


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        idx.read_idx(tmp_path / "bad")
    idx.write_idx(tmp_path / "short", np.zeros((3, 4, 4), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-5])
    with pytest.raises(ValueError, match="payload"):
        idx.read_idx(tmp_path / "short")


# ---- t draws and targets of the reader's micro-batch stage -----------------------------------------
@pytest.fixture
def rmap():
    return ResolutionMap.from_config(get_model_config("smoke").tokenizer)


def test_reader_t_draws_follow_spec_distribution(rmap):
    from scipy.stats import chisquare

    from detailflow.models.degrade import sample_prefix_len

    probs = prefix_probabilities(rmap, 0.2)
    n = 20000
    draws = [sample_prefix_len(rmap, 0.2, reader.prefix_rng(0, 0, f"n{i:06d}/x.png")) for i in range(n)]
    support = sorted(probs)
    observed = np.array([draws.count(t) for t in support])
    assert observed.sum() == n  # nothing outside the support
    assert chisquare(observed, np.array([probs[t] for t in support]) * n).pvalue > 1e-3


@pytest.mark.parametrize("train,fixed_t,all_t", [(True, None, False), (False, 8, False), (False, None, True),
                                                 (False, None, False)])
def test_degrade_batch_rows_match_degrade_to_prefix(rmap, train, fixed_t, all_t):
    rng = np.random.default_rng(0)
    b = 4
    batch = {"key": np.array([f"k{i}" for i in range(b)], dtype=object),
             "label": np.arange(b, dtype=np.int32),
             "image": rng.integers(0, 256, (b, 3, 32, 32), dtype=np.uint8), "skipped": np.array([2, 0, 0, 0])}
    out = reader.degrade_batch(batch, rmap=rmap, micro_batch=b, degrade_prob=1.0, seed=0, epoch=0,
                               train=train, fixed_t=fixed_t, all_t=all_t)
    expect_ts = rmap.admissible if all_t else ([fixed_t] if fixed_t else None)
    assert len(out["t"]) == (len(rmap.admissible) if all_t else 1)
    if expect_ts:
        assert list(out["t"]) == expect_ts
    if not train and not fixed_t and not all_t:
        assert list(out["t"]) == [rmap.num_tokens]  # eval default: full prefix
    if train:
        assert out["t"][0] < rmap.num_tokens  # degrade_prob = 1
    x = torch.from_numpy(batch["image"]).float() / 127.5 - 1
    for i in range(len(out["t"])):
        mb = reader.row_to_microbatch({k: v[i:i + 1] for k, v in out.items()})
        assert torch.equal(mb.images, torch.from_numpy(batch["image"]))
        assert mb.targets.shape[-1] == rmap.canvas_size(mb.t)
        assert torch.equal(mb.targets, degrade_to_prefix(x, mb.t, rmap))
        assert mb.keys == list(batch["key"]) and mb.labels.tolist() == list(range(b))
    assert int(np.sum(out["skipped"])) == 2  # counted once, even with all_t


def test_degrade_batch_drops_partial_batch_in_train_only(rmap):
    batch = {"key": np.array(["a", "b"], dtype=object), "label": np.zeros(2, np.int32),
             "image": np.zeros((2, 3, 32, 32), np.uint8), "skipped": np.zeros(2, np.int32)}
    kw = dict(rmap=rmap, micro_batch=4, degrade_prob=0.2, seed=0, epoch=0, fixed_t=None, all_t=False)
    assert len(reader.degrade_batch(batch, train=True, **kw)["t"]) == 0
    assert list(reader.degrade_batch(batch, train=False, **kw)["batch"]) == [2]


def test_decode_crop_batch_skips_and_counts_failures():
    good = _encode(_rgb(40, 40), "PNG")
    batch = {"key": np.array(["a", "bad", "c", "zero"], dtype=object), "label": np.array([1, 2, 3, 4]),
             "image": np.array([good, b"junk", good, b""], dtype=object)}
    out = reader.decode_crop_batch(batch, image_size=16, seed=0, epoch=0, train=True, flip=True,
                                   max_scale=1.25, jpeg_draft=True)
    assert sorted(out["key"]) == ["a", "c"] and out["image"].shape == (2, 3, 16, 16)
    assert out["skipped"].sum() == 2
    again = reader.decode_crop_batch(batch, image_size=16, seed=0, epoch=0, train=True, flip=True,
                                     max_scale=1.25, jpeg_draft=True)
    assert np.array_equal(out["image"], again["image"])


# ---- code pair selection -------------------------------------------------------------------------
def test_code_pair_selection_probability_and_determinism():
    n, length = 4000, 8
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 64, (n, length))
    batch = {"key": np.array([f"k{i}" for i in range(n)], dtype=object), "view": np.zeros(n, np.int32),
             "label": np.zeros(n, np.int32), "clean": clean, "input": clean + 100, "target": clean + 200}
    sel = codes.select_pairs(batch, 0.3, seed=1)
    frac = sel["corrected"].mean()
    assert abs(frac - 0.3) < 0.03
    assert np.array_equal(sel["input"][sel["corrected"]], clean[sel["corrected"]] + 100)
    assert np.array_equal(sel["target"][~sel["corrected"]], clean[~sel["corrected"]])
    assert np.array_equal(sel["corrected"], codes.select_pairs(batch, 0.3, seed=1)["corrected"])
    assert not np.array_equal(sel["corrected"], codes.select_pairs(batch, 0.3, seed=1, epoch=1)["corrected"])
