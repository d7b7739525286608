"""ImageNet (ILSVRC2012) val labels from the official devkit, in the ingest's labels format.

Usage:
    detailflow data convert-val-labels ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt \\
        ILSVRC2012_devkit_t12/data/meta.mat --out val_labels.txt
    aws s3 cp val_labels.txt s3://imagenet-raw/ILSVRC2012/val_labels.txt   # what the pipelines name

The ground truth file has one ILSVRC2012_ID (1..1000) per line; line i is the class of
`ILSVRC2012_val_{i:08d}.JPEG`. The IDs are the devkit's own order (not sorted WNIDs: ID 1 is
n02119789), mapped to WNIDs by `meta.mat`'s `synsets` (the 1000 leaf entries, num_children 0).
`meta` may instead be a text file of `<ILSVRC2012_ID> <WNID>` lines (e.g. exported once from the
.mat); reading the .mat itself needs scipy.
"""

from __future__ import annotations

from pathlib import Path


def read_meta(meta: str | Path) -> dict[int, str]:
    """{ILSVRC2012_ID: WNID} for the 1000 classes, from meta.mat or an `<id> <wnid>` text file."""
    meta = Path(meta)
    if not meta.is_file():
        raise FileNotFoundError(f"devkit meta {meta} does not exist")
    if meta.suffix == ".mat":
        try:
            from scipy.io import loadmat
        except ImportError as e:
            raise ImportError(f"reading {meta} needs scipy (pip install scipy), or pass a text file of "
                              "'<ILSVRC2012_ID> <WNID>' lines") from e
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        names = synsets.dtype.names
        out = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets
               if "num_children" not in names or int(s["num_children"]) == 0}
    else:
        out = {}
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if line.strip() and not line.startswith("#"):
                parts = line.split()
                if len(parts) != 2 or not parts[0].isdigit():
                    raise ValueError(f"{meta} line {n}: expected '<ILSVRC2012_ID> <WNID>', got {line!r}")
                out[int(parts[0])] = parts[1]
    leaf = {i: w for i, w in out.items() if 1 <= i <= 1000}
    if sorted(leaf) != list(range(1, len(leaf) + 1)) or len(set(leaf.values())) != len(leaf):
        raise ValueError(f"{meta}: ILSVRC2012_IDs must be 1..N with distinct WNIDs")
    return leaf


def val_labels(ground_truth: str | Path, meta: str | Path) -> list[tuple[str, str]]:
    """[(ILSVRC2012_val_00000001.JPEG, wnid), ...] in file order."""
    ids = read_meta(meta)
    out = []
    for n, line in enumerate(Path(ground_truth).read_text().split(), 1):
        if not line.isdigit() or int(line) not in ids:
            raise ValueError(f"{ground_truth} entry {n}: {line!r} is not an ILSVRC2012_ID in 1..{len(ids)}")
        out.append((f"ILSVRC2012_val_{n:08d}.JPEG", ids[int(line)]))
    if not out:
        raise ValueError(f"{ground_truth} is empty")
    return out


def write_val_labels(ground_truth: str | Path, meta: str | Path, out: str | Path) -> int:
    """Write the labels file (sources.LABELS_FORMAT); returns the number of lines."""
    pairs = val_labels(ground_truth, meta)
    Path(out).write_text("".join(f"{f} {w}\n" for f, w in pairs))
    return len(pairs)
