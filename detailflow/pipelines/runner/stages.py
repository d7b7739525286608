"""Stage kinds a pipeline file can name: each adapts one existing stage to `fn(params, ctx) -> outputs`.

Usage:
    kind = KINDS["train-tokenizer"]
    outputs = kind.fn({"config": "configs/tokenizer-tiny.yaml", "overrides": {"steps": 50}}, ctx)
    kind.outputs        # the keys later stages may reference as ${stages.<name>.<key>}
    kind.volatile       # True: always runs (its input lives outside the pipeline, e.g. a source folder)

A kind never re-implements its stage: it loads the stage's typed config (file + overrides, with the
stage's own validation), applies the pipeline's resources, calls the stage's `run`, and returns the
small dict of names/URIs the next stages need. Resumability is the stage's own (deterministic run
names resume their checkpoints; ingest resumes by shard markers; extraction by its manifest).

Where work runs (DESIGN.md "Where work runs"): evaluation (evaluate-tokenizer, evaluate-generator, the
promote stage's generator evaluation), the extraction driver (extract-codes: its Ray Data pipeline, the
ten-crop/eval writes) and the tokenizer's consolidation (train-tokenizer's export) run through
platform.placement.run_placed with the stage's `resources:` keys `cpus` (default 1), `gpus` and
`accelerator` ({custom resource: amount}): as one Ray task on a worker node of a cluster, in this
process on a one-node local Ray or without Ray. `gpus` > 0 also sets the evaluation's torch device to
cuda. Training ranks (train-tokenizer, train-ar) also ask for `accelerator` in their bundles (one
rank per simulated GPU).
The inner workers keep their own keys (num_workers / cpus_per_worker / gpus_per_worker for training
ranks, num_actors / gpus_per_worker for evaluation and extraction actors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from detailflow.pipelines.runner.stage_idx import class_score, import_idx
from detailflow.pipelines.runner.stage_rayservice import check_rayservice
from detailflow.platform.placement import Placement, run_placed


@dataclass
class StageContext:
    settings: object  # platform Settings
    pipeline: str  # pipeline name
    stage: str  # stage name
    identity: str  # the stage's content identity (runner.identity): training runs are named by it
    resources: dict  # the stage's resources block
    log: Callable[[str], None] = print  # progress lines
    code_version: str = ""  # package@commit[#image] this pipeline runs (lineage)


@dataclass(frozen=True)
class Kind:
    fn: Callable[[dict, StageContext], dict]  # runs the stage, returns its outputs
    outputs: tuple[str, ...]  # keys of the outputs dict
    volatile: bool = False  # always run (input outside the pipeline); otherwise skipped by content hash
    config_keys: tuple[str, ...] = ("config",)  # params naming files whose CONTENT enters the hash
    exists: Callable[[dict, StageContext], bool] | None = None  # outputs still there? (None: assume so)


def _stage_config(cls, params: dict, ctx: StageContext, extra: dict):
    from detailflow.pipelines.train.stage_config import load_stage_config

    overrides = {**(params.get("overrides") or {}), **extra}
    items = [f"{k}={_as_text(v)}" for k, v in overrides.items()]
    return load_stage_config(cls, params.get("config"), items)


def _as_text(value) -> str:
    import json

    return json.dumps(value) if isinstance(value, dict | list | bool) else str(value)


def _training_resources(ctx: StageContext) -> dict:
    r, out = ctx.resources, {"identity": ctx.identity, "code_version": ctx.code_version}
    if "num_workers" in r:
        out["num_workers"] = r["num_workers"]
    if "cpus_per_worker" in r:
        out["cpus_per_worker"] = r["cpus_per_worker"]
    if r.get("gpus_per_worker"):
        out["device"] = "cuda"
    return out


def _placement(ctx: StageContext) -> Placement:
    """The stage's own task: resources `cpus`, `gpus`, `accelerator` (module docstring)."""
    return Placement.from_resources(ctx.resources)


