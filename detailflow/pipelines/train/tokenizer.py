"""Stage: train the 1D tokenizer with DeepSpeed ZeRO on Ray Train, streaming degraded micro-batches.

Usage:
    detailflow train tokenizer --config configs/tokenizer-tiny.yaml
    detailflow train tokenizer --config configs/tokenizer-smoke.yaml steps=10 num_workers=0   # in-process
    detailflow train tokenizer --config configs/tokenizer-detailflow-16.yaml                 # GPUs, bf16

    from detailflow.pipelines.train.tokenizer import TokenizerStageConfig, run
    info = run(TokenizerStageConfig(model="smoke", dataset="shapes"), settings)

Each worker streams its own part of the data plan (DegradedStream, rank r of world) and each step
takes ONE micro-batch (images, targets at c(t), t) with the t its own reader drew once (spec §1.6;
with several ranks the reader draws it from the step, so it is equal on all ranks by construction);
a checkpoint records every rank's plan position, so a restarted worker group continues with the
next micro-batch not yet consumed. It calls DetailFlowTokenizer.training_step through the DeepSpeed
engine, and steps the LR schedule of
spec §1.11. Rank 0 logs to MLflow; every eval_every steps a PNG of reconstructions with their
coarse-to-fine prefix strips. The final checkpoint is consolidated (zero_to_fp32) into
the export {model.safetensors, config.json}: stored at s3://<bucket>/exports/<digest>/, named by
s3://<bucket>/runs/<run>/export (a pointer, platform/export_store.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from detailflow.pipelines.train.loop_common import (
    DeviceSums,
    StepAdapter,
    WorkerContext,
    resolve_batch,
    resolved_config,
    stage_from_config,
    step_logs,
    to_float,
    zero3_external,
)
from detailflow.pipelines.train.stage_config import DistributedStageConfig

STAGE = "tokenizer"


@dataclass
class TokenizerStageConfig(DistributedStageConfig):
    name: str = "tiny"  # config name: the <config> part of the run name
    model: str = "tiny"  # model registry name (detailflow.models.configs.get_model_config)
    model_overrides: dict = field(default_factory=dict)  # TokenizerConfig field overrides
    dataset: str = "shapes"  # dataset under s3://<bucket>/datasets/<name>/train
    steps: int = 1000  # optimiser steps in total (each takes grad_accum micro-batches per worker)
    global_batch: int | None = None  # the recipe's images per optimiser step (micro x accum x workers):
    # set, grad_accum is derived from it for the worker count (or the run refuses); None: as configured
    lr: float = 3e-4  # peak learning rate (spec §6.2 tiny; 1e-4 at batch 256 in the paper)
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # Adam betas (spec §1.11)
    warmup_steps: int = 50  # linear warm-up steps (paper: one epoch)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    checkpoint_every: int = 200  # optimiser steps between checkpoints (and always at the end)
    eval_every: int = 200  # optimiser steps between reconstruction PNGs (and at the end)
    log_every: int = 10  # optimiser steps between MLflow metric writes
    eval_images: int = 6  # rows in the reconstruction PNG
    experiment: str = "detailflow-tokenizer"  # MLflow experiment
    window_groups: int = 16  # reader: row groups mixed into each micro-batch (one Ray task each)
    reader_tasks: int = 2  # reader: window tasks per rank at once (decode processes; reserve no Ray CPU)
    consumed_log: str = ""  # test hook: each rank appends "step epoch unit batch pid" lines to <path>.rank<r>
    progress_every_s: float = 10.0  # seconds between rank 0's console progress lines

    def validate(self) -> None:
        """At config load: every pretrained file this recipe needs is named (and exists, if local)."""
        from detailflow.models.configs import weight_problems

        problems = weight_problems(tokenizer_config(self))
        if problems:
            raise ValueError(f"model {self.model!r}: " + "; ".join(problems) + " (set them with "
                             "model_overrides.<field>=<path or s3://...>; README 'Pretrained weights')")


def tokenizer_config(cfg: TokenizerStageConfig):
    tok = get_model_tokenizer(cfg.model)
    return dataclasses.replace(tok, **cfg.model_overrides)


def get_model_tokenizer(name: str):
    from detailflow.models.configs import get_model_config

    return get_model_config(name).tokenizer


def micro_step(engine, disc_engine, model, img, target, t: int, step: int) -> dict:
    """One micro-batch of optimiser step `step`: generator forward/backward, then the
    discriminator's; engine.step() (DeepSpeed steps the optimisers at the accumulation boundary).
    Returns the logs as they come (tensors stay on device: no host sync here)."""
    disc_module = disc_engine.module.disc if disc_engine is not None else None
    _, logs = generator_step(engine, disc_module, img, target, t, step)
    if disc_engine is not None:
        d_loss, d_logs = disc_engine(model.last_target, model.last_reconstruction, step)
        disc_engine.backward(d_loss)
        disc_engine.step()
        logs.update(d_logs)
    return logs


def generator_step(engine, disc: nn.Module | None, img, target, t: int, step: int):
    """Forward + backward + step of the tokenizer engine. The discriminator's parameters are frozen
    for the forward and backward (the adversarial term still flows through D into the reconstruction):
    their DeepSpeed gradient hooks must not fire here, or D's engine would reduce the generator's
    gradients and add them to its own (double-reduced under ZeRO-2)."""
    from detailflow.models.losses import frozen

    with frozen(disc):
        loss, logs = engine(img, target, t, step, discriminator=disc)
        engine.backward(loss)
    engine.step()
    return loss, logs


class DiscriminatorStep(nn.Module):
    """engine(real, fake, step) -> discriminator loss (spec §1.10), for its own DeepSpeed engine."""

    def __init__(self, disc: nn.Module, tok_cfg):
        super().__init__()
        self.disc = disc
        self.tok_cfg = tok_cfg

    def forward(self, real, fake, step: int):
        from detailflow.models.losses import discriminator_step

        return discriminator_step(self.disc, real, fake, step, self.tok_cfg)


def _stream(cfg: TokenizerStageConfig, ctx, rmap, state: dict):
    """This rank's micro-batches forever, from the position after the one the checkpoint consumed.

    Every rank reads its own windows of the plan; t is drawn once per micro-batch by the reader and
    never re-degraded (spec §1.6). With more than one rank the reader draws it from the step
    (shared_t), so all ranks train the same t at the same step: t = 1 skips the self-correction pass,
    which leaves its parameters without gradients on that rank, and ZeRO-2's bucketed all-reduce
    then aborts (tests/test_train_shared_t.py shows it); ZeRO-3's per-module gathers would desync too.
    No broadcast, no second degradation: equal draws by construction."""
    from detailflow.pipelines.data.plan import resume_start
    from detailflow.pipelines.data.reader import DegradedStream, ReaderConfig
    from detailflow.platform.storage import Storage

    reader = ReaderConfig(image_size=rmap.image_size, micro_batch=cfg.micro_batch,
                          degrade_prob=tokenizer_config(cfg).degrade_prob, seed=cfg.seed, train=True,
                          num_epochs=None, window_groups=cfg.window_groups, prefetch_windows=cfg.reader_tasks,
                          shared_t=ctx.world > 1)
    start = resume_start(ctx.data_position(state))  # the batch after the checkpointed one
    # the stream counts micro-batches (t is drawn from that index): an optimiser step takes grad_accum
    first = int(state.get("step", 0)) * cfg.grad_accum
    stream = DegradedStream(Storage(ctx.settings), cfg.dataset, "train", reader, rmap, rank=ctx.rank,
                            world=ctx.world, start=start, start_step=first,
                            version=cfg.dataset_version)  # the recorded version, not the pointer
    yield from stream


@torch.no_grad()
def reconstruction_png(model, img_BCHW: torch.Tensor) -> tuple[bytes, float]:
    """Rows: original, then decodes of growing prefixes (coarse to fine). Returns (png, full-N mse)."""
    from detailflow.pipelines.evaluate.visuals import grid_png, strip_prefixes

    was = model.training
    model.eval()
    try:
        codes = model.encode(img_BCHW)
        ts = strip_prefixes(model.rmap.admissible)
        recons = {t: model.decode(codes, t) for t in ts}
    finally:
        model.train(was)
    full = recons[ts[-1]]
    mse = float(((full.float() - img_BCHW.float()) ** 2).mean())
    rows = [[img_BCHW[i]] + [recons[t][i] for t in ts] for i in range(img_BCHW.shape[0])]
    return grid_png(rows, cell=max(48, img_BCHW.shape[-1])), mse


def train_loop(config: dict) -> None:
    """One worker's loop; runs unchanged in-process, on CPU workers and on GPUs."""

    from detailflow.models.tokenizer import DetailFlowTokenizer
    from detailflow.platform import deepspeed_glue as dsg
    from detailflow.platform.progress import Progress
    from detailflow.platform.storage import Storage
    from detailflow.platform.weights import resolve_weights

    cfg = stage_from_config(TokenizerStageConfig, config)
    ctx = WorkerContext.from_ray(config, cfg)
    ctx.check_batch(cfg)  # before anything is built: the recipe's global batch on this worker group
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    tok_cfg = resolve_weights(tokenizer_config(cfg), Storage(ctx.settings))  # s3:// -> local, sha256 checked
    from detailflow.models.featurenets import FrozenPlacement

    # Frozen teacher / perceptual / D-backbone nets: loaded straight onto this rank's device and
    # probed at the training micro-batch (a trace that baked another batch size is refused here).
    where = FrozenPlacement(device=str(ctx.device), batch=cfg.micro_batch)
    model = DetailFlowTokenizer(tok_cfg, where).to(ctx.device)  # on its device first: fused Adam on GPU
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = dsg.make_optimizer(trainable, lr=cfg.lr, betas=tuple(cfg.betas), kind="adam")
    engine = ctx.engine(StepAdapter(model, "training_step"), opt, cfg)
    zero3_external(engine, ("model.quantizer",))  # codebook lookups happen outside quantizer.forward
    engines = {"ds": engine}
    disc_engine = None
    if tok_cfg.gan_weight > 0:
        from detailflow.models.losses import Discriminator

        disc = Discriminator(tok_cfg, where=where).to(ctx.device)
        dopt = dsg.make_optimizer(disc.trainable_parameters(), lr=cfg.lr, betas=tuple(cfg.betas), kind="adam")
        disc_engine = ctx.engine(DiscriminatorStep(disc, tok_cfg), dopt, cfg)
        engines["disc"] = disc_engine
    ctx.seed_rank(cfg.seed)  # weights are equal; from here each rank draws its own dropout/spans/augments
    state = ctx.restore(engines, config)
    resolved = resolved_config(config)
    tracker = ctx.tracker(cfg.experiment, resolved, state)
    start = int(state.get("step", 0))
    if start:
        tracker.log_metrics({"resumed_from_step": start}, step=start)
    progress = Progress(STAGE, ctx.run_name, total=cfg.steps, start=start, unit="img",
                        every_s=cfg.progress_every_s, enabled=ctx.rank == 0, tracker=tracker)
    dtype = dsg.engine_dtype(engine)
    stream = _stream(cfg, ctx, model.rmap, state)
    eval_img = None
    sums = DeviceSums()  # the logs of every micro-batch, summed on device until the next log
    images = cfg.micro_batch * cfg.grad_accum * ctx.world  # per optimiser step, all ranks
    seen, tic = 0, time.perf_counter()
    for step in range(start, cfg.steps):  # optimiser steps: LR, GAN/perceptual schedules, cadence
        ctx.maybe_fail(cfg, step)
        lr = dsg.tokenizer_lr(step, total_steps=cfg.steps, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                              min_lr_ratio=cfg.min_lr_ratio)
        for e in engines.values():
            dsg.set_lr(e.optimizer, lr)
        for _ in range(cfg.grad_accum):  # DeepSpeed steps the optimisers after the last one
            mb = next(stream)
            if cfg.consumed_log:
                with open(f"{cfg.consumed_log}.rank{ctx.rank}", "a") as f:
                    pos = mb.position
                    f.write(f"{step} {pos.epoch} {pos.unit} {pos.batch} {os.getpid()}\n")
            img = to_float(mb.images, ctx.device, dtype)
            if eval_img is None:
                eval_img = img[: cfg.eval_images].clone()
            sums.add(micro_step(engine, disc_engine, model, img, to_float(mb.targets, ctx.device, dtype),
                                mb.t, step))
        seen += images
        if WorkerContext.due(step, cfg.log_every, cfg.steps):
            dt = time.perf_counter() - tic
            logs = step_logs(sums, engine, lr=lr, images_per_s=seen / max(dt, 1e-9))  # one host transfer
            logs = dsg.mean_over_ranks(logs)  # all ranks: each trained on its own images and t
            tracker.log_metrics(logs, step=step)
            progress.loss = logs["loss"]  # the console shows the last logged mean loss
            seen, tic = 0, time.perf_counter()
        if WorkerContext.due(step, cfg.eval_every, cfg.steps):
            png, mse = engine(eval_img, _fn=reconstruction_png)  # all ranks: ZeRO-3 gathers collectively
            tracker.log_png(png, f"reconstructions/step_{step + 1:06d}.png")
            tracker.log_metrics({"eval_full_mse": mse}, step=step)
        if WorkerContext.due(step, cfg.checkpoint_every, cfg.steps):
            last = {} if progress.loss is None else {"loss": progress.loss}  # last logged mean
            ctx.checkpoint(engines, last, step=step + 1, tracker=tracker, resolved=resolved,
                           data_position=mb.position._asdict())
        progress.update(step + 1, images)  # rank 0 prints when due
    tracker.finish()


