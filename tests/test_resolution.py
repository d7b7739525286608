"""Resolution map (spec §1.5, §6.2, §6.4, §6.5): tables reproduced exactly, R(1)=1, R(N)=R, monotone."""

import pytest

from detailflow.models.configs import get_model_config
from detailflow.models.resolution import ResolutionMap

# (R, N, g, causal_num, f) -> "t:r/c ..." copied from the spec tables
TABLES = {
    (256, 128, 8, 8, 16): (
        "1:1/16 2:4/16 3:6/16 4:9/16 5:12/16 6:15/16 7:18/32 8:21/32 16:44/48 24:67/80 32:88/96 "
        "40:108/112 48:128/128 56:147/160 64:164/176 72:181/192 80:196/208 88:210/224 96:223/224 "
        "104:235/240 112:244/256 120:251/256 128:256/256"
    ),
    (256, 256, 8, 8, 16): (
        "1:1/16 2:2/16 3:3/16 4:5/16 5:6/16 6:8/16 7:9/16 8:11/16 16:23/32 24:34/48 "
        "32:46/48 40:57/64 48:68/80 56:78/80 64:89/96 72:99/112 80:109/112 88:119/128 96:129/144 "
        "104:138/144 112:147/160 120:156/160 128:165/176 136:173/176 144:181/192 152:189/192 160:197/208 "
        "168:204/208 176:211/224 184:217/224 192:223/224 200:229/240 208:235/240 216:240/240 224:244/256 "
        "232:248/256 240:251/256 248:254/256 256:256/256"
    ),
    (256, 512, 8, 8, 16): (
        "8:6/16 16:12/16 32:23/32 64:46/48 96:68/80 128:89/96 160:110/112 192:129/144 "
        "224:148/160 256:165/176 288:181/192 320:197/208 352:211/224 384:224/224 416:235/240 448:244/256 "
        "480:252/256 512:256/256"
    ),
    (
        32,
        32,
        4,
        4,
        4,
    ): "1:1/4 2:2/4 3:3/4 4:5/8 8:10/12 12:15/16 16:20/20 20:24/24 24:27/28 28:30/32 32:32/32",
    (64, 64, 8, 8, 8): (
        "1:1/8 2:2/8 3:3/8 4:5/8 5:6/8 6:8/8 7:9/16 8:11/16 16:22/24 "
        "24:32/32 32:41/48 40:49/56 48:55/56 56:61/64 64:64/64"
    ),
    (32, 16, 4, 4, 8): "1:1/8 2:4/8 3:6/8 4:9/16 8:19/24 12:27/32 16:32/32",
}


def _parse(table: str) -> list[tuple[int, int, int]]:
    rows = []
    for item in table.split():
        t, rc = item.split(":")
        r, c = rc.split("/")
        rows.append((int(t), int(r), int(c)))
    return rows


def _rmap(key) -> ResolutionMap:
    big_r, n, g, causal, f = key
    return ResolutionMap(
        image_size=big_r, num_tokens=n, group_size=g, causal_num=causal, alpha=1.5, patch_size=f
    )


@pytest.mark.parametrize("key", list(TABLES), ids=lambda k: f"R{k[0]}_N{k[1]}_g{k[2]}_f{k[4]}")
def test_tables_reproduced(key):
    rmap = _rmap(key)
    for t, r, c in _parse(TABLES[key]):
        assert (rmap.content_size(t), rmap.canvas_size(t)) == (r, c), f"t={t}"


@pytest.mark.parametrize("key", list(TABLES), ids=str)
def test_endpoints_and_monotone(key):
    rmap = _rmap(key)
    n, big_r = rmap.num_tokens, rmap.image_size
    assert rmap.resolution(1) == pytest.approx(1.0, abs=1e-9)
    assert rmap.resolution(n) == big_r
    assert rmap.content_size(1) == 1 and rmap.content_size(n) == big_r and rmap.canvas_size(n) == big_r
    vals = [rmap.resolution(t) for t in range(1, n + 1)]
    assert all(a < b for a, b in zip(vals, vals[1:], strict=False))
    sizes = [rmap.canvas_size(t) for t in range(1, n + 1)]
    assert all(a <= b for a, b in zip(sizes, sizes[1:], strict=False))
    assert all(s % rmap.patch_size == 0 and s >= rmap.patch_size for s in sizes)


def test_admissible_sets():
    assert _rmap((256, 128, 8, 8, 16)).admissible == list(range(1, 9)) + list(range(16, 129, 8))
    assert _rmap((32, 32, 4, 4, 4)).admissible == [1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32]
    assert _rmap((32, 16, 4, 4, 8)).admissible == [1, 2, 3, 4, 8, 12, 16]


@pytest.mark.parametrize(
    "name", ["smoke", "tiny", "tiny64", "detailflow-16", "detailflow-32", "detailflow-64"]
)
def test_from_config_and_tokens_for_resolution(name):
    tok = get_model_config(name).tokenizer
    rmap = ResolutionMap.from_config(tok)
    assert rmap.tokens_for_resolution(tok.image_size) == tok.num_tokens
    t1 = rmap.tokens_for_resolution(1)  # several t may floor to 1 px (N=512): the largest wins
    assert rmap.content_size(t1) == 1 and all(rmap.content_size(t) > 1 for t in rmap.admissible if t > t1)
    for t in rmap.admissible:  # each content size maps back to a t with the same content size
        assert rmap.content_size(rmap.tokens_for_resolution(rmap.content_size(t))) == rmap.content_size(t)


def test_tokens_for_resolution_closest_and_ties():
    rmap = _rmap((256, 128, 8, 8, 16))
    assert rmap.tokens_for_resolution(128) == 48  # r(48) = 128 exactly
    assert rmap.tokens_for_resolution(160) == 64  # r(56)=147, r(64)=164 -> 164 closer
    # a tie between two admissible t resolves to the larger t: r(3)=3, r(4)=5, px=4 is equidistant
    tiny = _rmap((32, 32, 4, 4, 4))
    assert tiny.tokens_for_resolution(4) == 4


def test_bad_inputs():
    rmap = _rmap((32, 16, 4, 4, 8))
    with pytest.raises(ValueError):
        rmap.content_size(0)
    with pytest.raises(ValueError):
        rmap.canvas_size(17)
    with pytest.raises(ValueError, match="not admissible"):
        rmap.check_admissible(5)
    with pytest.raises(ValueError):
        ResolutionMap(image_size=32, num_tokens=18, group_size=4, causal_num=4, alpha=1.5, patch_size=8)
