"""`detailflow data ...`: synthesise, import, ingest to S3, verify and show datasets.

    detailflow data synth --name shapes --out /tmp/shapes --size 32 --per-class 200
    detailflow data import-idx IMAGES_IDX LABELS_IDX --out /tmp/fmnist --split train
    detailflow data ingest /tmp/shapes --name shapes --split train
    detailflow data ingest /tmp/shapes --name shapes --split val
    detailflow data verify shapes --split train
    detailflow data show shapes --split train --out shapes.png
"""

from __future__ import annotations

import json

import click

from detailflow.platform.cli_settings import get_settings


@click.group()
def data():
    """Datasets: synthesise, import, ingest to S3, verify, show."""


@data.command("synth")
@click.option("--name", default="shapes", show_default=True, type=click.Choice(["shapes"]),
              help="Built-in generator (spec §6.1 shapes: 5 shapes x 2 palettes).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (train/, val/).")
@click.option("--size", default=32, show_default=True, type=click.IntRange(8, 1024), help="Image side in px.")
@click.option("--per-class", default=100, show_default=True, type=click.IntRange(1),
              help="Train images per class.")
@click.option("--val-per-class", default=None, type=click.IntRange(1),
              help="Val images per class [per-class/5].")
@click.option("--seed", default=0, show_default=True, help="Generator seed (output is deterministic).")
@click.option("--format", "fmt", default="png", show_default=True, type=click.Choice(["png", "jpeg"]),
              help="PNG, or JPEG quality 95 4:4:4 (lower quality erases the 2 px stripes).")
def synth_cmd(name, out, size, per_class, val_per_class, seed, fmt):
    """Write the procedural class-conditional dataset as an ImageNet-style folder."""
    from tqdm import tqdm

    from detailflow.pipelines.data.synth import CLASS_NAMES, write_folder

    total = len(CLASS_NAMES) * (per_class + (val_per_class or max(1, per_class // 5)))
    with tqdm(total=total, desc="synth", unit="img") as bar:
        counts = write_folder(out, size=size, per_class=per_class, val_per_class=val_per_class, seed=seed,
                              fmt=fmt, progress=bar.update)
    click.echo(f"{name}: {counts} images in {out}")


@data.command("import-idx")
@click.argument("images_idx", type=click.Path(exists=True, dir_okay=False))
@click.argument("labels_idx", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--split", default="train", show_default=True, help="Split folder name under --out.")
@click.option("--size", default=32, show_default=True, type=click.IntRange(8, 1024),
              help="Output side in px.")
@click.option("--limit", default=None, type=click.IntRange(1), help="Import only the first N images.")
def import_idx_cmd(images_idx, labels_idx, out, split, size, limit):
    """Convert MNIST-family IDX files (raw or .gz) to an ImageNet-style folder of RGB PNGs."""
    from tqdm import tqdm

    from detailflow.pipelines.data.idx import import_idx

    try:
        with tqdm(desc="import-idx", unit="img") as bar:
            counts = import_idx(images_idx, labels_idx, out, split=split, size=size, limit=limit,
                                progress=bar.update)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{sum(counts.values())} images in {len(counts)} classes -> {out}/{split}")


@data.command("ingest")
@click.argument("src")
@click.option("--name", required=True,
              help="Dataset name: s3://<bucket>/datasets/<name>/<split>/v-<version>/ + _manifest.json.")
@click.option("--split", default="train", show_default=True, help="Split to ingest (folder under SRC).")
@click.option("--shard-mb", default=256.0, show_default=True, type=click.FloatRange(min=0.001),
              help="Target shard size in MB.")
@click.option("--labels", default=None,
              help="Labels (local file or s3:// URI) for flat split folders / split tars: one "
                   "'<file name> <class name>' per line (see `data convert-val-labels`).")
@click.option("--classes-from", default="train", show_default=True,
              help="Reuse this split's published class list ('' = derive from the files).")
@click.option("--seed", default=0, show_default=True, help="Shard-assignment shuffle seed.")
@click.option("--verify-existing", is_flag=True, help="Re-hash shards a previous run already wrote.")
@click.option("--local", "local", is_flag=True, help="Run in this process instead of Ray tasks.")
def ingest_cmd(src, name, split, shard_mb, labels, classes_from, seed, verify_existing, local):
    """Ingest SRC (folder, tar file(s) or s3:// prefix) into Parquet shards + _manifest.json."""
    from tqdm import tqdm

    from detailflow.pipelines.data.ingest import IngestConfig, SourceReadError, ingest
    from detailflow.platform.storage import Storage

    cfg = IngestConfig(name=name, split=split, shard_mb=shard_mb, labels=labels,
                       classes_from=classes_from or None, shuffle_seed=seed, verify_existing=verify_existing,
                       use_ray=not local)
    storage = Storage(get_settings())
    try:
        with tqdm(desc=f"ingest {name}/{split}", unit="img") as bar:
            manifest = ingest(storage, src, cfg, progress=bar.update)
    except (ValueError, FileNotFoundError, SourceReadError) as e:  # SourceReadError: a re-run resumes
        raise click.ClickException(str(e)) from e
    click.echo(f"{manifest['num_images']} images, {manifest['num_classes']} classes, "
               f"{len(manifest['shards'])} shards, {manifest['num_rejected']} rejected -> "
               f"{storage.uri(cfg.prefix)}/_manifest.json (version {manifest['version']})")
    for r in manifest["rejected"][:10]:
        click.echo(f"  rejected {r['key']}: {r['reason']}")


@data.command("convert-val-labels")
@click.argument("ground_truth", type=click.Path(exists=True, dir_okay=False))
@click.argument("meta", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Labels file to write ('<file name> <wnid>' per line); stage it beside the val tar.")
def convert_val_labels_cmd(ground_truth, meta, out):
    """ILSVRC2012 devkit ground truth (ILSVRC2012_validation_ground_truth.txt + meta.mat) -> labels."""
    from detailflow.pipelines.data.devkit import write_val_labels

    try:
        n = write_val_labels(ground_truth, meta, out)
    except (ValueError, ImportError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{n} val labels -> {out}")


@data.command("verify")
@click.argument("name")
@click.option("--split", default="train", show_default=True)
def verify_cmd(name, split):
    """Re-download every shard and check it against the manifest's sha256 (exit 1 on a problem)."""
    from detailflow.pipelines.data.ingest import verify_dataset
    from detailflow.platform.storage import Storage

    problems = verify_dataset(Storage(get_settings()), name, split)
    for p in problems:
        click.echo(p, err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in {name}/{split}")
    click.echo(f"{name}/{split}: every shard matches its checksum")


@data.command("show")
@click.argument("name")
@click.option("--split", default="train", show_default=True)
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Contact sheet PNG [NAME_SPLIT.png].")
@click.option("--per-class", default=8, show_default=True, type=click.IntRange(1, 64))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON instead.")
def show_cmd(name, split, out, per_class, as_json):
    """Print the manifest summary and write a contact sheet of a few images per class."""
    from detailflow.pipelines.data.show import show
    from detailflow.platform.storage import Storage

    storage = Storage(get_settings())
    if as_json:
        from detailflow.pipelines.data.ingest import dataset_prefix

        click.echo(json.dumps(storage.read_manifest(dataset_prefix(name, split)), indent=2))
        return
    for line in show(storage, name, split, out or f"{name}_{split}.png", per_class=per_class):
        click.echo(line)