def export_config(cfg: TokenizerStageConfig, run_name: str) -> dict:
    """config.json of the INFERENCE export: the tokenizer fields with every training-only one
    (teacher / perceptual / discriminator weights, encoder init) switched off, so no downstream
    stage needs (or tries to read) a training-only file."""
    from detailflow.platform.checkpoints import inference_tokenizer_fields

    return {"kind": "tokenizer", "model": cfg.model, "run_name": run_name, "inference": True,
            "tokenizer": inference_tokenizer_fields(dataclasses.asdict(tokenizer_config(cfg)))}


def inference_model(export_cfg: dict):
    """The bare inference tokenizer an export config describes (nothing loaded from files)."""
    from detailflow.models.configs import TokenizerConfig
    from detailflow.models.tokenizer import DetailFlowTokenizer

    return DetailFlowTokenizer(TokenizerConfig(**export_cfg["tokenizer"]))


def export_tokenizer(cfg: TokenizerStageConfig, settings, name: str, ckpt) -> str:
    """Consolidate the final checkpoint into the INFERENCE export (no training-only network is built,
    read or downloaded; the align head is dropped), log it on the run; returns the export URI."""
    from detailflow.pipelines.train.exports import export_prefix
    from detailflow.platform import checkpoints
    from detailflow.platform.storage import Storage
    from detailflow.platform.tracking import Tracker

    state = checkpoints.read_client_state(ckpt)  # one small JSON: step and the MLflow run id
    export_cfg = export_config(cfg, name)
    return checkpoints.export_consolidated(ckpt, lambda: inference_model(export_cfg), export_cfg,
                                           Storage(settings), export_prefix(name),
                                           select=checkpoints.inference_state,
                                           tracker=Tracker.attach(settings.mlflow_tracking_uri,
                                                                  state.get("mlflow_run_id")),
                                           step=int(state["step"]))