def _placed_eval_device(placement: Placement) -> dict:
    return {"device": "cuda"} if placement.uses_gpu else {}


def synth(params: dict, ctx: StageContext) -> dict:
    from detailflow.pipelines.data import synth as synth_mod

    out = Path(params["out"])
    counts = synth_mod.write_folder(
        out,
        size=int(params.get("size", 32)),
        per_class=int(params["per_class"]),
        val_per_class=params.get("val_per_class"),
        seed=int(params.get("seed", 0)),
        fmt=params.get("fmt", "png"),
    )
    return {"path": str(out), "train_images": counts.get("train", 0), "val_images": counts.get("val", 0)}


def ingest(params: dict, ctx: StageContext) -> dict:
    from detailflow.pipelines.data.ingest import IngestConfig
    from detailflow.pipelines.data.ingest import ingest as run_ingest
    from detailflow.platform.storage import Storage

    fields = {f.name for f in dataclasses.fields(IngestConfig)}
    unknown = set(params) - fields - {"src", "local"}
    if unknown:
        raise ValueError(
            f"ingest: unknown params {sorted(unknown)}; known: src, local, {', '.join(sorted(fields))}"
        )
    cfg = IngestConfig(**{k: v for k, v in params.items() if k in fields})
    if params.get("local"):
        cfg.use_ray = False
    elif ctx.resources.get("data_cpus"):
        cfg.task_cpus = float(ctx.resources["data_cpus"])
    manifest = run_ingest(Storage(ctx.settings), str(params["src"]), cfg)
    return {
        "name": cfg.name,
        "split": cfg.split,
        "version": manifest.get("version", ""),
        "num_images": manifest["num_images"],
        "num_rejected": manifest["num_rejected"],
    }


def _check_dataset_version(cfg, ctx: StageContext, split: str = "train") -> None:
    """Training reads the version the pipeline recorded (its immutable manifest, not the moving
    pointer: another ingest since changes nothing a run or its resume reads); fail fast, naming it,
    when that version is not published."""
    from detailflow.pipelines.data.reader import read_manifest_checked
    from detailflow.platform.storage import Storage

    if cfg.dataset_version:
        read_manifest_checked(Storage(ctx.settings), cfg.dataset, split, cfg.dataset_version)


def _export_exists(out: dict, ctx: StageContext) -> bool:
    """The export's pointer AND the weights it points to are there (platform/export_store.py)."""
    from detailflow.models.export import WEIGHTS_NAME
    from detailflow.platform.export_store import export_content
    from detailflow.platform.storage import Storage

    st, uri = Storage(ctx.settings), out.get("export_uri", "")
    if not uri.startswith(f"s3://{st.bucket}/"):
        return False
    content = export_content(st, uri[len(f"s3://{st.bucket}/"):])
    return content is not None and st.exists(f"{content[0]}/{WEIGHTS_NAME}")


def _codes_exist(out: dict, ctx: StageContext) -> bool:
    from detailflow.pipelines.data.codes import codes_prefix
    from detailflow.platform.storage import Storage

    return Storage(ctx.settings).read_manifest(codes_prefix(out["version"], "train")) is not None


def train_tokenizer(params: dict, ctx: StageContext) -> dict:
    from detailflow.pipelines.train.tokenizer import TokenizerStageConfig, run

    cfg = _stage_config(TokenizerStageConfig, params, ctx, _training_resources(ctx))
    _check_dataset_version(cfg, ctx)
    info = run(cfg, ctx.settings, placement=_placement(ctx), log=ctx.log,
               accelerator=ctx.resources.get("accelerator"))
    return {"run_name": info["run_name"], "export_uri": info["export_uri"], "dataset": cfg.dataset}


