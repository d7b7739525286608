"""Metric maths on feature arrays and images (numpy + torch, float64 where it matters).

API (every function returns plain floats / dicts of floats, nothing stateful):

    mu, sigma = feature_stats(feats_ND)                       # mean, covariance (ddof 1)
    fd = frechet_distance(mu1, sigma1, mu2, sigma2)            # FID when the features are Inception pool3
    fid = fid_from_features(real_ND, fake_ND)
    kid_mean, kid_std = kid(real_ND, fake_ND, num_subsets=100, subset_size=1000, seed=0)
    p, r = precision_recall(real_ND, fake_ND, k=3)             # improved precision / recall
    isc_mean, isc_std = inception_score(probs_NC, splits=10)    # needs a classifier head
    all_metrics = distribution_metrics(real_ND, fake_ND)      # {fid, kid, kid_std, precision, recall, ..}
    psnr_B = psnr(a_BCHW, b_BCHW, data_range=2.0); ssim_B = ssim(a_BCHW, b_BCHW, data_range=2.0)
    usage, ppl = codebook_stats(codes, codebook_size)

Definitions:
- Fréchet distance ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace term is the sum of
  the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric PSD, so eigh is stable and no
  complex sqrtm residue appears; singular covariances, n < D, are fine).
- KID (Bińkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3, averaged over
  `num_subsets` random subsets of `subset_size` per side (at most half the smaller set); std over them.
- Improved precision / recall (Kynkäänniemi et al. 2019): each real feature gets the radius of its k-th
  nearest other real feature (k = 3); precision = share of fake features inside at least one real ball;
  recall = the same with the roles swapped.
- Inception Score exp(E_x KL(p(y|x) || p(y))) over `splits` folds. The FID Inception shipped here has
  no classifier head, so evaluations skip IS unless a classifier is configured (inception.py).
- PSNR 10 log10(range^2 / MSE) per image; SSIM (Wang et al. 2004) with an 11 x 11 Gaussian window,
  sigma 1.5, K1 0.01, K2 0.03, valid region only (as scikit-image with gaussian_weights=True). A canvas
  smaller than 11 px uses the largest odd window that fits, sigma scaled by win / 11.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_2d(feats) -> np.ndarray:
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"features must be N x D, got shape {arr.shape}")
    return arr


# ---- Fréchet distance ------------------------------------------------------------------------------
def feature_stats(feats_ND) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D) and unbiased covariance (D x D) of N x D features, float64."""
    x = _as_2d(feats_ND)
    if len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(x)}")
    return x.mean(0), np.cov(x, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    r1 = _psd_sqrt(s1)
    middle = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_features(real_ND, fake_ND) -> float:
    return frechet_distance(*feature_stats(real_ND), *feature_stats(fake_ND))


# ---- KID ---------------------------------------------------------------------------------------------
def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 estimate with the cubic polynomial kernel (diagonal terms excluded)."""
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("MMD needs at least 2 samples per side")
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kid(real_ND, fake_ND, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """(mean, std) of unbiased MMD^2 over random subsets (without replacement inside a subset).

    The subset size is capped at half the smaller set, so subsets differ and the std means something
    (at subset size = n every subset is the whole set: std 0); the estimate stays unbiased."""
    x, y = _as_2d(real_ND), _as_2d(fake_ND)
    m = min(subset_size, max(2, min(len(x), len(y)) // 2))
    rng = np.random.default_rng(seed)
    vals = [mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
            for _ in range(num_subsets)]
    return float(np.mean(vals)), float(np.std(vals))


# ---- precision / recall --------------------------------------------------------------------------------
def _pairwise_dist(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i:i + chunk], b) for i in range(0, len(a), chunk)])


def knn_radii(feats_ND, k: int = 3) -> np.ndarray:
    """Distance of every row to its k-th nearest OTHER row."""
    x = torch.as_tensor(_as_2d(feats_ND))
    if len(x) <= k:
        raise ValueError(f"k-NN radii need more than k={k} samples, got {len(x)}")
    d = _pairwise_dist(x, x)
    return d.kthvalue(k + 1, dim=1).values.numpy()  # +1: the row itself is at distance 0


def manifold_coverage(ref_ND, radii_N, query_ND) -> float:
    """Share of query rows within radius_i of at least one reference row i."""
    ref, q = torch.as_tensor(_as_2d(ref_ND)), torch.as_tensor(_as_2d(query_ND))
    r = torch.as_tensor(np.asarray(radii_N, np.float64))
    inside = torch.zeros(len(q), dtype=torch.bool)
    for i in range(0, len(q), 1024):
        inside[i:i + 1024] = (torch.cdist(q[i:i + 1024], ref) <= r[None, :]).any(1)
    return float(inside.double().mean())


def precision_recall(real_ND, fake_ND, k: int = 3) -> tuple[float, float]:
    real, fake = _as_2d(real_ND), _as_2d(fake_ND)
    precision = manifold_coverage(real, knn_radii(real, k), fake)
    recall = manifold_coverage(fake, knn_radii(fake, k), real)
    return precision, recall


# ---- Inception Score -----------------------------------------------------------------------------------
def inception_score(probs_NC, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` folds of exp(mean_x KL(p(y|x) || p(y))); rows are class probabilities."""
    p = np.asarray(probs_NC, np.float64)
    if p.ndim != 2 or np.any(p < 0) or not np.allclose(p.sum(1), 1.0, atol=1e-6):
        raise ValueError("inception_score needs N x C rows of class probabilities")
    scores = []
    for part in np.array_split(p, max(1, min(splits, len(p)))):
        marginal = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def distribution_metrics(real_ND, fake_ND, *, k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000,
                         seed: int = 0) -> dict[str, float]:
    """FID, KID (+ std), precision and recall of two feature sets, plus the sample counts."""
    real, fake = _as_2d(real_ND), _as_2d(fake_ND)
    kid_mean, kid_std = kid(real, fake, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(real, fake, k)
    return {"fid": fid_from_features(real, fake), "kid": kid_mean, "kid_std": kid_std,
            "precision": precision, "recall": recall, "n_real": float(len(real)), "n_fake": float(len(fake))}


# ---- image metrics -------------------------------------------------------------------------------------
def psnr(a_BCHW: torch.Tensor, b_BCHW: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB (data_range 2 for [-1, 1] images, i.e. the usual [0, 1] PSNR)."""
    mse = (a_BCHW.double() - b_BCHW.double()).pow(2).flatten(1).mean(1).clamp_min(1e-20)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a_BCHW: torch.Tensor, b_BCHW: torch.Tensor, data_range: float = 2.0, win: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image mean SSIM over channels and the valid window positions (see module docstring)."""
    if a_BCHW.shape != b_BCHW.shape or a_BCHW.ndim != 4:
        raise ValueError(f"ssim needs two B x C x H x W tensors of one shape, got {a_BCHW.shape}, "
                         f"{b_BCHW.shape}")
    side = min(a_BCHW.shape[-2:])
    w = min(win, side if side % 2 else side - 1)
    kernel = gaussian_window(w, sigma * w / win)[None, None]
    c = a_BCHW.shape[1]
    kernel = kernel.expand(c, 1, w, w)
    x, y = a_BCHW.double(), b_BCHW.double()
    conv = lambda z: F.conv2d(z, kernel, groups=c)
    mx, my = conv(x), conv(y)
    # the sample (n / (n - 1)) covariance correction of skimage does not apply to Gaussian weights
    vx, vy, cxy = conv(x * x) - mx ** 2, conv(y * y) - my ** 2, conv(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def codebook_stats(codes, codebook_size: int) -> tuple[float, float]:
    """(share of the codebook used at least once, exp(entropy) of the code histogram)."""
    flat = torch.as_tensor(np.asarray(codes)).reshape(-1).long()
    counts = torch.bincount(flat, minlength=codebook_size).double()
    p = counts / counts.sum().clamp_min(1)
    ppl = float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))
    return float((counts > 0).sum()) / codebook_size, ppl
