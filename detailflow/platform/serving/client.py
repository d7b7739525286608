"""A small Python client of the generation API (what `detailflow generate` uses).

    c = Client("http://127.0.0.1:8000", api_key="dfk_...")
    c.models()["data"][0]["version"]                       # the served version
    g = c.generate([3], num_images=4, seed=7)              # PNG bytes (multipart/mixed), decoded:
    g.images, g.info["model_version"], g.info["seed"]      #   uint8 K x 3 x c x c + the X-* metadata
    res = c.generate_json([3], num_images=4, seed=7)       # format=json: base64 PNGs in a dict
    imgs = decode_images(res)                              # numpy uint8 K x 3 x c x c
    png, headers = c.generate_grid([3], num_images=4)      # format=grid: one PNG of all images
    res = c.stream([3], num_images=4, seed=7, on_event=lambda name, data: ...)   # SSE; returns the done event
Errors: ApiError(status, body) for any non-2xx answer (body is the API's {"error": {...}} JSON).
Multipart bodies are split with the standard library's email parser (no extra dependency).
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import requests


class ApiError(RuntimeError):
    def __init__(self, status: int, body, retry_after: str | None = None):
        self.status, self.body, self.retry_after = status, body, retry_after
        msg = body.get("error", {}).get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {msg}" + (f" (retry after {retry_after} s)" if retry_after else ""))


def _raise_for(r: requests.Response) -> None:
    if r.status_code < 400:
        return
    try:
        body = r.json()
    except ValueError:
        body = r.text
    raise ApiError(r.status_code, body, r.headers.get("Retry-After"))


def decode_images(result: dict) -> np.ndarray:
    from detailflow.platform.serving.images import from_png

    return np.stack([from_png(base64.b64decode(x)) for x in result["images"]])


@dataclass
class Generated:
    images: np.ndarray  # uint8 K x 3 x c x c, in request order
    pngs: list[bytes]  # the PNG bytes as served (image i of images)
    parts: list[dict]  # per image: index, class_id, seed, image_seed (engine backend) from its part headers
    info: dict  # model, model_version, seed, tokens, canvas, class_ids, batch, replica, cached, request_id


def split_multipart(body: bytes, content_type: str) -> list[tuple[dict, bytes]]:
    """(headers lower-cased, payload) per part of a multipart body; content_type carries the boundary."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not msg.is_multipart():
        raise ValueError(f"not a multipart body: {content_type}")
    return [({k.lower(): str(v) for k, v in part.items()}, part.get_payload(decode=True))
            for part in msg.iter_parts()]


def _info(h) -> dict:
    def num(name):
        return int(h[name]) if h.get(name) is not None else None

    timing = {}
    for item in (h.get("server-timing") or "").split(","):
        name, _, dur = item.strip().partition(";dur=")
        if dur:
            timing[f"{name}_s"] = float(dur) / 1000
    return {"model": h.get("x-model"), "model_version": h.get("x-model-version"), "seed": num("x-seed"),
            "tokens": num("x-tokens"), "canvas": num("x-canvas"),
            "class_ids": [int(c) for c in h.get("x-class-ids", "").split(",") if c],
            "batch": {"requests": num("x-batch-requests"), "images": num("x-batch-images")},
            "replica": h.get("x-replica"), "cached": h.get("x-cached") == "true",
            "request_id": h.get("x-request-id"), "timing": timing}


def decode_generated(content: bytes, headers) -> Generated:
    """A /v1/generate bytes answer (image/png or multipart/mixed) -> Generated."""
    from detailflow.platform.serving.images import from_png

    ctype = headers.get("content-type", "")
    info = _info(headers)
    if ctype.startswith("multipart/"):
        split = split_multipart(content, ctype)
        pngs = [p for _, p in split]
        parts = [{"index": int(h["x-image-index"]), "class_id": int(h["x-class-id"]),
                  "seed": int(h["x-seed"]),
                  "image_seed": int(h["x-image-seed"]) if "x-image-seed" in h else None}
                 for h, _ in split]
    elif ctype.startswith("image/png"):
        pngs = [content]
        parts = [{"index": 0, "class_id": info["class_ids"][0] if info["class_ids"] else None,
                  "seed": info["seed"], "image_seed": info["seed"]}]
    else:
        raise ValueError(f"expected image/png or multipart/mixed, got {ctype!r}")
    return Generated(np.stack([from_png(p) for p in pngs]), pngs, parts, info)


def parse_sse(lines) -> iter:
    """(event, data dict) pairs from an iterable of SSE text lines."""
    event, data = "message", []
    for line in lines:
        if line is None:
            continue
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        yield event, json.loads("\n".join(data))


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def models(self) -> dict:
        r = self.session.get(f"{self.url}/v1/models", timeout=self.timeout_s)
        _raise_for(r)
        return r.json()

    def health(self) -> dict:
        """GET /readyz: the served model's version once one is loaded (/healthz only says alive)."""
        r = self.session.get(f"{self.url}/readyz", timeout=self.timeout_s)
        _raise_for(r)
        return r.json()

    @staticmethod
    def body(class_ids, num_images: int = 1, **params) -> dict:
        return {"class_ids": list(class_ids), "num_images": num_images,
                **{k: v for k, v in params.items() if v is not None}}

    def _post(self, body: dict, accept: str) -> requests.Response:
        r = self.session.post(f"{self.url}/v1/generate", json=body, headers={"Accept": accept},
                              timeout=self.timeout_s)
        _raise_for(r)
        return r

    def generate(self, class_ids, num_images: int = 1, **params) -> Generated:
        """The default bytes answer (image/png or multipart/mixed), decoded, with its header metadata."""
        r = self._post(self.body(class_ids, num_images, **params), "image/png, multipart/mixed")
        return decode_generated(r.content, r.headers)

    def generate_json(self, class_ids, num_images: int = 1, **params) -> dict:
        """format=json: {"images": [base64 PNG, ...], "model_version", "seed", ...} (decode_images)."""
        r = self._post({**self.body(class_ids, num_images, **params), "format": "json"}, "application/json")
        return r.json()

    def generate_grid(self, class_ids, num_images: int = 1, **params) -> tuple[bytes, dict]:
        """format=grid: one PNG of all images, and the X-* / Server-Timing headers."""
        r = self._post({**self.body(class_ids, num_images, **params), "format": "grid"}, "image/png")
        keep = {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("x-")}
        return r.content, keep

    def stream(self, class_ids, num_images: int = 1, on_event: Callable[[str, dict], None] | None = None,
               **params) -> dict:
        """POST /v1/generate/stream; calls on_event(name, data) per event; returns the `done` data."""
        body = self.body(class_ids, num_images, **params)
        with self.session.post(f"{self.url}/v1/generate/stream", json=body, stream=True,
                               timeout=self.timeout_s) as r:
            _raise_for(r)
            for name, data in parse_sse(r.iter_lines(decode_unicode=True)):
                if on_event is not None:
                    on_event(name, data)
                if name == "done":
                    return data
                if name == "error":
                    raise ApiError(503 if data["error"]["type"] == "overloaded" else 500, data)
        raise ApiError(502, {"error": {"message": "the stream ended without a result"}})
