"""Metric maths against closed forms and independent computations (no services, seconds)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from detailflow.pipelines.evaluate import metrics as M

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- Fréchet distance --------------------------------------------------------------------------------
def test_frechet_1d_and_diagonal_closed_forms():
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2)
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)


def test_frechet_non_commuting_2x2_closed_form():
    # for a 2x2 PSD matrix X, tr sqrt(X) = sqrt(tr X + 2 sqrt(det X)); X = S1^1/2 S2 S1^1/2 has
    # tr X = tr(S1 S2) and det X = det S1 det S2
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[1.0, -0.5], [-0.5, 3.0]])
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 2.0])
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = M.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-12)
    assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-12)  # symmetric


def test_frechet_matches_scipy_sqrtm_and_handles_singular_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 40)), rng.normal(size=(40, 40))
    s1, s2 = a @ a.T / 40, b @ b.T / 40
    mu1, mu2 = rng.normal(size=40), rng.normal(size=40)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    # n < D: rank-deficient covariances (what a 1k-sample FID on 2048-d features has) stay finite, >= 0
    x, y = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.5
    fd = M.fid_from_features(x, y)
    assert np.isfinite(fd) and fd > 0
    assert M.fid_from_features(x, x) == pytest.approx(0.0, abs=1e-4)  # trace terms ~64: float noise only


def test_fid_of_samples_converges_to_the_analytic_distance():
    rng = np.random.default_rng(1)
    s1, s2 = np.diag([1.0, 2.0, 0.5]), np.diag([2.0, 0.5, 0.5])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, -1.0])
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    want = M.frechet_distance(mu1, s1, mu2, s2)
    assert M.fid_from_features(x, y) == pytest.approx(want, abs=0.02)


# ---- KID -----------------------------------------------------------------------------------------------
def _naive_mmd2(x, y):
    k = lambda a, b: (float(np.dot(a, b)) / len(a) + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_unbiased_equals_a_naive_double_loop():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(9, 5)) + 0.3
    assert M.mmd2_unbiased(x, y) == pytest.approx(_naive_mmd2(x, y), rel=1e-12)


def test_kid_1d_closed_form_zero_for_same_distribution_positive_for_shift():
    # D = 1: k(x, y) = (xy + 1)^3 = phi(x).phi(y) with phi = (1, sqrt3 x, sqrt3 x^2, x^3); for
    # X ~ N(0, 1), Y ~ N(mu, 1): MMD^2 = 3 mu^2 + 3 mu^4 + (mu^3 + 3 mu)^2
    # (unbiased: the mean over 400 independent replicates of n = 300 is within 4 standard errors)
    rng = np.random.default_rng(3)
    mu = 0.5
    want = 3 * mu ** 2 + 3 * mu ** 4 + (mu ** 3 + 3 * mu) ** 2
    reps = [M.mmd2_unbiased(rng.normal(size=(300, 1)), rng.normal(mu, 1.0, size=(300, 1)))
            for _ in range(400)]
    assert abs(np.mean(reps) - want) < 4 * np.std(reps) / np.sqrt(len(reps))
    x = rng.normal(size=(3000, 1))
    same, same_std = M.kid(x, rng.normal(size=(3000, 1)), num_subsets=20, subset_size=1000)
    assert abs(same) < 0.05 * want and abs(same) < 3 * same_std + 1e-3
    ident, _ = M.kid(x, x, num_subsets=5, subset_size=1000)
    assert abs(ident) < 0.05 * want


def test_kid_subsets_are_seeded_and_std_reported():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 1.0
    a, b = (M.kid(x, y, num_subsets=10, subset_size=1000, seed=7) for _ in range(2))
    assert a == b and a[0] > 0 and a[1] > 0  # subsets of 150 (half of 300): they differ, std > 0


# ---- precision / recall ------------------------------------------------------------------------------------
def test_knn_radii_on_a_line():
    pts = np.arange(10, dtype=float)[:, None]
    # 3rd nearest other point: interior points have neighbours at 1, 1, 2; the ends at 1, 2, 3
    want = np.array([3, 2, 2, 2, 2, 2, 2, 2, 2, 3], float)
    assert np.array_equal(M.knn_radii(pts, k=3), want)


def test_precision_recall_identical_disjoint_and_a_counted_case():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 16))
    assert M.precision_recall(x, x.copy()) == (1.0, 1.0)
    assert M.precision_recall(x, x + 100.0) == (0.0, 0.0)
    real = np.arange(10, dtype=float)[:, None]
    fake = np.array([4.5, 4.6, 4.7, 20.0, 21.0])[:, None]
    p, r = M.precision_recall(real, fake, k=3)
    assert p == pytest.approx(3 / 5)  # 4.5..4.7 lie in real balls (radius 2); 20, 21 do not (9's is 3)
    # fake radii: 4.5's 3rd nearest other fake is 20 (15.5), so every real point 0..9 is in its ball
    assert r == pytest.approx(1.0)


# ---- Inception Score -----------------------------------------------------------------------------------
def test_inception_score_closed_forms():
    c = 10
    assert M.inception_score(np.full((100, c), 1 / c), splits=5)[0] == pytest.approx(1.0)
    onehot = np.eye(c)[np.arange(100) % c]
    mean, std = M.inception_score(onehot, splits=5)
    assert mean == pytest.approx(c) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        M.inception_score(np.ones((4, 3)))


# ---- image metrics -------------------------------------------------------------------------------------
def test_psnr_closed_form():
    a = torch.zeros(2, 3, 8, 8)
    b = a + torch.tensor([0.1, 0.5]).view(2, 1, 1, 1)
    want = 10 * torch.log10(4 / torch.tensor([0.01, 0.25], dtype=torch.float64))  # range 2, MSE d^2
    torch.testing.assert_close(M.psnr(a, b), want)


def _naive_ssim(x, y, data_range, win=11, sigma=1.5):
    g = np.exp(-((np.arange(win) - (win - 1) / 2) ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(x.shape[0]):
        for i in range(x.shape[1] - win + 1):
            for j in range(x.shape[2] - win + 1):
                px, py = x[ch, i:i + win, j:j + win], y[ch, i:i + win, j:j + win]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx ** 2, (w * py * py).sum() - my ** 2
                cxy = (w * px * py).sum() - mx * my
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_against_loops_constants_and_identity():
    rng = np.random.default_rng(6)
    x = rng.uniform(-1, 1, size=(1, 3, 16, 16))
    y = np.clip(x + rng.normal(0, 0.2, size=x.shape), -1, 1)
    got = M.ssim(torch.from_numpy(x), torch.from_numpy(y))
    assert float(got[0]) == pytest.approx(_naive_ssim(x[0], y[0], 2.0), rel=1e-10)
    assert float(M.ssim(torch.from_numpy(x), torch.from_numpy(x))[0]) == pytest.approx(1.0)
    a, b = 0.2, -0.4  # constant images: the variances vanish and SSIM = luminance term
    c1 = (0.01 * 2) ** 2
    got = M.ssim(torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b))
    assert float(got[0]) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    small = M.ssim(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4))  # 4 px canvas: 3 x 3 window
    assert small.shape == (2,) and torch.isfinite(small).all()


def test_codebook_stats():
    usage, ppl = M.codebook_stats(np.tile(np.arange(32), 5), 64)
    assert usage == 0.5 and ppl == pytest.approx(32.0)


def test_distribution_metrics_keys():
    rng = np.random.default_rng(8)
    out = M.distribution_metrics(rng.normal(size=(50, 4)), rng.normal(size=(40, 4)), kid_subsets=5)
    assert set(out) == {"fid", "kid", "kid_std", "precision", "recall", "n_real", "n_fake"}
    assert all(isinstance(v, float) for v in out.values())


# ---- artefacts -------------------------------------------------------------------------------------------
def test_adm_npz_streams_and_np_load_reads_it(tmp_path):
    from detailflow.pipelines.evaluate.artifacts import AdmNpzWriter

    imgs = np.random.default_rng(9).integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)
    with AdmNpzWriter(tmp_path / "s.npz", total=7, height=8, width=8) as w:
        w.write(imgs[:3])
        w.write(imgs[3:])
    with np.load(tmp_path / "s.npz") as z:
        assert list(z.keys()) == ["arr_0"] and z["arr_0"].dtype == np.uint8
        assert np.array_equal(z["arr_0"], imgs)
    w = AdmNpzWriter(tmp_path / "short.npz", total=7, height=8, width=8)
    w.write(imgs[:2])
    with pytest.raises(ValueError, match="wrote 2 of the declared 7"):
        w.close()
    assert not (tmp_path / "short.npz").exists()


def test_curve_png_both_backends():
    from PIL import Image

    from detailflow.pipelines.evaluate.artifacts import _pil_curves, curves_png

    series = {"a": ([1, 2, 4], [10.0, 12.0, 15.0]), "b": ([1, 2, 4], [9.0, 11.0, 13.0])}
    panels = [{"title": "PSNR", "xlabel": "t", "ylabel": "dB", "series": series}]
    for png in (curves_png(panels), _pil_curves(panels, 300, 200)):
        img = Image.open(io.BytesIO(png))
        assert img.format == "PNG" and img.size[0] > 100


def test_balanced_labels_and_chunk_seeds():
    from detailflow.pipelines.evaluate.sampling import balanced_labels, chunk_seed, make_chunks

    labels = balanced_labels(1000, 10)
    assert np.array_equal(np.bincount(labels), np.full(10, 100))
    chunks = make_chunks(labels, 64)
    assert [j for j, _ in chunks] == list(range(16)) and sum(len(c) for _, c in chunks) == 1000
    assert chunk_seed(0, 3) == chunk_seed(0, 3) and len({chunk_seed(0, j) for j in range(100)}) == 100
    assert chunk_seed(1, 3) != chunk_seed(0, 3)


def test_json_safe():
    from detailflow.pipelines.evaluate.tracking import json_safe

    out = json_safe({"a": np.float64(1.5), "b": [np.int64(2), float("nan")], 3: {"c": float("inf")}})
    assert out == {"a": 1.5, "b": [2, "nan"], "3": {"c": "inf"}}
