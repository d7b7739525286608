"""What POST /v1/generate answers: content negotiation and the response bodies (pure; app.py runs
render() in a worker thread, off the replica's event loop).

    choice = negotiate(request.headers.get("accept"), body.format, num_images)   # or NotAcceptable
    body, media_type, headers = render(choice, final.images, meta)

Representations (`format` in the body picks one; without it the Accept header does, by q-value, ties
going to the first listed; no Accept or */* gets the first):
    format=png  (default)  one image: `image/png`; several: `multipart/mixed` (RFC 2046), one image/png
                           part per image, in order, each with Content-Length, X-Image-Index, X-Class-Id,
                           X-Seed (the request's) and, on the engine backend, X-Image-Seed (the seed that
                           gives this image alone). Raw PNG bytes: no base64, no JSON parse; a client can
                           read the parts as they arrive.
    format=json            `application/json`: base64 PNGs + metadata (GenerateResponse).
    format=grid            `image/png`: all images in one grid (2 px white gaps); one image: that image.
Accept `image/png` for several images (no multipart) gets the grid. An Accept that allows none of the
candidates (e.g. text/csv, or format=json with Accept: image/png) is a 406 JSON error listing what is
offered. Metadata rides in headers on every representation: X-Model, X-Model-Version, X-Seed, X-Tokens,
X-Canvas, X-Class-Ids, X-Image-Count, X-Batch-Requests, X-Batch-Images, X-Replica, X-Cached and
Server-Timing (queue, sample, total in ms); X-Request-Id comes from front.py. `Vary: Accept` since the
body depends on it. The result cache holds images, not an encoding, so every format is served from it.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from detailflow.platform.serving import images as img

PNG, MULTIPART, JSON = "image/png", "multipart/mixed", "application/json"
# (kind, media type) a request of one / several images can be answered with, in the server's preference
SINGLE = (("png", PNG), ("json", JSON), ("multipart", MULTIPART))
MANY = (("multipart", MULTIPART), ("json", JSON), ("grid", PNG))
FORMAT_KINDS = {"png": {"png", "multipart"}, "json": {"json"}, "grid": {"grid", "png"}}
OFFERS = {"png": "image/png (format=png, one image)",
          "multipart": "multipart/mixed (format=png: one image/png part per image)",
          "json": "application/json (format=json: base64 PNGs)",
          "grid": "image/png (format=grid: all images in one PNG)"}


class NotAcceptable(ValueError):
    """No representation of this request is allowed by its Accept header: 406 with this message."""


@dataclass(frozen=True)
class Choice:
    kind: str  # png (one image) | multipart (one part per image) | json (base64) | grid (one PNG)
    media_type: str  # what the Content-Type will say (without the multipart boundary)


def parse_accept(header: str | None) -> list[tuple[str, str, float]]:
    """(type, subtype, q) per media range; a missing or blank header is */*. A range without a slash
    or with a q that is not a number in [0, 1] is skipped (as if absent), like most servers do."""
    out = []
    for item in (header or "").split(","):
        media, *params = [p.strip() for p in item.split(";")]
        if "/" not in media:
            continue
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = -1.0
        if 0.0 <= q <= 1.0:
            typ, _, sub = media.lower().partition("/")
            out.append((typ.strip(), sub.strip(), q))
    return out or [("*", "*", 1.0)]


def quality(ranges: list[tuple[str, str, float]], media_type: str) -> float:
    """q of the most specific range matching media_type (RFC 9110 12.5.1); 0 when none matches."""
    typ, sub = media_type.split("/")
    best, q = -1, 0.0
    for t, s, rq in ranges:
        spec = 2 if (t, s) == (typ, sub) else 1 if (t == typ and s == "*") else 0 if t == s == "*" else -1
        if spec > best:
            best, q = spec, rq
    return q if best >= 0 else 0.0


def negotiate(accept: str | None, fmt: str | None, num_images: int) -> Choice:
    ranges = parse_accept(accept)
    options = [(k, m) for k, m in (SINGLE if num_images == 1 else MANY)
               if fmt is None or k in FORMAT_KINDS[fmt]]
    scored = [(quality(ranges, m), -i, k, m) for i, (k, m) in enumerate(options)]
    q, _, kind, media = max(scored)
    if q <= 0.0:
        what = f"format={fmt}" if fmt else "this route"
        offers = "; ".join(OFFERS[k] for k, _ in options)
        raise NotAcceptable(f"Accept: {accept} allows nothing {what} answers for {num_images} image(s); "
                            f"offered: {offers}")
    return Choice(kind, media)


def meta_headers(meta: dict) -> dict[str, str]:
    """The response's metadata as headers (every representation carries them)."""
    t, ids, batch = meta["timing"], meta["class_ids"], meta["batch"]
    return {"X-Model": meta["model"], "X-Model-Version": str(meta["model_version"]),
            "X-Seed": str(meta["seed"]), "X-Tokens": str(meta["tokens"]), "X-Canvas": str(meta["canvas"]),
            "X-Class-Ids": ",".join(map(str, ids)), "X-Image-Count": str(len(ids)),
            "X-Batch-Requests": str(batch["requests"]), "X-Batch-Images": str(batch["images"]),
            "X-Replica": str(meta["replica"]), "X-Cached": "true" if meta["cached"] else "false",
            "Server-Timing": ", ".join(f"{k[:-2]};dur={1000 * v:.1f}" for k, v in t.items()),
            "Vary": "Accept"}


def multipart(pngs: list[bytes], part_headers: list[dict[str, str]]) -> tuple[bytes, str]:
    """(body, boundary): RFC 2046 multipart with one image/png part per PNG."""
    boundary = secrets.token_hex(16)
    while any(boundary.encode() in p for p in pngs):  # never in practice; cheap to make certain
        boundary = secrets.token_hex(16)
    out = []
    for png, extra in zip(pngs, part_headers, strict=True):
        head = {"Content-Type": PNG, "Content-Length": str(len(png)), **extra}
        out.append(f"--{boundary}\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode()
                   + b"\r\n" + png + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), boundary


def render(choice: Choice, images, meta: dict, image_seeds: list[int] | None = None,
           columns: int = 8) -> tuple[bytes, str, dict[str, str]]:
    """(body, Content-Type, headers). images: uint8 K x 3 x c x c; meta: the JSON fields less images;
    image_seeds: the seed that gives image i alone (engine backend), else None."""
    headers = meta_headers(meta)
    if choice.kind == "json":
        body = json.dumps({**meta, "images": img.b64_pngs(images)}, separators=(",", ":"))
        return body.encode(), JSON, headers
    if choice.kind == "grid":
        return img.grid_png(images, columns), PNG, headers
    if choice.kind == "png":
        return img.to_png(images[0]), PNG, headers
    parts = []
    for i, c in enumerate(meta["class_ids"]):
        h = {"Content-Disposition": f'inline; filename="image-{i}.png"', "X-Image-Index": str(i),
             "X-Class-Id": str(c), "X-Seed": str(meta["seed"])}
        if image_seeds is not None:
            h["X-Image-Seed"] = str(image_seeds[i])
        parts.append(h)
    body, boundary = multipart([img.to_png(x) for x in images], parts)
    return body, f"{MULTIPART}; boundary={boundary}", headers
