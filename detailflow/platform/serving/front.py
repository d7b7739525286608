"""The HTTP front's ASGI middleware: request ids, body-size limit, JSON for every error, access log.

    app.add_middleware(Front, max_body_bytes=lambda: 65536)     # app.py does this

Every response carries X-Request-Id: Serve's proxy (and HAProxy) put the client's id, or a fresh one,
on the request and echo it on the response, so the replica uses that one (and Serve's own request logs
name it too); without a proxy (tests, direct ingress) this middleware makes and echoes one. The id is
in scope["state"]["request_id"] for the routes and in the access log line (method, path, status, ms, key
id: never the key). A body announced larger than the limit (Content-Length) is refused with 413 before
it is read; one that turns out larger while it streams (chunked) is cut off at the limit, before any
parsing, also with 413. An exception no route handled becomes a JSON 500 naming the request id (its
traceback goes to the log), never a plain-text page.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import logging.handlers
import queue
import re
import time
import uuid

from starlette.exceptions import HTTPException

logger = logging.getLogger("ray.serve")
ACCESS_LOGGER = "detailflow.access"  # one line per request, written by a thread with Serve's handlers
SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# the error body's "type" by status: the app's answers, and Serve's own that proxy_errors.py rewrites
ERROR_KINDS = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
               406: "not_acceptable", 408: "timeout", 413: "payload_too_large", 429: "rate_limited",
               500: "internal", 503: "overloaded", 504: "timeout"}


@functools.cache  # once per process, after Serve configured its logger (the first request)
def access_log() -> logging.Logger:
    """The access logger: a queue in front of the "ray.serve" logger's handlers (the replica's log
    file, stderr). Writing a line there on the event loop costs two syscalls, each of which drops the
    GIL and waits to get it back from the engine's thread: a fifth of the loop's time under load
    (py-spy). Through the queue the loop only formats the line; a listener thread writes it."""
    access = logging.getLogger(ACCESS_LOGGER)
    q: queue.SimpleQueue = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(q, *logger.handlers, respect_handler_level=True)
    listener.start()
    atexit.register(listener.stop)  # what is queued is written before the process ends
    access.addHandler(logging.handlers.QueueHandler(q))
    access.setLevel(logging.INFO)
    access.propagate = not logger.handlers  # outside Serve (no handlers): the root logger's
    return access


class BodyTooLarge(HTTPException):
    """Raised from receive() once the body passes the limit: an HTTPException so FastAPI's body parsing
    passes it on (it turns other errors into a 400) and the app's handler answers 413 JSON."""

    def __init__(self, limit: int):
        super().__init__(413, f"the body is over the limit of {limit} bytes")


def json_response_parts(status: int, kind: str, message: str, request_id: str, headers=()):
    body = json.dumps({"error": {"type": kind, "message": message, "errors": [],
                                 "request_id": request_id}}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    return {"type": "http.response.start", "status": status, "headers": head}, \
        {"type": "http.response.body", "body": body}


class Front:
    def __init__(self, app, max_body_bytes=lambda: 65536):
        self.app = app
        self.max_body_bytes = max_body_bytes  # callable: the replica sets the limit after import

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if SANE_ID.match(given) else uuid.uuid4().hex[:16]
        echo = [] if given else [(b"x-request-id", rid.encode())]  # the proxy echoes the one it gave
        scope.setdefault("state", {})["request_id"] = rid
        t0, limit, status = time.perf_counter(), self.max_body_bytes(), [0]
        started, over = [False], [False]

        async def send_with_id(message):
            if over[0]:  # the app answered the cut-off body in its own way (400, 413 text): ours instead
                if not started[0]:
                    await refuse(413, "payload_too_large", f"the body is over the limit of {limit} bytes")
                return
            if message["type"] == "http.response.start":
                started[0], status[0] = True, message["status"]
                message = {**message, "headers": [*message.get("headers", []), *echo]}
            await send(message)

        async def refuse(code: int, kind: str, msg: str) -> None:
            status[0], started[0] = code, True
            for part in json_response_parts(code, kind, msg, rid, echo):
                await send(part)

        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            length = -1
        try:
            if length < 0:
                await refuse(400, "invalid_request", "Content-Length is not a number")
            elif length > limit:
                await refuse(413, "payload_too_large", f"the body is {length} bytes; the limit is {limit}")
            else:
                seen = [0]

                async def limited_receive():
                    message = await receive()
                    if message["type"] == "http.request":
                        seen[0] += len(message.get("body", b""))
                        if seen[0] > limit:
                            over[0] = True
                            raise BodyTooLarge(limit)
                    return message

                await self.app(scope, limited_receive, send_with_id)
        except BodyTooLarge:
            if not started[0]:
                await refuse(413, "payload_too_large", f"the body is over the limit of {limit} bytes")
        except Exception:  # noqa: BLE001 - logged with its traceback, answered as JSON
            logger.exception("request %s failed", rid)
            if not started[0]:
                await refuse(500, "internal", f"internal error (request id {rid})")
        finally:
            state = scope.get("state", {})
            access_log().info("request_id=%s %s %s -> %s %.1f ms key=%s", rid, scope.get("method"),
                        scope.get("path"), status[0], 1000 * (time.perf_counter() - t0),
                        state.get("key_id", "-"))
