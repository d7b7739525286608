"""Writing one shard of an ingest: read (with retries), decode-check, encode to Parquet, PUT, then the
done marker that lets a re-run skip it (the ingest protocol is in ingest.py's docstring).

    marker = write_shard(storage, vprefix, 3, items, class_to_index, keys_digest(items))
    marker_valid(storage, vprefix, read_marker(storage, vprefix, shard_name(3)), digest, verify=False)
"""

from __future__ import annotations

import io
import logging
import random
import time

from detailflow.pipelines.data import sources
from detailflow.pipelines.data.images import DecodeError, inspect_image
from detailflow.pipelines.data.sources import Item

log = logging.getLogger(__name__)

COLUMNS = ["key", "label", "image", "width", "height"]


class SourceReadError(RuntimeError):
    """A source file could not be read even after retries: the ingest fails (never a rejection)."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def encode_table(rows: list[tuple], row_group_rows: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys, labels, images, widths, heights = (list(c) for c in zip(*rows, strict=True))
    table = pa.table({
        "key": pa.array(keys, pa.string()),
        "label": pa.array(labels, pa.int32()),
        "image": pa.array(images, pa.binary()),
        "width": pa.array(widths, pa.int32()),
        "height": pa.array(heights, pa.int32()),
    })
    buf = io.BytesIO()
    # images are already compressed: Parquet compression would only cost CPU
    pq.write_table(table, buf, row_group_size=row_group_rows, compression="none")
    return buf.getvalue()


def read_with_retries(item: Item, storage, attempts: int = 4, base_delay: float = 0.25) -> bytes:
    """The item's bytes; OSError and transient S3 errors are retried with backoff, then (like any
    other S3 error) raised as SourceReadError naming the path and cause."""
    from botocore.exceptions import BotoCoreError, ClientError

    from detailflow.platform.storage import _is_transient

    for attempt in range(1, attempts + 1):
        try:
            # looked up on the module (not imported by name) so tests can inject read faults
            return sources.read_item(item, storage)
        except (OSError, BotoCoreError, ClientError) as e:
            if attempt == attempts or not (isinstance(e, OSError) or _is_transient(e)):
                raise SourceReadError(f"cannot read {sources.describe(item)} (key {item.key}) after "
                                      f"{attempt} attempt(s): {type(e).__name__}: {e}") from e
            delay = base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("read %s failed (%s), retry %d/%d in %.2fs", sources.describe(item), e, attempt,
                        attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def write_shard(storage, prefix: str, index: int, items: list[Item] | str, class_to_index: dict[str, int],
                digest: str, row_group_rows: int = 64, read_attempts: int = 4) -> dict:
    """Decode-check every item, write the shard object, then its done marker. Returns the marker.
    `items`: the shard's items, or the key of its plan object (folder_plan.py).

    A read failure raises SourceReadError before anything is written, so the shard has no marker."""
    if isinstance(items, str):
        from detailflow.pipelines.data.folder_plan import load_plan

        items = load_plan(storage, items)
    rows, rejected = [], []
    counts: dict[str, int] = {}
    for it in items:
        if not it.ext_ok:
            rejected.append({"key": it.key, "reason": "not an image file extension"})
            continue
        if it.class_name not in class_to_index:
            rejected.append({"key": it.key, "reason": f"class {it.class_name!r} not in the class list"})
            continue
        data = read_with_retries(it, storage, read_attempts)  # read errors fail the task, never reject
        try:
            w, h, _, _ = inspect_image(data)
        except DecodeError as e:  # the bytes were read and are not an image: a permanent rejection
            rejected.append({"key": it.key, "reason": str(e)})
            continue
        rows.append((it.key, class_to_index[it.class_name], data, w, h))
        counts[it.class_name] = counts.get(it.class_name, 0) + 1
    name = shard_name(index)
    marker = {"index": index, "name": name, "keys_digest": digest, "rows": len(rows),
              "rejected": rejected, "counts": counts, "sha256": None, "bytes": 0,
              "row_groups": -(-len(rows) // row_group_rows), "row_group_rows": row_group_rows}
    if rows:
        data = encode_table(rows, row_group_rows)
        marker["sha256"] = storage.put_bytes(f"{prefix}/{name}", data)
        marker["bytes"] = len(data)
    storage.put_json(f"{prefix}/_done/{name}.json", marker)
    return marker


def marker_valid(storage, prefix: str, marker: dict | None, digest: str, verify: bool) -> bool:
    if marker is None or marker.get("keys_digest") != digest:
        return False
    if not marker["rows"]:
        return True
    key = f"{prefix}/{marker['name']}"
    try:
        head = storage.head(key)
    except Exception:
        return False
    meta_sha = head.get("Metadata", {}).get("sha256")
    if head.get("ContentLength") != marker["bytes"] or meta_sha != marker["sha256"]:
        return False
    if verify:
        from detailflow.platform.storage import ChecksumMismatch

        try:
            storage.get_bytes(key, expected_sha256=marker["sha256"])
        except ChecksumMismatch:
            return False
    return True


def read_marker(storage, prefix: str, name: str) -> dict | None:
    key = f"{prefix}/_done/{name}.json"
    return storage.get_json(key) if storage.exists(key) else None
