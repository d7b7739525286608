"""Code extraction on the real local S3 + Ray: ten-crop views cut from the ORIGINAL image (checked
against the ADM recipe written out here with PIL), worker-written shards behind a pointer manifest,
immutable runs under --force, and shard-size checks on read."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from detailflow.models.configs import get_model_config
from detailflow.models.export import save_pretrained
from detailflow.models.extraction import make_views
from detailflow.models.tokenizer import DetailFlowTokenizer
from detailflow.pipelines.data import codes
from detailflow.pipelines.data.ingest import IngestConfig, ingest
from detailflow.pipelines.data.reader import read_manifest_checked, read_units
from detailflow.pipelines.train.extract_codes import ExtractConfig, decode_originals, extract_codes

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]
R, SIDE = 32, 35  # smoke tokenizer resolution and int(1.1 * R)
SIZES = [(400, 300), (300, 400), (35, 35), (50, 50), (90, 77), (36, 120)]  # (width, height)


def _image(w: int, h: int, seed: int) -> Image.Image:
    """A distinct colour per quadrant and a centre patch, plus per-pixel noise so that any resampling
    or 1-px misplacement changes pixels."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 40, (h, w, 3)).astype(np.uint8)
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]  # TL, TR, BL, BR
    top, left = slice(0, h // 2), slice(0, w // 2)
    bottom, right = slice(h // 2, h), slice(w // 2, w)
    quadrants = [(top, left), (top, right), (bottom, left), (bottom, right)]
    for colour, (ys, xs) in zip(colours, quadrants, strict=True):
        a[ys, xs] += np.array(colour, np.uint8)
    a[h // 2 - h // 8:h // 2 + h // 8, w // 2 - w // 8:w // 2 + w // 8] = (255, 255, 255)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def originals(storage, tmp_path_factory):
    root = tmp_path_factory.mktemp("orig")
    images = {}
    for i, (w, h) in enumerate(SIZES):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        img = _image(w, h, i)
        img.save(d / f"im{i}.png")  # lossless: the stored bytes decode to exactly these pixels
        images[f"c{i % 2}/im{i}.png"] = img
    m = ingest(storage, str(root), IngestConfig(name="codes-orig", split="train", shard_mb=0.05,
                                                use_ray=False))
    assert m["num_images"] == len(SIZES)
    return images


def _adm_crop(img: Image.Image, side: int) -> Image.Image:
    """ADM centre crop (guided-diffusion center_crop_arr), written out independently of images.py."""
    while min(*img.size) >= 2 * side:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = side / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    return img.crop((left, top, left + side, top + side))


def _expected_views(img: Image.Image) -> torch.Tensor:
    """torchvision TenCrop(R) of the ADM crop, with PIL crops: 10 x 3 x R x R in [-1, 1]."""
    big, out = _adm_crop(img, SIDE), []
    for im in (big, ImageOps.mirror(big)):
        c = (SIDE - R) // 2
        for left, top in ((0, 0), (SIDE - R, 0), (0, SIDE - R), (SIDE - R, SIDE - R), (c, c)):
            out.append(np.asarray(im.crop((left, top, left + R, top + R))))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_tencrop_views_are_cut_from_the_original(storage, ray_session, originals):
    units = read_units(read_manifest_checked(storage, "codes-orig", "train"))
    batch = {k: np.asarray([u[k] for u in units], dtype=object) for k in ("path", "row_group", "bytes")}
    crops = {}
    for b in decode_originals(batch, storage=storage, side=SIDE):
        crops.update(zip(b["key"], b["image"], strict=True))
    assert sorted(crops) == sorted(originals)
    for key, img in originals.items():
        views = make_views(torch.from_numpy(crops[key])[None], "tencrop", R)[0]
        assert torch.equal(views, _expected_views(img)), key
        # quadrant colours: the TL view starts in the red quadrant, the flipped TL view in the green one
        assert views[0, 0, 0, 0] > 0.4 and views[5, 1, 0, 0] > 0.4
        w, h = img.size
        if (w, h) == (SIDE, SIDE):  # already the 1.1 R crop: views are exact sub-arrays, no resampling
            a = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1
            assert torch.equal(views[3], a[:, 3:, 3:]) and torch.equal(views[8], a.flip(-1)[:, 3:, 3:])
        # the old path (R centre crop, bicubic up to 1.1 R) gives different pixels: it is not what we cut
        small = _adm_crop(img, R).resize((SIDE, SIDE), resample=Image.BICUBIC)
        up = torch.from_numpy(np.array(small)).permute(2, 0, 1).float() / 127.5 - 1
        assert not torch.equal(views[0], up[:, :R, :R]), key


@pytest.fixture(scope="module")
def tokenizer_ref(storage, tmp_path_factory):
    """A randomly initialised smoke tokenizer, exported the way training exports it (no training)."""
    torch.manual_seed(0)
    cfg = get_model_config("smoke").tokenizer
    d = tmp_path_factory.mktemp("tok")
    save_pretrained(DetailFlowTokenizer(cfg), {"kind": "tokenizer", "model": "smoke",
                                               "run_name": "tok-codes-test",
                                               "tokenizer": dataclasses.asdict(cfg)}, d)
    for name in ("model.safetensors", "config.json"):
        storage.upload_file(d / name, f"runs/tok-codes-test/export/{name}")
    return "tok-codes-test"


def _shard_rows(storage, manifest):
    rows = []
    for s in manifest["shards"]:
        rows += pq.read_table(io.BytesIO(storage.get_bytes(s["key"], s["sha256"]))).to_pylist()
    return rows


def test_extraction_writes_tencrop_codes_of_the_original(storage, ray_session, originals, tokenizer_ref):
    from detailflow.pipelines.train.exports import load_tokenizer

    cfg = ExtractConfig(tokenizer=tokenizer_ref, dataset="codes-orig", views="tencrop", batch_size=4,
                        shard_rows=25, version="v-tencrop")
    info = extract_codes(cfg, storage.settings)
    pointer = storage.read_manifest(codes.codes_prefix("v-tencrop", "train"))
    run = codes.run_prefix("v-tencrop", "train", info["run"])
    assert pointer["num_rows"] == 10 * len(SIZES) and pointer["num_views"] == 10 and not info["skipped"]
    assert len(pointer["shards"]) >= 3 and all(s["key"].startswith(run + "/part-") for s in pointer["shards"])
    assert storage.read_manifest(run)["shards"] == pointer["shards"]  # the run's own copy
    assert sorted(k for k in storage.list_keys(run) if k.endswith(".parquet")) == \
        sorted(s["key"] for s in pointer["shards"])
    tok, _ = load_tokenizer(storage, tokenizer_ref)
    rows = _shard_rows(storage, pointer)  # get_bytes checks each shard's sha256 against the manifest
    for key, img in originals.items():
        mine = sorted((r for r in rows if r["key"] == key), key=lambda r: r["view"])
        assert [r["view"] for r in mine] == list(range(10))
        stored = torch.tensor([r["clean"] for r in mine])
        assert torch.equal(stored, tok.encode(_expected_views(img))), key  # clean = encode(view)
    again = extract_codes(cfg, storage.settings)
    assert again["skipped"] and again["run"] == info["run"]  # published: nothing recomputed


def test_force_writes_a_new_run_and_leaves_the_held_one_intact(storage, ray_session, originals,
                                                                tokenizer_ref):
    cfg = ExtractConfig(tokenizer=tokenizer_ref, dataset="codes-orig", views="tiny", batch_size=4,
                        shard_rows=10, version="v-force")
    extract_codes(cfg, storage.settings)
    held = storage.read_manifest(codes.codes_prefix("v-force", "train"))  # a reader opened this
    before = {s["key"]: storage.get_bytes(s["key"]) for s in held["shards"]}
    info = extract_codes(dataclasses.replace(cfg, force=True, seed=1), storage.settings)
    now = storage.read_manifest(codes.codes_prefix("v-force", "train"))
    assert now["run"] == info["run"] != held["run"]
    assert not {s["key"] for s in now["shards"]} & set(before)  # new keys, nothing overwritten
    for s in held["shards"]:
        data = storage.get_bytes(s["key"], s["sha256"])
        assert data == before[s["key"]] and len(data) == s["bytes"]
    old = codes.read_codes_dataset(storage, "v-force", "train", manifest=held).take_all()
    assert len(old) == held["num_rows"] == now["num_rows"] == 4 * len(SIZES)
    assert sorted((r["key"], r["view"]) for r in old) == sorted((r["key"], r["view"]) for r in
                                                                 _shard_rows(storage, now))


def test_shard_whose_size_differs_from_the_manifest_fails_clearly(storage, ray_session):
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 64, (30, 16))
    rows = {"key": [f"k{i // 3}" for i in range(30)], "label": np.zeros(30, int), "view": np.arange(30) % 3,
            "clean": clean, "input": clean, "target": clean}
    m = codes.write_codes(storage, "v-size", "train", rows, shard_rows=10)
    bad = m["shards"][1]
    storage.put_bytes(bad["key"], storage.get_bytes(bad["key"]) + b"appended")  # replaced after publish
    with pytest.raises(Exception) as err:
        codes.read_codes_dataset(storage, "v-size", "train").take_all()
    msg = str(err.value)
    assert storage.uri(bad["key"]) in msg, msg
    assert f"is {bad['bytes'] + 8} bytes but the manifest lists {bad['bytes']} bytes" in msg, msg
    print("error seen by the reader:", json.dumps(next(x for x in msg.splitlines() if "code shard" in x)))
