"""Stage: train the group-parallel AR model on extracted codes with DeepSpeed ZeRO on Ray Train.

Usage:
    detailflow extract-codes --tokenizer <tokenizer run> --dataset shapes
    detailflow train ar --config configs/ar-tiny.yaml tokenizer=<tokenizer run>
    detailflow train ar --config configs/ar-smoke.yaml tokenizer=<run> num_workers=0        # in-process

    from detailflow.pipelines.train.ar import ARStageConfig, run
    info = run(ARStageConfig(model="smoke", tokenizer="tokenizer-smoke-..."), settings)

Data: the code shards the pointer s3://<bucket>/codes/<tokenizer run>/train/_manifest.json lists (one
row per image view); each rank streams its part of every epoch, one seeded view per image in a
seeded order, from (seed, epoch) (data/code_stream.py; checkpoints record each rank's position, so
a resume continues with the next unconsumed batch of the current epoch), and per sample the pair is
(input, target) with probability correction_prob (0.3, spec §2.3), else (clean, clean).
Optimiser AdamW with weight decay on >= 2-D params only, LR schedule of spec §2.4, EMA of the fp32
master weights (each rank averages only its own optimiser partition every step, no communication; the
whole EMA is gathered for samples, checkpoints and the export). Every eval_every steps rank 0 samples
class-conditional images with the EMA weights and decodes them with the tokenizer export into a PNG
(one row per sample, its prefixes coarse to fine). At the end rank 0 writes the EMA weights as the
export s3://<bucket>/runs/<run>/export (a pointer to exports/<digest>/, platform/export_store.py) and
logs them on the MLflow run as a model. Logged metrics are means over the ranks; rank 0 prints a
progress line every progress_every_s seconds.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from detailflow.pipelines.train.loop_common import (
    DeviceSums,
    StepAdapter,
    WorkerContext,
    resolve_batch,
    resolved_config,
    stage_from_config,
    step_logs,
    zero3_external,
)
from detailflow.pipelines.train.stage_config import DistributedStageConfig

STAGE = "ar"
EMA_FILE = "ema.safetensors"


@dataclass
class ARStageConfig(DistributedStageConfig):
    name: str = "tiny"  # config name: the <config> part of the run name
    model: str = "tiny"  # model registry name (its .ar part; vocab must match the tokenizer's K)
    model_overrides: dict = field(default_factory=dict)  # ARConfig field overrides
    tokenizer: str = ""  # tokenizer run name or s3:// export URI; codes version = that run name
    codes_version: str = ""  # codes/<version>/train to read (default: derived from `tokenizer`)
    steps: int = 2000  # optimiser steps in total (each takes grad_accum micro-batches per worker)
    global_batch: int | None = None  # the recipe's samples per optimiser step (micro x accum x workers):
    # set, grad_accum is derived from it for the worker count (or the run refuses); None: as configured
    lr: float = 1e-3  # peak learning rate (spec §6.3 tiny; 1e-4 in the paper)
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    weight_decay: float = 0.05  # on >= 2-D params only (spec §2.4)
    warmup_frac: float = 0.05  # linear warm-up share of all steps (from 0.005·lr)
    correction_prob: float = 0.3  # per-sample probability of the (input, target) self-correction pair
    ema_decay: float = 0.999  # EMA of the weights (0.9999 in the paper)
    checkpoint_every: int = 500  # optimiser steps between checkpoints (and always at the end)
    eval_every: int = 500  # optimiser steps between sample PNGs (and at the end)
    log_every: int = 20  # optimiser steps between MLflow metric writes
    sample_classes: int = 10  # classes in the sample PNG (one row each)
    cfg_scale: float = 1.5  # classifier-free guidance of the PNG samples
    experiment: str = "detailflow-ar"  # MLflow experiment
    progress_every_s: float = 10.0  # seconds between rank 0's console progress lines
    window_blocks: int = 16  # code blocks per reader task (a batch mixes up to this many blocks)


def ar_config(cfg: ARStageConfig):
    from detailflow.models.configs import get_model_config

    return dataclasses.replace(get_model_config(cfg.model).ar, **cfg.model_overrides)


def _stream(cfg: ARStageConfig, ctx, config: dict, state: dict):
    """This rank's code batches forever from the batch after the checkpointed one (code_stream.py)."""
    from detailflow.pipelines.data.code_stream import CodeStream, CodeStreamConfig
    from detailflow.pipelines.data.plan import resume_start
    from detailflow.platform.storage import Storage

    sc = CodeStreamConfig(micro_batch=cfg.micro_batch, seed=cfg.seed, correction_prob=cfg.correction_prob,
                          window_groups=cfg.window_blocks)
    return iter(CodeStream(Storage(ctx.settings), config["_codes_version"], "train", sc, rank=ctx.rank,
                           world=ctx.world, start=resume_start(ctx.data_position(state))))


