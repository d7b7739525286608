"""The HTTP API, one hop: the Generator deployment is ingress, scheduler and engine in one replica.

    serve run detailflow.platform.serving.app:build_app          # Ray's CLI, default args
    detailflow serve up --config configs/serve-local.yaml         # what the project uses (deploy.py)

A request goes from Serve's proxy (or, with RAY_SERVE_ENABLE_HA_PROXY / RAY_SERVE_THROUGHPUT_OPTIMIZED,
HAProxy / direct ingress) straight into the replica that samples it: no second deployment, no handle
call, no pickling of images. Images are PNG-encoded (fast zlib level) in a worker thread.
Routes (OpenAPI at /openapi.json, docs at /docs):
    GET  /                       playground page (page.html)
    GET  /healthz                200 while the replica's loop answers (no key, no model call)
    GET  /readyz                 200 + model version once a model is loaded, else 503
    GET  /v1/models              the served model: version, classes, allowed `tokens` and their canvases
    POST /v1/generate            PNG bytes by default: one image -> image/png, several -> multipart/mixed
                                   (one image/png part per image); metadata in X-* headers. JSON with
                                   base64 PNGs only when asked (format=json or Accept: application/json);
                                   format=grid: one PNG of all images. Negotiation: formats.py
    POST /v1/generate/stream     Server-Sent Events: start, preview after every pass, done
    GET  /v1/generate/stream       (GET: query params)
Errors, all JSON {"error": {"type", "message", "errors": [{"field", "rule"}]}} with X-Request-Id:
401 no/unknown key, 403 revoked, 406 Accept allows no offered type (the message lists them),
413 body over args.max_body_bytes, 422 bad field, 429 + Retry-After
(per-key rate / daily image quota, limits.py), 503 + Retry-After (replica at capacity in images, or no
model yet), 504 no answer within request_timeout_s (the request is cancelled), 500 otherwise.
Seeded requests are cached by (model version, backend, classes, seed, params): same answer, no work
(`Cache-Control: no-cache` skips the cache; X-Cached / the JSON's "cached" say). The cache holds
images, so every format is served from it.
"""

# No `from __future__ import annotations` here: Serve rebuilds the route methods' signatures and
# FastAPI must see real types (string annotations would turn `request: Request` into a query field).
import asyncio
import json
import logging
import secrets
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from detailflow.platform.serving import images as img
from detailflow.platform.serving.auth import MISSING, OK, REVOKED, KeyStore
from detailflow.platform.serving.autoscale import IMAGE_POLICY
from detailflow.platform.serving.config import GENERATOR, WATCHER, AppArgs, GeneratorOptions
from detailflow.platform.serving.formats import MULTIPART, NotAcceptable, negotiate, render
from detailflow.platform.serving.front import ERROR_KINDS, Front
from detailflow.platform.serving.generator import GeneratorCore, Overloaded, Rejected
from detailflow.platform.serving.limits import Limiter, retry_after
from detailflow.platform.serving.metrics import ServeMetrics
from detailflow.platform.serving.sampling import Final, Preview
from detailflow.platform.serving.schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    error_body,
    rule_body,
    validation_body,
)

logger = logging.getLogger("ray.serve")
PAGE = (Path(__file__).parent / "page.html").read_text()
ERRORS = {401: {"model": ErrorResponse, "description": "No or unknown API key"},
          403: {"model": ErrorResponse, "description": "Revoked API key"},
          406: {"model": ErrorResponse, "description": "Accept allows none of the offered types"},
          413: {"model": ErrorResponse, "description": "Body over the size limit"},
          422: {"model": ErrorResponse, "description": "A field breaks a rule (named in errors)"},
          429: {"model": ErrorResponse, "description": "Rate limit or daily image quota: see Retry-After"},
          503: {"model": ErrorResponse, "description": "Overloaded: retry after Retry-After seconds"},
          504: {"model": ErrorResponse, "description": "No answer within the deadline"}}
GAUGE_INTERVAL_S = 0.5  # queue depth / slot occupancy gauges: at most one sample per interval

app = FastAPI(title="DetailFlow generation API", version="1",
              description="Class-conditional image generation with DetailFlow (1D coarse-to-fine "
                          "autoregressive). Authenticate with `Authorization: Bearer <API key>`.")
