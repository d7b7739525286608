"""CLI: `detailflow eval tokenizer | generator | show`.

    detailflow eval tokenizer --tokenizer <tokenizer run | s3://.../export> --dataset shapes --split val
    detailflow eval generator --ar <AR run | s3://.../export> --dataset shapes --split val --n 1000 \
        --seed 0 --cfg-scale 1.5 --cfg-sweep 1.0,1.5,3.0 [--num-actors 2] [--gpu]
    detailflow eval generator --ar <run> inception_weights=s3://bucket/eval/inception.pt chunk_size=25
    detailflow eval show <mlflow run id>          # the results.json of a COMPLETE evaluation, else exit 1

Options set the common fields; any other field of TokenizerEvalConfig / GeneratorEvalConfig
(evaluate/tokenizer_eval.py, evaluate/generator_eval.py) is a key=value override, after an optional
--config YAML of those fields. Each evaluation is one MLflow run (experiment detailflow-eval) and
prints its results as one JSON object on the last line.
"""

from __future__ import annotations

import json

import click

from detailflow.platform.cli_settings import get_settings


def _load(cls, config_file, overrides, options: dict):
    from detailflow.pipelines.train.stage_config import load_stage_config

    items = [f"{k}={v}" for k, v in options.items() if v is not None] + list(overrides)
    try:
        return load_stage_config(cls, config_file, items)
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from exc


def _run(fn, cfg):
    try:
        res = fn(cfg, get_settings())
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(json.dumps(res, default=str))


@click.group(name="eval")
def eval():  # noqa: A001 - the command is called `eval`
    """Evaluate tokenizers and generators (one MLflow run each, experiment detailflow-eval)."""


_config = click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
                       help="YAML of evaluation-config fields.")


@eval.command(name="tokenizer")
@click.option("--tokenizer", default=None, help="Tokenizer run name or s3:// export URI.")
@click.option("--dataset", default=None, help="Dataset name (default shapes).")
@click.option("--split", default=None, help="Held-out split (default val).")
@click.option("--max-images", type=int, default=None, help="At most this many images (0 = all).")
@_config
@click.argument("overrides", nargs=-1)
def tokenizer(tokenizer, dataset, split, max_images, config_file, overrides):
    """rFID, PSNR/SSIM per prefix t (curves), codebook usage and perplexity."""
    from detailflow.pipelines.evaluate.tokenizer_eval import TokenizerEvalConfig, evaluate_tokenizer

    cfg = _load(TokenizerEvalConfig, config_file, overrides,
                {"tokenizer": tokenizer, "dataset": dataset, "split": split, "max_images": max_images})
    _run(evaluate_tokenizer, cfg)


@eval.command(name="generator")
@click.option("--ar", default=None, help="AR run name or s3:// export URI.")
@click.option("--tokenizer", default=None, help="Tokenizer (default: the one the AR export names).")
@click.option("--dataset", default=None, help="Reference dataset (default shapes).")
@click.option("--split", default=None, help="Reference split (default val).")
@click.option("--n", type=int, default=None, help="Class-balanced samples (default 1000).")
@click.option("--seed", type=int, default=None, help="Sampling seed (default 0).")
@click.option("--cfg-scale", type=float, default=None, help="CFG of the headline samples (default 1.5).")
@click.option("--cfg-sweep", default=None, help="Comma-separated extra CFG scales, e.g. 1.0,1.5,3.0.")
@click.option("--num-actors", type=int, default=None, help="Ray sampling actors (default 2).")
@click.option("--gpu", "use_gpu", is_flag=True, default=None, help="One GPU per sampling actor.")
@_config
@click.argument("overrides", nargs=-1)
def generator(ar, tokenizer, dataset, split, n, seed, cfg_scale, cfg_sweep, num_actors, use_gpu, config_file,
              overrides):
    """gFID / KID / precision / recall, optional CFG sweep, held-out token NLL."""
    from detailflow.pipelines.evaluate.generator_eval import GeneratorEvalConfig, evaluate_generator

    sweep = None if cfg_sweep is None else "[" + cfg_sweep + "]"
    cfg = _load(GeneratorEvalConfig, config_file, overrides,
                {"ar": ar, "tokenizer": tokenizer, "dataset": dataset, "split": split, "n": n, "seed": seed,
                 "cfg_scale": cfg_scale, "cfg_sweep": sweep, "num_actors": num_actors,
                 "use_gpu": use_gpu})
    _run(evaluate_generator, cfg)


@eval.command(name="show")
@click.argument("run_id")
def show(run_id):
    """Print the results of a complete evaluation run; exit 1 if it is running, failed or partial."""
    from mlflow.tracking import MlflowClient

    from detailflow.pipelines.evaluate.tracking import read_complete

    res = read_complete(MlflowClient(get_settings().mlflow_tracking_uri), run_id)
    if res is None:
        raise click.ClickException(f"run {run_id} is not a complete evaluation (running, failed or killed)")
    click.echo(json.dumps(res, indent=2))
