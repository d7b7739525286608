"""POST /v1/generate's representations without Ray: content negotiation (formats.negotiate), the bodies
(formats.render) split by hand and decoded with PIL, and the client's decoding of them."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from detailflow.platform.serving.formats import NotAcceptable, negotiate, parse_accept, quality, render

META = {"model": "m-generator", "model_version": "3", "seed": 40, "tokens": 16, "canvas": 8,
        "class_ids": [1, 1, 4], "batch": {"requests": 2, "images": 5}, "replica": "r1", "cached": True,
        "timing": {"queue_s": 0.0012, "sample_s": 0.25, "total_s": 0.3}}


def split_by_hand(content_type: str, body: bytes) -> list[tuple[dict, bytes]]:
    """RFC 2046 multipart split with bytes operations only (not the client's email parser): (headers,
    payload) per part; each payload's length is checked against its Content-Length."""
    ctype, _, param = content_type.partition(";")
    assert ctype == "multipart/mixed" and param.strip().startswith("boundary="), content_type
    delim = b"--" + param.strip()[len("boundary="):].encode()
    assert body.startswith(delim + b"\r\n") and body.endswith(b"\r\n" + delim + b"--\r\n")
    parts = []
    for chunk in body[len(delim) + 2:-len(delim) - 6].split(b"\r\n" + delim + b"\r\n"):
        head, payload = chunk.split(b"\r\n\r\n", 1)
        h = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        assert int(h["Content-Length"]) == len(payload) and h["Content-Type"] == "image/png", h
        parts.append((h, payload))
    return parts


def pil(data: bytes) -> np.ndarray:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG" and im.mode == "RGB"
    return np.asarray(im).transpose(2, 0, 1)


def images(k: int) -> np.ndarray:
    return np.random.default_rng(k).integers(0, 256, (k, 3, 8, 8), dtype=np.uint8)


@pytest.mark.parametrize("accept, fmt, n, kind, media", [
    (None, None, 1, "png", "image/png"),  # no Accept: PNG bytes
    ("*/*", None, 3, "multipart", "multipart/mixed"),  # requests' default Accept
    ("", None, 2, "multipart", "multipart/mixed"),
    ("application/json", None, 1, "json", "application/json"),
    ("application/json", None, 3, "json", "application/json"),
    ("image/png", None, 3, "grid", "image/png"),  # several images as one image/png: the grid
    ("image/*", None, 2, "grid", "image/png"),
    ("multipart/mixed", None, 1, "multipart", "multipart/mixed"),  # one part
    ("image/png;q=0, */*", None, 1, "json", "application/json"),  # q=0: "not this one"
    ("*/*;q=0.1, application/json", None, 2, "json", "application/json"),  # the more specific wins
    ("application/json;q=0.5, multipart/mixed;q=0.9", None, 2, "multipart", "multipart/mixed"),
    ("image/png, application/json", None, 1, "png", "image/png"),  # a tie: the server's order
    ("text/html, application/xhtml+xml, */*;q=0.8", None, 1, "png", "image/png"),  # a browser
    ("image/png;q=2, application/json", None, 1, "json", "application/json"),  # bad q: range skipped
    (None, "json", 4, "json", "application/json"),
    (None, "grid", 4, "grid", "image/png"),
    (None, "grid", 1, "png", "image/png"),  # a grid of one image is that image
    (None, "png", 4, "multipart", "multipart/mixed"),
    ("*/*", "png", 1, "png", "image/png"),
    ("multipart/*", "png", 1, "multipart", "multipart/mixed"),
])
def test_negotiation(accept, fmt, n, kind, media):
    choice = negotiate(accept, fmt, n)
    assert (choice.kind, choice.media_type) == (kind, media)


@pytest.mark.parametrize("accept, fmt, n, offered", [
    ("text/csv", None, 1, ["image/png", "application/json", "multipart/mixed"]),
    ("text/csv", None, 3, ["multipart/mixed", "application/json", "format=grid"]),
    ("image/png", "json", 1, ["application/json"]),
    ("application/json", "grid", 2, ["format=grid"]),
    ("image/png", "png", 2, ["multipart/mixed"]),  # several PNGs are not one image/png: format=grid is
    ("image/png;q=0, application/json;q=0", None, 1, ["image/png"]),
])
def test_unacceptable_is_refused_naming_what_is_offered(accept, fmt, n, offered):
    with pytest.raises(NotAcceptable) as exc:
        negotiate(accept, fmt, n)
    msg = str(exc.value)
    assert f"Accept: {accept}" in msg and all(o in msg for o in offered), msg


