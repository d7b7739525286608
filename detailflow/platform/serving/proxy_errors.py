"""JSON errors with a request id from Serve's HTTP proxy itself, when no replica answers.

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=detailflow.platform.serving.proxy_errors:proxy_middlewares
    use_proxy_errors()            # sets it in this process's env before Ray starts (the proxy inherits it)

The replica's Front middleware (front.py) makes every answer the replica gives JSON with X-Request-Id.
When the replica itself is gone (kill -9, OOM, node loss) while it holds a request, Serve's proxy has
nothing to send: it returns without a response and uvicorn answers a plain-text 500 with no request id.
This middleware runs in the proxy, in front of that: it gives each request an id (the client's sane
X-Request-Id, or a fresh one) before Serve reads it, so the proxy, the replica and the logs name the same
one, and when the proxy returns without starting a response it answers 502 JSON
{"error": {"type": "replica_failed", ...,"request_id"}} with X-Request-Id and Retry-After: 1. An error
the proxy answers itself in plain text (503 when its queue is full or no replica is up) is rewritten to
the same JSON shape, with Retry-After: 1 on a 503 / 429; the replica's own answers pass untouched.
The proxy reads the variable when it starts, so it must be in the environment of the process that starts
Ray (`detailflow serve up` sets it for its head; the tests' and benchmarks' ray.init call
use_proxy_errors first; a KubeRay head sets it in the container env).
"""

from __future__ import annotations

import logging
import os
import uuid

from detailflow.platform.serving.front import ERROR_KINDS, SANE_ID, json_response_parts

logger = logging.getLogger("ray.serve")
ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
IMPORT_PATH = "detailflow.platform.serving.proxy_errors:proxy_middlewares"


class ProxyErrors:
    """ASGI middleware for Serve's proxy: one request id per request; 502 JSON when no response came."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = list(scope.get("headers") or [])
        given = dict(headers).get(b"x-request-id", b"").decode("latin-1")
        rid = given if SANE_ID.match(given) else uuid.uuid4().hex[:16]
        if rid != given:  # Serve (and the replica behind it) use and echo this one
            headers = [(k, v) for k, v in headers if k != b"x-request-id"] + [(b"x-request-id", rid.encode())]
            scope = {**scope, "headers": headers}
        started, held, text = [False], [None], []

        async def watch(message):
            if message["type"] == "http.response.start":
                started[0] = True
                head = dict(message.get("headers") or [])
                if message["status"] >= 400 and not head.get(b"content-type", b"").startswith(
                        b"application/json"):
                    held[0] = message  # Serve's own plain-text error (backpressure, no replicas): rewrite
                    return
            elif held[0] is not None and message["type"] == "http.response.body":
                text.append(message.get("body", b""))
                if not message.get("more_body"):
                    status, serve_text = held[0]["status"], b"".join(text).decode("utf-8", "replace")
                    await answer(status, ERROR_KINDS.get(status, "error"),
                                 f"{serve_text.strip() or 'error'} (request id {rid})", status in (429, 503))
                return
            await send(message)

        async def answer(status: int, kind: str, message: str, retry: bool) -> None:
            """The JSON error with the request id, and Retry-After: 1 when a retry may succeed."""
            extra = [(b"x-request-id", rid.encode())] + ([(b"retry-after", b"1")] if retry else [])
            for part in json_response_parts(status, kind, message, rid, extra):
                await send(part)

        try:
            await self.app(scope, receive, watch)
        except Exception:  # noqa: BLE001 - logged, answered below as JSON when nothing was sent
            logger.exception("request %s failed in the proxy", rid)
        if not started[0]:
            logger.warning("request %s %s %s: no replica answered", rid, scope.get("method"),
                           scope.get("path"))
            why = f"the replica serving this request failed before answering (request id {rid}); retry"
            await answer(502, "replica_failed", why, True)


def proxy_middlewares() -> list:
    """The callback Serve's proxy calls (ENV names it): its extra Starlette middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors)]


def use_proxy_errors() -> None:
    """Put ENV into this process's environment (unless set): a Ray started from here passes it on."""
    os.environ.setdefault(ENV, IMPORT_PATH)