bearer = HTTPBearer(auto_error=False, description="API key issued by the operator")


class _State:
    keys: KeyStore | None = None  # set by the replica
    anonymous: bool = False  # no key configured and allow_anonymous
    max_body_bytes: int = AppArgs().max_body_bytes


app.add_middleware(Front, max_body_bytes=lambda: _State.max_body_bytes)


def _error(status: int, message: str, retry_s: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(ERROR_KINDS.get(status, "error"), message), status_code=status,
                        headers={"Retry-After": retry_s} if retry_s else None)


async def require_key(request: Request, _=Depends(bearer)) -> str:  # noqa: B008 (FastAPI's idiom)
    """401 without a valid key, 403 for a revoked one. Keys are never logged, only their key id."""
    status, kid = _State.keys.check(request.headers.get("authorization")) if _State.keys else (MISSING, None)
    if status == OK or (status == MISSING and _State.anonymous):
        kid = kid if status == OK else "anonymous"
        request.scope.setdefault("state", {})["key_id"] = kid
        return kid
    if status == REVOKED:
        logger.info("refused revoked key %s", kid)
        raise HTTPException(403, "this API key has been revoked")
    raise HTTPException(401, "missing bearer API key" if status == MISSING else "unknown API key",
                        headers={"WWW-Authenticate": 'Bearer realm="detailflow"'})


@app.exception_handler(RequestValidationError)
async def _on_validation(request: Request, exc: RequestValidationError):
    return JSONResponse(validation_body(exc.errors()), status_code=422)


@app.exception_handler(HTTPException)
async def _on_http(request: Request, exc: HTTPException):
    return JSONResponse(error_body(ERROR_KINDS.get(exc.status_code, "error"), str(exc.detail)),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


GENERATE_RESPONSES = {200: {"description": "The images. By `format`, else by Accept: image/png (one image; "
                                          "format=grid: all in one PNG), multipart/mixed (one image/png "
                                          "part per image), application/json (format=json: base64 PNGs)",
                           "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                                       MULTIPART: {"schema": {"type": "string", "format": "binary"}},
                                       "application/json": {}}},
                      **ERRORS}


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# Serve's own access line is off: front.py writes one per request that also names the key id
@serve.deployment(name=GENERATOR, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64,
                  max_queued_requests=64, health_check_period_s=10, graceful_shutdown_timeout_s=30,
                  logging_config={"enable_access_log": False},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                                      "upscale_delay_s": 10, "downscale_delay_s": 60,
                                      "policy": {"policy_function": IMAGE_POLICY,
                                                 "policy_kwargs": {"target_images_per_replica": 16}}})