def _ema_bytes(full: dict, ema) -> bytes:
    """The whole EMA (gathered from every rank's pieces) in EMA.state_dict's layout."""
    from safetensors.torch import save

    state = {f"shadow.{k}": v.contiguous() for k, v in full.items()}
    state["decay"] = torch.tensor(ema.decay, dtype=torch.float64)
    state["num_updates"] = torch.tensor(ema.num_updates, dtype=torch.int64)
    return save(state)


def ema_checkpoint_files(full: dict, ema, rank: int) -> dict[str, bytes] | None:
    """A checkpoint's extra files: the whole EMA (1.3 GB for DetailFlow-16's AR model) serialised on
    rank 0 only, the one rank that writes extra files; None on every other rank (building the bytes
    there too cost each rank that host memory and time, for nothing)."""
    return {EMA_FILE: _ema_bytes(full, ema)} if rank == 0 else None


def _restore_ema(ema, checkpoint) -> None:
    """Each rank takes its pieces from the checkpoint's whole EMA (so any world size resumes);
    reads that one file, not the checkpoint's shards."""
    from safetensors.torch import load

    from detailflow.platform import checkpoints

    try:
        state = load(checkpoints.read_file(checkpoint, EMA_FILE))
    except FileNotFoundError:
        return
    ema.load_full({k[len("shadow."):]: v for k, v in state.items() if k.startswith("shadow.")},
                  int(state["num_updates"]))