def test_accept_parsing_and_specificity():
    assert parse_accept(None) == parse_accept("  ") == [("*", "*", 1.0)]
    assert parse_accept("Image/PNG; q=0.5, garbage, text/*;level=1") == [("image", "png", 0.5),
                                                                        ("text", "*", 1.0)]
    ranges = parse_accept("image/*;q=0.3, image/png;q=0.7, */*;q=0.1")
    assert quality(ranges, "image/png") == 0.7 and quality(ranges, "image/gif") == 0.3
    assert quality(ranges, "application/json") == 0.1 and quality(parse_accept("text/csv"), "image/png") == 0


def test_multipart_parts_are_the_pngs_with_their_headers_and_the_client_decodes_them():
    from detailflow.platform.serving.client import decode_generated

    imgs = images(3)
    body, ctype, headers = render(negotiate(None, None, 3), imgs, META, image_seeds=[40, 41, 42])
    parts = split_by_hand(ctype, body)
    assert len(parts) == 3
    for i, (h, png) in enumerate(parts):
        assert (pil(png) == imgs[i]).all()
        assert (h["X-Image-Index"], h["X-Class-Id"], h["X-Seed"], h["X-Image-Seed"]) == \
            (str(i), str(META["class_ids"][i]), "40", str(40 + i))
    assert headers["X-Image-Count"] == "3" and headers["X-Class-Ids"] == "1,1,4"
    assert headers["X-Cached"] == "true" and headers["Vary"] == "Accept"
    assert headers["Server-Timing"] == "queue;dur=1.2, sample;dur=250.0, total;dur=300.0"
    got = decode_generated(body, {"content-type": ctype, **{k.lower(): v for k, v in headers.items()}})
    assert (got.images == imgs).all() and got.pngs == [p for _, p in parts]
    assert [(p["image_seed"], p["class_id"]) for p in got.parts] == [(40, 1), (41, 1), (42, 4)]
    info = {k: got.info[k] for k in META}
    assert info == {**META, "timing": {"queue_s": 0.0012, "sample_s": 0.25, "total_s": 0.3}}
    # the batch backend has no per-image seed: the parts say only the request's
    body, ctype, _ = render(negotiate(None, None, 3), imgs, META, image_seeds=None)
    assert all("X-Image-Seed" not in h for h, _ in split_by_hand(ctype, body))


def test_one_image_json_and_grid_bodies():
    from detailflow.platform.serving.client import decode_generated, decode_images

    one = images(1)
    meta = {**META, "class_ids": [7]}
    body, ctype, headers = render(negotiate(None, None, 1), one, meta, [40])
    assert ctype == "image/png" and (pil(body) == one[0]).all()
    got = decode_generated(body, {"content-type": ctype, **{k.lower(): v for k, v in headers.items()}})
    assert (got.images == one).all() and got.parts[0]["class_id"] == 7
    imgs = images(3)
    body, ctype, _ = render(negotiate("application/json", None, 3), imgs, META)
    j = json.loads(body)
    assert ctype == "application/json" and {k: j[k] for k in META} == META
    assert all((pil(base64.b64decode(x)) == im).all() for x, im in zip(j["images"], imgs, strict=True))
    assert (decode_images(j) == imgs).all()
    body, ctype, _ = render(negotiate(None, "grid", 3), imgs, META, columns=2)
    grid = pil(body)
    assert ctype == "image/png" and grid.shape == (3, 2 * 10 + 2, 2 * 10 + 2)
    assert (grid[:, 12:20, 2:10] == imgs[2]).all()


def test_the_boundary_never_occurs_in_a_payload(monkeypatch):
    """A boundary that happens to occur in a payload is drawn again (forced: the first draw is a string
    the second payload contains)."""
    from detailflow.platform.serving import formats

    clash, payloads = "a" * 32, [b"\x89PNG one", b"\x89PNG --" + b"a" * 32 + b"\r\n two"]
    draws = iter([clash, "f" * 32])
    monkeypatch.setattr(formats.secrets, "token_hex", lambda n: next(draws))
    body, boundary = formats.multipart(payloads, [{}, {}])
    assert boundary == "f" * 32
    assert [p for _, p in split_by_hand(f"multipart/mixed; boundary={boundary}", body)] == payloads
