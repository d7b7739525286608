"""A small Python client of the generation API (what `detailflow generate` uses).

    c = Client("http://127.0.0.1:8000", api_key="dfk_...")
    c.models()["data"][0]["version"]                       # the served version
    res = c.generate([3], num_images=4, seed=7)             # JSON: images (base64 PNG), model_version, seed
    imgs = decode_images(res)                               # numpy uint8 K x 3 x c x c
    res = c.stream([3], num_images=4, seed=7, on_event=lambda name, data: ...)   # SSE; returns the done event
Errors: ApiError(status, body) for any non-2xx answer (body is the API's {"error": {...}} JSON).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

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

    def generate(self, class_ids, num_images: int = 1, **params) -> dict:
        r = self.session.post(f"{self.url}/v1/generate", json=self.body(class_ids, num_images, **params),
                              timeout=self.timeout_s)
        _raise_for(r)
        return r.json()

    def generate_png(self, class_ids, num_images: int = 1, **params) -> tuple[bytes, dict]:
        body = {**self.body(class_ids, num_images, **params), "format": "png"}
        r = self.session.post(f"{self.url}/v1/generate", json=body, timeout=self.timeout_s)
        _raise_for(r)
        return r.content, {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("x-")}

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
