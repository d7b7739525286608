"""`detailflow weights ...`: public weights into the platform's own formats.

    detailflow weights import detailflow --tokenizer PATH_OR_S3 --generator PATH_OR_S3 --name df16 [--raw]
    detailflow weights convert siglip2 SRC DST --model detailflow-16   # SigLIP2 tower -> encoder init

`import detailflow` writes runs/<name>-tokenizer/export and runs/<name>-ar/export (what training writes),
so `registry register --name <name> --ar <name>-ar` and `train ar tokenizer=<name>-tokenizer` take them.
`convert siglip2` prints the sha256 to put in encoder_init_sha256 beside encoder_init_path.
Exit codes: 0 ok, 1 a file that cannot be read/converted, 2 usage.
"""

from __future__ import annotations

import json

import click

from detailflow.platform.cli_settings import get_settings


def _storage():
    from detailflow.platform.storage import Storage

    return Storage(get_settings())


@click.group(name="weights")
def weights():
    """Import released checkpoints / convert pretrained towers."""


@weights.group(name="import")
def import_group():
    """Import released model weights as platform exports."""


@import_group.command("detailflow")
@click.option("--tokenizer", required=True,
              help="Released tokenizer checkpoint (.pt), local path or s3:// URI.")
@click.option("--generator", required=True, help="Released GPT checkpoint (.pt), local path or s3:// URI.")
@click.option("--name", required=True, help="Base name: exports go to runs/<name>-tokenizer and <name>-ar.")
@click.option("--ema/--raw", "ema", default=True, show_default=True,
              help="Generator weights: the EMA copy (what the authors evaluate) or the raw ones.")
@click.option("--tokenizer-weights", type=click.Choice(["model", "ema"]), default="model", show_default=True,
              help="Tokenizer state dict to take (the released tokenizers are trained without EMA).")
@click.option("--enc-heads", type=int, default=None,
              help="Override the encoder's head count (non-standard towers).")
@click.option("--dec-heads", type=int, default=None, help="Override the decoder's head count.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def import_detailflow_cmd(tokenizer, generator, name, ema, tokenizer_weights, enc_heads, dec_heads, as_json):
    """Released DetailFlow tokenizer + GPT -> model.safetensors + config.json exports on S3 (with sha256)."""
    from detailflow.models.convert_released import ReleaseOptionError
    from detailflow.models.convert_siglip2 import WeightsFormatError
    from detailflow.pipelines.registry.weights_import import import_detailflow

    try:
        out = import_detailflow(_storage(), tokenizer, generator, name, "ema" if ema else "model",
                                tokenizer_weights, {"enc": enc_heads, "dec": dec_heads})
    except (WeightsFormatError, ReleaseOptionError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for part in ("tokenizer", "ar"):
        click.echo(f"{part:9s} {out[part]['uri']}  sha256 {out[part]['sha256']}")
    for note in out["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"next: detailflow registry register --name {name} --ar {out['ar']['uri']}")


@weights.group(name="convert")
def convert_group():
    """Convert pretrained networks to the layouts this project loads."""


@convert_group.command("siglip2")
@click.argument("src")
@click.argument("dst")
@click.option("--model", "model_name", default="detailflow-16", show_default=True,
              help="Model config whose tokenizer the init is for (enc_depth blocks, N latents, patch grid).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the latent-slot init.")
def convert_siglip2_cmd(src, dst, model_name, seed):
    """SigLIP2 vision tower (HF names, safetensors/torch) -> encoder_init_path file (safetensors)."""
    from detailflow.models.configs import get_model_config
    from detailflow.models.convert_siglip2 import WeightsFormatError
    from detailflow.pipelines.registry.weights_import import convert_siglip2_file

    try:
        tok_cfg = get_model_config(model_name).tokenizer
    except KeyError as exc:
        raise click.UsageError(str(exc)) from exc
    storage = _storage() if "s3://" in (src + dst) else None
    try:
        out = convert_siglip2_file(src, dst, tok_cfg, storage, seed)
    except (WeightsFormatError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {out['path']} ({out['keys']} tensors)  sha256 {out['sha256']}")
    click.echo(f"set: encoder_init_path={out['path']} encoder_init_sha256={out['sha256']}")