def extract_codes(params: dict, ctx: StageContext) -> dict:
    from detailflow.pipelines.train.extract_codes import ExtractConfig
    from detailflow.pipelines.train.extract_codes import extract_codes as run_extract

    r = ctx.resources
    extra = {"num_actors": r["num_actors"]} if "num_actors" in r else {}
    if r.get("gpus_per_worker"):
        extra["use_gpu"] = True
    cfg = ExtractConfig(**{**params, **extra})
    info = run_placed(run_extract, cfg, ctx.settings, placement=_placement(ctx),
                      name=f"{ctx.stage}: extract-codes", log=ctx.log)
    return {
        "version": info["version"],
        "num_rows": info["num_rows"],
        "tokenizer": cfg.tokenizer,
        "run": info.get("run") or "",
    }


def train_ar(params: dict, ctx: StageContext) -> dict:
    from detailflow.pipelines.train.ar import ARStageConfig, run

    cfg = _stage_config(ARStageConfig, params, ctx, _training_resources(ctx))
    info = run(cfg, ctx.settings, accelerator=ctx.resources.get("accelerator"))
    return {"run_name": info["run_name"], "export_uri": info["export_uri"], "tokenizer": cfg.tokenizer}


def _scalars(results: dict) -> dict:
    return {k: v for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def evaluate_tokenizer(params: dict, ctx: StageContext) -> dict:
    from detailflow.pipelines.evaluate.tokenizer_eval import TokenizerEvalConfig
    from detailflow.pipelines.evaluate.tokenizer_eval import evaluate_tokenizer as run_eval

    placement = _placement(ctx)
    cfg = _stage_config(TokenizerEvalConfig, params, ctx, _placed_eval_device(placement))
    results = run_placed(run_eval, cfg, ctx.settings, placement=placement,
                         name=f"{ctx.stage}: evaluate-tokenizer", log=ctx.log)
    return {
        "mlflow_run_id": results["mlflow_run_id"],
        "metrics": _scalars(results),
        "tokenizer": cfg.tokenizer,
    }


def evaluate_generator(params: dict, ctx: StageContext) -> dict:
    from detailflow.pipelines.evaluate.generator_eval import GeneratorEvalConfig
    from detailflow.pipelines.evaluate.generator_eval import evaluate_generator as run_eval

    placement = _placement(ctx)
    extra = {"num_actors": ctx.resources["num_actors"]} if "num_actors" in ctx.resources else {}
    if ctx.resources.get("gpus_per_worker"):
        extra["use_gpu"] = True
    cfg = _stage_config(GeneratorEvalConfig, params, ctx, {**extra, **_placed_eval_device(placement)})
    results = run_placed(run_eval, cfg, ctx.settings, placement=placement,
                         name=f"{ctx.stage}: evaluate-generator", log=ctx.log)
    return {"mlflow_run_id": results["mlflow_run_id"], "metrics": _scalars(results), "ar": cfg.ar}


def promote(params: dict, ctx: StageContext) -> dict:
    """Register + gated promotion. A gate rejection is a finished stage (a decision, recorded on the
    version); an evaluation that failed is a failed stage (the champion stays where it was)."""
    import functools

    from detailflow.pipelines.registry.promote import PromoteConfig, load_evaluator
    from detailflow.pipelines.registry.promote import promote as run_promote

    cfg = _stage_config(PromoteConfig, params, ctx, {})
    # the generator evaluation runs placed like evaluate-generator (the registry work stays here)
    evaluator = functools.partial(run_placed, load_evaluator(cfg.evaluator), placement=_placement(ctx),
                                  name=f"{ctx.stage}: generator evaluation", log=ctx.log)
    decision = run_promote(cfg, ctx.settings, evaluator=evaluator)
    if decision["decision"] == "failed":
        raise RuntimeError(
            f"promotion of {cfg.name} v{decision.get('version')} failed: {decision.get('reason')}"
        )
    ctx.log(
        f"[promote] {cfg.name}-generator v{decision['version']}: {decision['decision']} "
        f"({decision.get('reason')})"
    )
    return {
        "model": cfg.name,
        "version": str(decision["version"]),
        "decision": decision["decision"],
        "champion": str(decision["version"])
        if decision["decision"] in ("promoted", "already-champion")
        else str(decision.get("champion_version") or ""),
    }


def import_released(params: dict, ctx: StageContext) -> dict:
    """`detailflow weights import detailflow`: released tokenizer + GPT checkpoints -> platform exports
    runs/<name>-tokenizer/export and runs/<name>-ar/export (pipelines.registry.weights_import)."""
    from detailflow.pipelines.registry.weights_import import import_detailflow
    from detailflow.platform.storage import Storage

    out = import_detailflow(Storage(ctx.settings), str(params["tokenizer"]), str(params["generator"]),
                            str(params["name"]), "ema" if params.get("ema", True) else "model")
    for note in out["notes"]:
        ctx.log(f"[import] {note}")
    return {"tokenizer": out["tokenizer"]["uri"], "export_uri": out["ar"]["uri"], "ar": out["ar"]["uri"],
            "sha256": out["ar"]["sha256"]}


def deploy(params: dict, ctx: StageContext) -> dict:
    """`detailflow serve up` in a child process: locally it starts its own Ray head so the endpoint
    outlives this pipeline process (whose in-process Ray ends with it); on a cluster it deploys there.
    Idempotent, so the kind is volatile: every run makes sure the champion is being served."""
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-c",
        "from detailflow.cli import main; main()",
        "serve",
        "up",
        "--json",
        "--config",
        str(params.get("config", "configs/serve-local.yaml")),
        "--model",
        str(params["model"]),
    ]
    if params.get("port"):
        cmd += ["--port", str(params["port"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=float(params.get("timeout_s", 600)))
    if proc.returncode != 0:
        raise RuntimeError(f"serve up exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    out = "\n" + proc.stdout  # the JSON object starts at column 0 after whatever Ray printed
    info = json.loads(out[out.rindex("\n{") + 1 :])
    return {
        "url": info["url"],
        "playground": info.get("playground", info["url"] + "/"),
        "model": params["model"],
    }


KINDS: dict[str, Kind] = {
    "synth": Kind(synth, ("path", "train_images", "val_images"),
                  exists=lambda out, ctx: Path(out["path"]).is_dir()),
    "ingest": Kind(ingest, ("name", "split", "version", "num_images", "num_rejected"), volatile=True),
    "train-tokenizer": Kind(train_tokenizer, ("run_name", "export_uri", "dataset"), exists=_export_exists),
    "extract-codes": Kind(extract_codes, ("version", "num_rows", "tokenizer", "run"), exists=_codes_exist),
    "train-ar": Kind(train_ar, ("run_name", "export_uri", "tokenizer"), exists=_export_exists),
    "evaluate-tokenizer": Kind(evaluate_tokenizer, ("mlflow_run_id", "metrics", "tokenizer")),
    "evaluate-generator": Kind(evaluate_generator, ("mlflow_run_id", "metrics", "ar")),
    "promote": Kind(promote, ("model", "version", "decision", "champion")),
    "import-released": Kind(import_released, ("tokenizer", "export_uri", "ar", "sha256"),
                            exists=_export_exists),
    "deploy": Kind(deploy, ("url", "playground", "model"), volatile=True),
    "check-rayservice": Kind(check_rayservice, ("url", "model", "version"), volatile=True),
    "import-idx": Kind(import_idx, ("path", "train_images", "val_images"),
                       exists=lambda out, ctx: Path(out["path"]).is_dir()),
    "class-score": Kind(class_score, ("class_accuracy", "fid", "kid", "kid_std", "classifier_test_accuracy",
                                      "out"),
                        exists=lambda out, ctx: (Path(out["out"]) / "score.json").is_file()),
}