def _load_ema(net, full: dict) -> None:
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, value in full.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def sample_png(model_cfg, ema_full: dict, tokenizer, cfg: ARStageConfig, device) -> bytes:
    """Rows = classes; columns = decodes of the prefixes after each group, coarse to fine."""
    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.sampler import sample
    from detailflow.pipelines.evaluate.visuals import grid_png, strip_prefixes

    net = DetailFlowGPT(model_cfg).to(device)
    _load_ema(net, ema_full)
    net.eval()
    classes = torch.arange(min(cfg.sample_classes, model_cfg.num_classes), device=device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    with torch.no_grad():
        codes = sample(net, classes, cfg_scale=cfg.cfg_scale, generator=gen)
        ts = strip_prefixes(tokenizer.rmap.admissible)
        decoded = {t: tokenizer.decode(codes[:, :t].to("cpu"), t) for t in ts}
    rows = [[decoded[t][i] for t in ts] for i in range(len(classes))]
    return grid_png(rows, cell=max(48, tokenizer.cfg.image_size))


def train_loop(config: dict) -> None:
    """One worker's loop; runs unchanged in-process, on CPU workers and on GPUs."""
    from detailflow.models.ar import DetailFlowGPT
    from detailflow.models.ema import ShardedEMA
    from detailflow.platform import checkpoints
    from detailflow.platform import deepspeed_glue as dsg
    from detailflow.platform.progress import Progress

    cfg = stage_from_config(ARStageConfig, config)
    ctx = WorkerContext.from_ray(config, cfg)
    ctx.check_batch(cfg)  # before anything is built: the recipe's global batch on this worker group
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model_cfg = ar_config(cfg)
    model = DetailFlowGPT(model_cfg).to(ctx.device)  # on its device first: fused AdamW on GPU
    opt = dsg.make_optimizer(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay, kind="adamw")
    engine = ctx.engine(StepAdapter(model, "loss"), opt, cfg)
    zero3_external(engine)  # loss() calls self.forward directly: query_emb must be gathered too
    ctx.seed_rank(cfg.seed)  # weights are equal; from here each rank draws its own dropout/class drops
    # EMA of the fp32 masters, each rank over its own optimiser partition: no gather per step (ZeRO-3)
    ema = ShardedEMA(dsg.master_fragments(engine), decay=cfg.ema_decay)
    engines = {"ds": engine}
    resume = checkpoints.resume_checkpoint(config)
    state = ctx.restore(engines, config)  # refuses another world size before reading any shard
    if resume is not None:
        _restore_ema(ema, resume)
    resolved = resolved_config(config)
    tracker = ctx.tracker(cfg.experiment, resolved, state)
    start = int(state.get("step", 0))
    if start:
        tracker.log_metrics({"resumed_from_step": start}, step=start)
    tokenizer = None
    if ctx.rank == 0:
        from detailflow.pipelines.train.exports import load_tokenizer
        from detailflow.platform.storage import Storage

        tokenizer, _ = load_tokenizer(Storage(ctx.settings), config["_tokenizer_ref"])
    progress = Progress(STAGE, ctx.run_name, total=cfg.steps, start=start, unit="tok",
                        every_s=cfg.progress_every_s, enabled=ctx.rank == 0, tracker=tracker)
    stream = _stream(cfg, ctx, config, state)
    full_ema = None  # the whole EMA, gathered (all ranks) only when samples/checkpoints need it
    sums = DeviceSums()  # loss and corrected fraction of every micro-batch, summed on device
    seen, tic = 0, time.perf_counter()
    for step in range(start, cfg.steps):  # optimiser steps: LR schedule, EMA, cadence
        ctx.maybe_fail(cfg, step)
        lr = dsg.ar_lr(step, total_steps=cfg.steps, base_lr=cfg.lr, warmup_frac=cfg.warmup_frac)
        dsg.set_lr(engine.optimizer, lr)
        tokens = 0
        for _ in range(cfg.grad_accum):  # DeepSpeed steps the optimiser after the last one
            batch = next(stream)
            last_pos = batch["position"]
            loss = engine(batch["input"].to(ctx.device), batch["target"].to(ctx.device),
                          batch["label"].to(ctx.device))
            engine.backward(loss)
            engine.step()
            sums.add({"loss": loss, "corrected_fraction": batch["corrected"].float().mean()})
            tokens += batch["input"].numel() * ctx.world
        ema.update(dsg.master_fragments(engine))  # local, elementwise: this rank's fp32 pieces
        seen += tokens
        if WorkerContext.due(step, cfg.log_every, cfg.steps):
            dt = time.perf_counter() - tic
            logs = dsg.mean_over_ranks(step_logs(sums, engine, lr=lr,  # one host transfer; all ranks
                                                 tokens_per_s=seen / max(dt, 1e-9)))
            tracker.log_metrics(logs, step=step)
            progress.loss = logs["loss"]
            seen, tic = 0, time.perf_counter()
        sample_due = WorkerContext.due(step, cfg.eval_every, cfg.steps)
        ckpt_due = WorkerContext.due(step, cfg.checkpoint_every, cfg.steps)
        if sample_due or ckpt_due:
            full_ema = dsg.gather_fragments(ema.fragments_of_shadow(), ctx.device)  # all ranks
        if sample_due and tokenizer is not None:
            tracker.log_png(sample_png(model_cfg, full_ema, tokenizer, cfg, ctx.device),
                            f"samples/step_{step + 1:06d}.png")
        if ckpt_due:
            ema_file = ema_checkpoint_files(full_ema, ema, ctx.rank)
            ctx.checkpoint(engines, {} if progress.loss is None else {"loss": progress.loss}, step=step + 1,
                           tracker=tracker, resolved=resolved, extra_files=ema_file,
                           data_position=last_pos._asdict())
        progress.update(step + 1, tokens)
    if full_ema is None:  # nothing left to train (a resubmitted finished run)
        full_ema = dsg.gather_fragments(ema.fragments_of_shadow(), ctx.device)
    if ctx.rank == 0:
        _export_ema(model_cfg, full_ema, cfg, ctx, config, tracker)
    tracker.finish()


def _export_ema(model_cfg, ema_full: dict, cfg: ARStageConfig, ctx, config: dict, tracker) -> None:
    """Rank 0: the EMA weights as the AR export, uploaded and logged on the MLflow run as a model."""
    from detailflow.models.ar import DetailFlowGPT
    from detailflow.pipelines.train.exports import export_prefix
    from detailflow.platform.checkpoints import uploaded_export
    from detailflow.platform.storage import Storage

    net = DetailFlowGPT(model_cfg)
    _load_ema(net, ema_full)
    storage = Storage(ctx.settings)
    export_cfg = {"kind": "ar", "model": cfg.model, "run_name": ctx.run_name, "weights": "ema",
                  "tokenizer": config["_tokenizer_ref"], "ar": dataclasses.asdict(model_cfg)}
    with uploaded_export(storage, net, export_cfg, export_prefix(ctx.run_name)) as d:
        tracker.log_export(d, export_cfg, uri=storage.uri(export_prefix(ctx.run_name)), step=cfg.steps,
                           checkpoint_uri=tracker.last_checkpoint[1] if tracker.last_checkpoint else None)


def run(cfg: ARStageConfig, settings, accelerator=None) -> dict:
    """Driver: read the code shards, check them against the model, fit. Returns {run_name, export_uri}.
    accelerator: a custom resource each rank's bundle asks for (raytrain.launch), e.g. {"sim_gpu": 1}."""
    from detailflow.pipelines.data.code_stream import code_blocks
    from detailflow.pipelines.data.codes import codes_prefix
    from detailflow.pipelines.train.exports import export_prefix, resolve_export
    from detailflow.pipelines.train.stage_config import run_name as make_run_name
    from detailflow.platform import raytrain
    from detailflow.platform.storage import Storage

    if not cfg.tokenizer:
        raise ValueError("set tokenizer=<tokenizer run name or s3:// export URI> (its codes are the data)")
    storage = Storage(settings)
    tok_key, version = resolve_export(storage, cfg.tokenizer)
    version = cfg.codes_version or version
    manifest = storage.read_manifest(codes_prefix(version, "train"))
    if manifest is None:
        raise FileNotFoundError(f"no codes at {storage.uri(codes_prefix(version, 'train'))}; run "
                                f"`detailflow extract-codes --tokenizer {cfg.tokenizer} --dataset <name>`")
    model_cfg = ar_config(cfg)
    if manifest.get("num_tokens") != model_cfg.num_tokens:
        raise ValueError(f"codes have {manifest.get('num_tokens')} tokens but model {cfg.model!r} expects "
                         f"{model_cfg.num_tokens}")
    if manifest.get("codebook_size") not in (None, model_cfg.vocab_size):
        raise ValueError(f"codes use a codebook of {manifest['codebook_size']} but the AR vocab is "
                         f"{model_cfg.vocab_size}")
    cfg = resolve_batch(cfg)  # the recipe's global batch on num_workers (or refuse before any worker)
    resolved = dataclasses.asdict(cfg)
    name = make_run_name(STAGE, cfg.name, cfg.date, resolved)
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and settings.resolved_device().startswith("cuda"))
    code_blocks(manifest)  # refuse a code set the stream cannot read before any worker starts
    config = {**resolved, "_tokenizer_ref": storage.uri(tok_key), "_codes_version": version}
    raytrain.launch(train_loop, config, settings, run_name=name,
                    num_workers=cfg.num_workers, use_gpu=use_gpu, cpus_per_worker=cfg.cpus_per_worker,
                    reader_cpus=cfg.reader_cpus,  # the reader tasks' CPUs, in the rank's bundle
                    max_failures=cfg.max_failures, num_to_keep=cfg.num_to_keep, accelerator=accelerator)
    return {"run_name": name, "export_uri": storage.uri(export_prefix(name)), "codes_version": version}
