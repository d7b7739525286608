"""Self-correction code extraction (spec §2.3, §6.3): views, shared position, clean == encode."""

import pytest
import torch

from detailflow.models.configs import get_model_config
from detailflow.models.extraction import extract_triplets, make_views, view_input_size
from detailflow.models.tokenizer import DetailFlowTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return DetailFlowTokenizer(get_model_config("smoke").tokenizer)


def test_tiny_views():
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    v = make_views(img, "tiny")
    assert v.shape == (2, 4, 3, 32, 32)
    assert torch.equal(v[:, 0], img) and torch.equal(v[:, 1], img.flip(-1))
    assert torch.equal(v[:, 2, ..., 1:], img[..., :-1]) and torch.equal(v[:, 2, ..., 0], img[..., 0])
    assert torch.equal(v[:, 3, ..., 1:, :], img[..., :-1, :])


def test_tencrop_views_are_cuts_of_the_1p1_crop():
    # the input is already the ADM crop of the original to int(1.1 * 32) = 35: views are pure cuts of it
    img = torch.rand(1, 3, 35, 35) * 2 - 1
    v = make_views(img, "tencrop", image_size=32)
    assert v.shape == (1, 10, 3, 32, 32)
    boxes = [(0, 0), (0, 3), (3, 0), (3, 3), (1, 1)]  # (top, left): TL, TR, BL, BR, centre = (35-32)//2
    for i, (top, left) in enumerate(boxes):
        assert torch.equal(v[:, i], img[..., top:top + 32, left:left + 32])
        assert torch.equal(v[:, 5 + i], img.flip(-1)[..., top:top + 32, left:left + 32])
    with pytest.raises(ValueError, match="view kind"):
        make_views(img, "random")
    for wrong in (32, 40):  # an R crop (would need upsampling) or an uncropped image: refused, not resampled
        with pytest.raises(ValueError, match="int\\(1.1"):
            make_views(torch.rand(1, 3, wrong, wrong), "tencrop", image_size=32)
    assert view_input_size("tencrop", 256) == 281 and view_input_size("tiny", 32) == 32


@pytest.mark.parametrize("views,nv", [("tiny", 4), ("tencrop", 10)])
def test_extract_triplets(tok, views, nv):
    cfg = tok.cfg
    side = view_input_size(views, 32)  # tencrop takes the 35 px ADM crop of the original, tiny the R crop
    img = torch.rand(3, 3, side, side) * 2 - 1
    tok.train()
    out = extract_triplets(tok, img, torch.Generator().manual_seed(0), views=views)
    assert tok.training  # the mode is restored
    for key in ("clean", "input", "target"):
        assert out[key].shape == (3, nv, cfg.num_tokens) and out[key].dtype == torch.long
    assert torch.equal(out["view"], torch.arange(nv).expand(3, nv))
    flat = make_views(img, views, 32).flatten(0, 1)
    assert torch.equal(out["clean"].flatten(0, 1), tok.encode(flat))  # direct tokenizer call
    for b in range(3):
        j, w = int(out["perturb_start"][b]), int(out["perturb_width"][b])
        assert w == (1 if j < cfg.causal_num else cfg.group_size) and j + w <= cfg.num_tokens - cfg.group_size
        for v in range(nv):  # one span per image, shared by its views
            same = out["input"][b, v] == out["clean"][b, v]
            assert same[:j].all()
            assert torch.equal(out["target"][b, v, : j + w], out["clean"][b, v, : j + w])
            assert torch.equal(out["target"][b, v, j + w :], out["input"][b, v, j + w :])


def test_extraction_is_reproducible(tok):
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    a = extract_triplets(tok, img, torch.Generator().manual_seed(5))
    b = extract_triplets(tok, img, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind,shard_rows", [("tencrop", 65536), ("tencrop", 25), ("tiny", 30), ("tiny", 3)])
def test_write_tasks_never_split_an_images_views_across_shards(kind, shard_rows):
    """Extraction emits V rows per image, image after image; each write task is one shard. Cut into
    shard_batch_rows chunks, every image of every shard is complete (the view-diagonal layout keeps all
    of them; a split image's rows went to a trailing row group the training stream never reads)."""
    from detailflow.pipelines.data.codes import diagonal_order
    from detailflow.pipelines.train.extract_codes import shard_batch_rows

    side = view_input_size(kind, 20)
    v = make_views(torch.zeros(1, 3, side, side), kind, 20).shape[1]  # V as make_views produces it
    rows = shard_batch_rows(shard_rows, kind)
    images = 3 * max(rows // v, 1) + 1
    keys = [f"img{i}" for i in range(images) for _ in range(v)]
    views = [j for _ in range(images) for j in range(v)]
    for start in range(0, len(keys), rows):
        chunk_keys, chunk_views = keys[start:start + rows], views[start:start + rows]
        _, _, complete = diagonal_order(chunk_keys, chunk_views, v, block_images=256)
        assert complete == len(set(chunk_keys)), (start, complete)