@serve.ingress(app)
class Generator(GeneratorCore):
    def __init__(self, watcher=None, args: dict | None = None):
        super().__init__()
        self.args = a = AppArgs.from_dict(args)
        self.watcher = watcher
        _State.keys = KeyStore.from_sources(a.api_keys_env, a.revoked_keys_env, a.api_keys_file)
        _State.anonymous = a.allow_anonymous and _State.keys.count() == 0 and _State.keys.path is None
        _State.max_body_bytes = a.max_body_bytes
        self.limiter = Limiter(a.rate_limit_rps, a.rate_burst, a.daily_image_quota)
        self.metrics = ServeMetrics()
        self._gauges_at = float("-inf")  # when the queue / slot gauges were last set
        if _State.keys.count() == 0 and not _State.anonymous:
            logger.warning("no API key configured (%s / %s): every /v1 request gets 401", a.api_keys_env,
                           _State.keys.path or "$DETAILFLOW_API_KEYS_FILE")

    # ---- plumbing ----------------------------------------------------------------------------------
    def _record(self, route: str, status: int, key: str, images: int, t0: float) -> None:
        now = time.perf_counter()
        self.metrics.request(route, status, key, images, now - t0)
        if now - self._gauges_at >= GAUGE_INTERVAL_S:  # a sample per interval, not per request
            self._sample_gauges(now)

    def _sample_gauges(self, now: float) -> None:
        self._gauges_at, e = now, self.engine
        self.metrics.gauges(self.pending_images, e.engine.waiting if e else 0,
                            e.slots - e.engine.free_slots if e else 0, e.slots if e else 0)

    def record_autoscaling_stats(self) -> dict:
        """Serve calls this periodically, with or without traffic: the gauges follow an idle replica
        down to zero too."""
        self._sample_gauges(time.perf_counter())
        return super().record_autoscaling_stats()

    def _limit(self, key: str, images: int) -> JSONResponse | None:
        refused = self.limiter.admit(key, images, _State.keys.limits.get(key) if _State.keys else None)
        if refused is None:
            return None
        wait_s, which = refused
        why = "daily image quota used up" if which == "quota" else "rate limit: too many requests"
        return _error(429, why, retry_after(wait_s))

    def _overloaded(self, why: str) -> JSONResponse:
        return _error(503, why, str(self.args.retry_after_s))

    @staticmethod
    def _seed(body: GenerateRequest) -> int:
        return body.seed if body.seed is not None else secrets.randbelow(2**31)

    @staticmethod
    def _meta(final: Final, class_ids: list[int], total_s: float) -> dict:
        """The result's metadata: the JSON fields less images (headers on the bytes formats)."""
        i = final.info
        return {"model": i["model"], "model_version": i["model_version"], "seed": i["seed"],
                "tokens": i["tokens"], "canvas": i["canvas"], "class_ids": class_ids, "batch": i["batch"],
                "replica": i["replica"], "cached": bool(i.get("cached")),
                "timing": {"queue_s": i["queue_s"], "sample_s": i["sample_s"], "total_s": round(total_s, 4)}}

    def _result_json(self, final: Final, class_ids: list[int], total_s: float) -> dict:
        return {**self._meta(final, class_ids, total_s), "images": img.b64_pngs(final.images)}

    # ---- routes ------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self, request: Request):
        return HTMLResponse(PAGE.replace("__ROOT_PATH__", request.scope.get("root_path", "").rstrip("/")))

    @app.get("/healthz", summary="Liveness: the replica answers (no key; costs nothing)")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a model is loaded (its version), else 503",
             responses={503: ERRORS[503]})
    async def readyz(self):
        if self.model is None:
            return self._overloaded("no model loaded yet")
        return {"status": "ready", "model": self.model.registered_model, "model_version": self.model.version,
                "backend": self.opts.backend}

    @app.get("/v1/models", summary="The served model and what a request may ask of it",
             responses={k: ERRORS[k] for k in (401, 403, 503)})
    async def models(self, key: str = Depends(require_key)):
        watch = None
        if self.watcher is not None:
            try:
                watch = await asyncio.wait_for(self.watcher.status.remote(), 10.0)
            except Exception as exc:  # noqa: BLE001 - the model info is still worth answering
                watch = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        return {"data": [self.info()], "watcher": watch}

    @app.post("/v1/generate", summary="Generate images: PNG bytes (image/png, or multipart/mixed for "
              "several), JSON with base64 PNGs on request (format=json / Accept: application/json), or "
              "one grid PNG (format=grid)", response_model=GenerateResponse, responses=GENERATE_RESPONSES)
    async def generate_route(self, body: GenerateRequest, request: Request, key: str = Depends(require_key)):
        t0, route = time.perf_counter(), "/v1/generate"
        spec = body.to_spec(self._seed(body))
        try:  # before any work or quota: the answer's type is known from the request alone
            choice = negotiate(request.headers.get("accept"), body.format, spec.num_images)
        except NotAcceptable as exc:
            self._record(route, 406, key, 0, t0)
            return _error(406, str(exc))
        if (refused := self._limit(key, spec.num_images)) is not None:
            self._record(route, 429, key, 0, t0)
            return refused
        timeout = self.args.request_timeout_s
        try:
            cacheable = body.seed is not None and "no-cache" not in request.headers.get("cache-control", "")
            async with asyncio.timeout(timeout):  # in this task: no extra task per request
                final = await self.generate(spec, cacheable=cacheable)
        except Overloaded as exc:
            self._record(route, 503, key, 0, t0)
            return self._overloaded(str(exc))
        except TimeoutError:
            self._record(route, 504, key, 0, t0)
            return _error(504, f"no answer within {timeout:g} s; the request was cancelled")
        if isinstance(final, Rejected):
            self._record(route, 422, key, 0, t0)
            return JSONResponse(rule_body(final.errors), status_code=422)
        # engine backend: image i of seed s is image 0 of seed s + i (the part's X-Image-Seed)
        seeds = [spec.seed + k for k in range(spec.num_images)] if self.engine is not None else None
        meta = self._meta(final, spec.class_ids, time.perf_counter() - t0)
        data, media_type, headers = await asyncio.to_thread(render, choice, final.images, meta, seeds,
                                                            self.args.max_grid_columns)
        self._record(route, 200, key, len(final.images), t0)
        return Response(data, media_type=media_type, headers=headers)

    @app.post("/v1/generate/stream", summary="Generate with a coarse-to-fine preview after every pass (SSE)",
              responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
    async def stream_post(self, body: GenerateRequest, key: str = Depends(require_key)):
        return await self._stream(body, key)

    @app.get("/v1/generate/stream", summary="Same as POST /v1/generate/stream, fields as query parameters "
             "(class_ids=3,5 or repeated)", responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
    async def stream_get(self, request: Request, key: str = Depends(require_key)):
        q = request.query_params
        fields = {k: q.getlist(k) if k == "class_ids" else q[k] for k in q}
        if "class_ids" in fields:
            fields["class_ids"] = [c for v in fields["class_ids"] for c in v.split(",") if c.strip()]
        try:
            body = GenerateRequest.model_validate(fields)
        except ValidationError as exc:
            return JSONResponse(validation_body(exc.errors()), status_code=422)
        return await self._stream(body, key)

    async def _stream(self, body: GenerateRequest, key: str):
        t0, route = time.perf_counter(), "/v1/generate/stream"
        deadline = t0 + self.args.request_timeout_s
        spec = body.to_spec(self._seed(body))
        if (refused := self._limit(key, spec.num_images)) is not None:
            self._record(route, 429, key, 0, t0)
            return refused
        gen = self.stream(spec)
        try:  # the first event decides the status code: 503 / 422 / 504 before any byte of the stream
            first = await asyncio.wait_for(gen.__anext__(), self.args.request_timeout_s)
        except Overloaded as exc:
            self._record(route, 503, key, 0, t0)
            return self._overloaded(str(exc))
        except TimeoutError:
            await gen.aclose()
            self._record(route, 504, key, 0, t0)
            return _error(504, f"no answer within {self.args.request_timeout_s:g} s")
        if isinstance(first, Rejected):
            await gen.aclose()
            return JSONResponse(rule_body(first.errors), status_code=422)

        async def events():
            ev, cols = first, self.args.max_grid_columns
            try:
                yield _sse("start", {"seed": spec.seed, "class_ids": spec.class_ids, "tokens": spec.tokens})
                while True:
                    if isinstance(ev, Preview):
                        png = await asyncio.to_thread(img.grid_png, ev.images, cols)
                        yield _sse("preview", {"t": ev.t, "canvas": ev.canvas, "step": ev.step,
                                               "steps": ev.steps, "grid": img.b64(png)})
                    elif isinstance(ev, Final):
                        out = await asyncio.to_thread(self._result_json, ev, spec.class_ids,
                                                      time.perf_counter() - t0)
                        png = await asyncio.to_thread(img.grid_png, ev.images, cols)
                        self._record(route, 200, key, len(ev.images), t0)
                        yield _sse("done", {**out, "grid": img.b64(png)})
                        return
                    try:
                        left = max(0.001, deadline - time.perf_counter())
                        ev = await asyncio.wait_for(gen.__anext__(), left)
                    except StopAsyncIteration:
                        yield _sse("error", error_body("internal", "the stream ended without images"))
                        return
                    except TimeoutError:
                        yield _sse("error", error_body("timeout", "no answer within "
                                                       f"{self.args.request_timeout_s:g} s"))
                        return
            finally:
                await gen.aclose()  # client gone, done, or failed: its rows leave the batch

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def build_app(args: dict | None = None):
    """The application (`import_path` of the serve configs). args: AppArgs fields. The Generator's
    user_config starts at GeneratorOptions defaults; the serve file's deployments override it."""
    from detailflow.platform.serving.watcher import ChampionWatcher

    a = AppArgs.from_dict(args)
    watcher = ChampionWatcher.bind(GENERATOR, a.poll_interval_s) if a.watch_alias else None
    return Generator.options(user_config=GeneratorOptions().to_dict()).bind(watcher, a.to_dict())


__all__ = ["app", "Generator", "build_app", "WATCHER"]
