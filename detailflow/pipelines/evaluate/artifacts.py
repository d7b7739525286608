"""Evaluation artefacts: curve plots (PNG), ADM-evaluator sample files (.npz), cached real features.

API:
    png = curves_png([{"title": "PSNR", "xlabel": "t", "ylabel": "dB",
                       "series": {"vs full image": (ts, values), ...}}, ...])   # one panel per dict
    with AdmNpzWriter("samples.npz", total=n, height=R, width=R) as w:     # arr_0: uint8 N x R x R x 3
        w.write(images_uint8_NHW3)                                          # streamed, chunk by chunk
    feats, labels = real_features(storage, "shapes", "val", rmap, extractor, limit=0, micro_batch=64)

The .npz is what OpenAI's ADM evaluator (guided-diffusion evaluations/evaluator.py, the one DetailFlow's
scripts run) reads: `python evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz`. It is written
as a zip member streamed to disk, so 50k samples at 256 px never sit in memory at once.

Plots use matplotlib (Agg) when it is installed, else a plain PIL line drawing with the same content.
Real features are cached on S3 under eval-cache/features/<dataset>/<split>/v-<dataset version>/..., keyed
by the image size, the image count and the Inception sha256, so champion and challenger evaluations
(and repeated ones) extract the reference set once.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np


# ---- plots -------------------------------------------------------------------------------------------
def curves_png(panels: list[dict], width_px: int = 520, height_px: int = 360) -> bytes:
    """One PNG, panels side by side; each panel {title, xlabel, ylabel, series: {name: (xs, ys)}}."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return _pil_curves(panels, width_px, height_px)
    fig, axes = plt.subplots(1, len(panels), figsize=(width_px / 100 * len(panels), height_px / 100), dpi=100,
                             squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for name, (xs, ys) in panel["series"].items():
            ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
        ax.set_title(panel.get("title", ""))
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _pil_curves(panels: list[dict], w: int, h: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(img)
    for p, panel in enumerate(panels):
        x0, y0, x1, y1 = p * w + 50, 30, p * w + w - 15, h - 40
        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        draw.text((x0, 8), panel.get("title", ""), fill=(0, 0, 0))
        draw.text((x0, h - 20), panel.get("xlabel", ""), fill=(0, 0, 0))
        pts = [(float(x), float(y)) for xs, ys in panel["series"].values()
               for x, y in zip(xs, ys, strict=True) if np.isfinite(y)]
        if not pts:
            continue
        xmin, xmax = min(q[0] for q in pts), max(q[0] for q in pts)
        ymin, ymax = min(q[1] for q in pts), max(q[1] for q in pts)
        sx = (x1 - x0) / max(xmax - xmin, 1e-9)
        sy = (y1 - y0) / max(ymax - ymin, 1e-9)
        draw.text((p * w + 2, y0), f"{ymax:.3g}", fill=(0, 0, 0))
        draw.text((p * w + 2, y1 - 10), f"{ymin:.3g}", fill=(0, 0, 0))
        for i, (name, (xs, ys)) in enumerate(panel["series"].items()):
            colour = _COLOURS[i % len(_COLOURS)]
            line = [(x0 + (float(x) - xmin) * sx, y1 - (float(y) - ymin) * sy)
                    for x, y in zip(xs, ys, strict=True) if np.isfinite(y)]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            draw.text((x0 + 5, y0 + 5 + 12 * i), name, fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---- ADM-evaluator .npz --------------------------------------------------------------------------------
class AdmNpzWriter:
    """Stream uint8 N x H x W x 3 images into `path` as the npz member arr_0 (np.load-compatible)."""

    def __init__(self, path, total: int, height: int, width: int):
        self.path, self.total, self.shape = Path(path), int(total), (int(total), int(height), int(width), 3)
        self.written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open("arr_0.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(
            self._member, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                           "shape": self.shape})

    def write(self, images_NHW3) -> None:
        arr = np.ascontiguousarray(images_NHW3, dtype=np.uint8)
        if arr.ndim != 4 or arr.shape[1:] != self.shape[1:]:
            raise ValueError(f"expected uint8 n x {self.shape[1]} x {self.shape[2]} x 3, got {arr.shape}")
        if self.written + len(arr) > self.total:
            raise ValueError(f"more than the declared {self.total} images")
        self._member.write(arr.tobytes())
        self.written += len(arr)

    def close(self) -> None:
        if self._member is None:
            return
        member, self._member = self._member, None
        complete = self.written == self.total
        member.close()
        self._zip.close()
        if not complete:
            self.path.unlink(missing_ok=True)  # a short file would claim N images it does not hold
            raise ValueError(f"{self.path}: wrote {self.written} of the declared {self.total} images")

    def __enter__(self) -> AdmNpzWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._member is not None:
            self._member.close()
            self._zip.close()
            self._member = None
            self.path.unlink(missing_ok=True)


# ---- cached real features ------------------------------------------------------------------------------
def _cache_key(manifest: dict, name: str, split: str, image_size: int, limit: int, micro_batch: int,
               sha: str) -> str:
    version = manifest.get("version") or "unversioned"
    # with a limit, which images come first depends on the reader's plan (micro-batch size)
    count = f"n{limit}-mb{micro_batch}" if limit else "all"
    return f"eval-cache/features/{name}/{split}/v-{version}/R{image_size}-{count}-{sha[:16]}.npz"


def iter_real_images(storage, name: str, split: str, rmap, *, micro_batch: int = 64, limit: int = 0,
                     seed: int = 0):
    """(uint8 B x 3 x R x R images, int64 labels) of a split in the reader's deterministic eval order
    (centre crops, no flips), at most `limit` images (0 = all)."""
    from detailflow.pipelines.data.reader import ReaderConfig, build_degraded_dataset, iter_microbatches

    cfg = ReaderConfig(image_size=rmap.image_size, micro_batch=micro_batch, train=False,
                       fixed_t=rmap.num_tokens, seed=seed)
    seen = 0
    for mb in iter_microbatches(build_degraded_dataset(storage, name, split, cfg, rmap), with_info=True):
        take = len(mb.images) if not limit else min(len(mb.images), limit - seen)
        yield mb.images[:take], mb.labels[:take]
        seen += take
        if limit and seen >= limit:
            return


def real_features(storage, name: str, split: str, rmap, extractor, *, limit: int = 0, micro_batch: int = 64,
                  use_cache: bool = True, log=print) -> tuple[np.ndarray, np.ndarray]:
    """Inception features (N x 2048 float64) and labels of a real split, through the S3 cache."""
    from detailflow.pipelines.data.reader import read_manifest_checked

    manifest = read_manifest_checked(storage, name, split)
    total = manifest.get("num_images") or 0
    if limit and total and limit >= total:  # the whole split: the same images, so the key every stage shares
        limit = 0
    key = _cache_key(manifest, name, split, rmap.image_size, limit, micro_batch, extractor.cfg.sha256)
    if use_cache and storage.exists(key):
        with np.load(io.BytesIO(storage.get_bytes(key))) as z:
            log(f"[eval] reference features from cache {storage.uri(key)} ({len(z['labels'])} images)")
            return z["features"], z["labels"]
    total = min(total, limit) if limit else total
    feats, labels = [], []

    def images_only():
        for images, lab in iter_real_images(storage, name, split, rmap, micro_batch=micro_batch, limit=limit):
            labels.append(lab.numpy())
            yield images

    # an extractor with .map (evaluate.sampling.SamplerPool) spreads the batches over its actors
    mapper = getattr(extractor, "map", None) or (lambda batches: (extractor(b) for b in batches))
    done = 0
    for f in mapper(images_only()):
        feats.append(f)
        done += len(f)
        log(f"[eval] reference features {name}/{split}: {done}/{total or '?'} images")
    if not feats:
        raise ValueError(f"dataset {name}/{split} yielded no images")
    features, labels_arr = np.concatenate(feats), np.concatenate(labels).astype(np.int64)
    if use_cache:
        buf = io.BytesIO()
        np.savez(buf, features=features, labels=labels_arr)
        storage.put_bytes(key, buf.getvalue())
    return features, labels_arr