def pin_dataset_version(cfg: TokenizerStageConfig, storage) -> tuple[TokenizerStageConfig, dict]:
    """(cfg with dataset_version set, the train manifest): no version given means the latest, pinned
    here, so the run's name, its workers and a resume all read that version, whatever is ingested
    later."""
    from detailflow.pipelines.data.reader import read_manifest_checked

    manifest = read_manifest_checked(storage, cfg.dataset, "train", cfg.dataset_version)
    if not cfg.dataset_version and manifest.get("version"):
        cfg = dataclasses.replace(cfg, dataset_version=manifest["version"])
    return cfg, manifest


def run(cfg: TokenizerStageConfig, settings, placement=None, log=print, accelerator=None) -> dict:
    """Driver: check the dataset, fit (each worker streams its own part), export.
    placement (platform.placement.Placement, default 1 CPU): where the consolidation runs (a Ray task
    on a worker node of a cluster; in this process on a local one-node Ray).
    accelerator: a custom resource each rank's bundle asks for besides its CPUs (raytrain.launch), e.g.
    {"sim_gpu": 1} on platform/cluster_sim.py's cluster.
    Returns {run_name, checkpoint, export_uri}."""
    from detailflow.models.resolution import ResolutionMap
    from detailflow.pipelines.data.plan import EpochPlan, RowGroups
    from detailflow.pipelines.train.stage_config import run_name as make_run_name
    from detailflow.platform import raytrain
    from detailflow.platform.placement import Placement, run_placed
    from detailflow.platform.storage import Storage
    from detailflow.platform.weights import check_weights

    cfg = resolve_batch(cfg)  # the recipe's global batch on num_workers (or refuse before any worker)
    storage = Storage(settings)
    tok_cfg = tokenizer_config(cfg)
    check_weights(tok_cfg, storage)  # before any worker starts: named, reachable
    ResolutionMap.from_config(tok_cfg)  # a bad model config fails here, before any worker starts
    # fail on the driver with a clear message (no manifest, too few row groups for the workers), not
    # in every worker; the workers build their own streams from their checkpointed positions
    cfg, manifest = pin_dataset_version(cfg, storage)
    resolved = dataclasses.asdict(cfg)
    name = make_run_name(STAGE, cfg.name, cfg.date, resolved)
    EpochPlan(RowGroups.from_manifest(manifest), seed=cfg.seed, micro_batch=cfg.micro_batch,
              window_groups=cfg.window_groups, world=max(1, cfg.num_workers))
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and settings.resolved_device().startswith("cuda"))
    result = raytrain.launch(train_loop, resolved, settings, run_name=name, num_workers=cfg.num_workers,
                             use_gpu=use_gpu, cpus_per_worker=cfg.cpus_per_worker,
                             reader_cpus=cfg.reader_cpus,  # the reader tasks' CPUs, in the rank's bundle
                             max_failures=cfg.max_failures, num_to_keep=cfg.num_to_keep,
                             accelerator=accelerator)
    ckpt = result.checkpoint or raytrain.latest_checkpoint(settings, name)
    uri = run_placed(export_tokenizer, cfg, settings, name, ckpt, placement=placement or Placement(),
                     name=f"consolidate {name}", log=log)
    return {"run_name": name, "checkpoint": ckpt.path, "export_uri": uri}
