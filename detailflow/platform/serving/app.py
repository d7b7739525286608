"""The HTTP API: a FastAPI ingress deployment (CPU) in front of the Generator replicas.

    serve run detailflow.platform.serving.app:build_app          # Ray's CLI, default args
    detailflow serve up --config configs/serve-local.yaml         # what the project uses (deploy.py)

Routes (OpenAPI at /openapi.json, docs at /docs):
    GET  /                       playground page (page.html)
    GET  /healthz                200 when a Generator answers (no key needed)
    GET  /v1/models              the served model: version, classes, allowed `tokens` and their canvases
    POST /v1/generate            JSON (base64 PNGs + version + seed) or, with format=png, one PNG / a grid
    POST /v1/generate/stream     Server-Sent Events: start, preview after every pass (the prefix decoded
    GET  /v1/generate/stream       at c(t)), done (the POST /v1/generate JSON + the grid); GET: query params
Errors: 401 no/unknown key (WWW-Authenticate: Bearer), 403 revoked key, 422 {"error": {"errors":
[{"field", "rule"}]}}, 503 + Retry-After when the Generator's queue is full or the answer takes longer
than request_timeout_s. A stream whose client disconnects cancels its request: its rows leave the batch.
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
from detailflow.platform.serving.config import GENERATOR, INGRESS, WATCHER, AppArgs, GeneratorOptions
from detailflow.platform.serving.generator import Generator, Rejected
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
          422: {"model": ErrorResponse, "description": "A field breaks a rule (named in errors)"},
          503: {"model": ErrorResponse, "description": "Overloaded: retry after Retry-After seconds"}}

app = FastAPI(title="DetailFlow generation API", version="1",
              description="Class-conditional image generation with DetailFlow (1D coarse-to-fine "
                          "autoregressive). Authenticate with `Authorization: Bearer <API key>`.")
bearer = HTTPBearer(auto_error=False, description="API key issued by the operator")


class _State:
    keys: KeyStore | None = None  # set by the Ingress replica
    anonymous: bool = False  # no key configured and allow_anonymous


class Overloaded(Exception):
    pass


async def require_key(request: Request, _=Depends(bearer)) -> str:  # noqa: B008 (FastAPI's idiom)
    """401 without a valid key, 403 for a revoked one. Keys are never logged, only their key id."""
    status, kid = _State.keys.check(request.headers.get("authorization")) if _State.keys else (MISSING, None)
    if status == OK:
        return kid
    if status == MISSING and _State.anonymous:
        return "anonymous"
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
    kinds = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
             503: "overloaded"}
    return JSONResponse(error_body(kinds.get(exc.status_code, "error"), str(exc.detail)),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, generator, watcher=None, args: dict | None = None):
        self.args = AppArgs.from_dict(args)
        self.gen, self.watcher = generator, watcher
        a = self.args
        _State.keys = KeyStore.from_sources(a.api_keys_env, a.revoked_keys_env, a.api_keys_file)
        _State.anonymous = a.allow_anonymous and _State.keys.count() == 0 and _State.keys.path is None
        if _State.keys.count() == 0 and not _State.anonymous:
            logger.warning("no API key configured (%s / %s): every /v1 request gets 401", a.api_keys_env,
                           _State.keys.path or "$DETAILFLOW_API_KEYS_FILE")

    # ---- plumbing ----------------------------------------------------------------------------------
    def _overloaded(self, why: str) -> JSONResponse:
        return JSONResponse(error_body("overloaded", why), status_code=503,
                            headers={"Retry-After": str(self.args.retry_after_s)})

    async def _await(self, response, timeout_s: float, cancel=None):
        """Await a handle call; Overloaded on back-pressure, no replica, or timeout (then cancelled)."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        async def wait():
            return await response

        try:
            return await asyncio.wait_for(wait(), timeout_s)
        except BackPressureError as exc:
            raise Overloaded("the generator queue is full, retry later") from exc
        except DeploymentUnavailableError as exc:
            raise Overloaded("no generator replica is available yet") from exc
        except TimeoutError as exc:
            (cancel or response.cancel)()
            raise Overloaded(f"no answer within {timeout_s:.0f} s, retry later") from exc

    @staticmethod
    def _seed(body: GenerateRequest) -> int:
        return body.seed if body.seed is not None else secrets.randbelow(2**31)

    def _result_json(self, final: Final, class_ids: list[int], total_s: float) -> dict:
        i = final.info
        return {"model": i["model"], "model_version": i["model_version"], "seed": i["seed"],
                "tokens": i["tokens"], "canvas": i["canvas"], "class_ids": class_ids,
                "images": [img.b64(img.to_png(x)) for x in final.images], "batch": i["batch"],
                "replica": i["replica"],
                "timing": {"queue_s": i["queue_s"], "sample_s": i["sample_s"], "total_s": round(total_s, 4)}}

    # ---- routes ------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self, request: Request):
        return HTMLResponse(PAGE.replace("__ROOT_PATH__", request.scope.get("root_path", "").rstrip("/")))

    @app.get("/healthz", summary="Liveness: the ingress and a Generator replica answer")
    async def healthz(self):
        try:
            info = await self._await(self.gen.info.remote(), 10.0)
        except Overloaded as exc:
            return self._overloaded(str(exc))
        return {"status": "ok", "model": info.get("model"), "model_version": info.get("version")}

    @app.get("/v1/models", summary="The served model and what a request may ask of it",
             responses={k: ERRORS[k] for k in (401, 403, 503)})
    async def models(self, key: str = Depends(require_key)):
        try:
            info = await self._await(self.gen.info.remote(), 10.0)
            watch = await self._await(self.watcher.status.remote(), 10.0) if self.watcher else None
        except Overloaded as exc:
            return self._overloaded(str(exc))
        return {"data": [info], "watcher": watch}

    @app.post("/v1/generate", summary="Generate images (JSON with base64 PNGs, or a PNG)",
              response_model=GenerateResponse, responses={200: {"content": {"image/png": {}}}, **ERRORS})
    async def generate(self, body: GenerateRequest, request: Request, key: str = Depends(require_key)):
        t0 = time.perf_counter()
        spec = body.to_spec(self._seed(body))
        try:
            final = await self._await(self.gen.generate.remote(spec), self.args.request_timeout_s)
        except Overloaded as exc:
            return self._overloaded(str(exc))
        if isinstance(final, Rejected):
            return JSONResponse(rule_body(final.errors), status_code=422)
        want_png = body.format == "png" or request.headers.get("accept", "").startswith("image/png")
        i = final.info
        if want_png:
            png = await asyncio.to_thread(img.grid_png, final.images, self.args.max_grid_columns)
            return Response(png, media_type="image/png", headers={
                "X-Model-Version": i["model_version"], "X-Seed": str(i["seed"]), "X-Tokens": str(i["tokens"]),
                "X-Batch-Requests": str(i["batch"]["requests"])})
        out = await asyncio.to_thread(self._result_json, final, spec.class_ids, time.perf_counter() - t0)
        return JSONResponse(out)

    @app.post("/v1/generate/stream", summary="Generate with a coarse-to-fine preview after every pass (SSE)",
              responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
    async def stream_post(self, body: GenerateRequest, key: str = Depends(require_key)):
        return await self._stream(body)

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
        return await self._stream(body)

    async def _stream(self, body: GenerateRequest):
        t0 = time.perf_counter()
        deadline = t0 + self.args.request_timeout_s
        spec = body.to_spec(self._seed(body))
        gen = self.gen.options(stream=True).stream.remote(spec)
        it = gen.__aiter__()
        try:  # the first event decides the status code: 503 / 422 before any byte of the stream
            first = await self._await(it.__anext__(), self.args.request_timeout_s, gen.cancel)
        except Overloaded as exc:
            gen.cancel()
            return self._overloaded(str(exc))
        if isinstance(first, Rejected):
            gen.cancel()
            return JSONResponse(rule_body(first.errors), status_code=422)

        async def events():
            ev = first
            try:
                yield _sse("start", {"seed": spec.seed, "class_ids": spec.class_ids, "tokens": spec.tokens})
                while True:
                    if isinstance(ev, Preview):
                        png = await asyncio.to_thread(img.grid_png, ev.images, self.args.max_grid_columns)
                        yield _sse("preview", {"t": ev.t, "canvas": ev.canvas, "step": ev.step,
                                               "steps": ev.steps, "grid": img.b64(png)})
                    elif isinstance(ev, Final):
                        out = await asyncio.to_thread(self._result_json, ev, spec.class_ids,
                                                      time.perf_counter() - t0)
                        png = await asyncio.to_thread(img.grid_png, ev.images, self.args.max_grid_columns)
                        yield _sse("done", {**out, "grid": img.b64(png)})
                        return
                    try:
                        left = max(0.001, deadline - time.perf_counter())
                        ev = await asyncio.wait_for(it.__anext__(), left)
                    except StopAsyncIteration:
                        yield _sse("error", error_body("internal", "the stream ended without images"))
                        return
                    except TimeoutError:
                        yield _sse("error", error_body("overloaded", "no answer within "
                                                       f"{self.args.request_timeout_s:.0f} s, retry later"))
                        return
            finally:
                gen.cancel()  # client gone, done, or failed: the replica stops working on it

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def build_app(args: dict | None = None):
    """The application (`import_path` of the serve configs). args: AppArgs fields. The Generator's
    user_config starts at GeneratorOptions defaults; the serve file's deployments override it."""
    from detailflow.platform.serving.watcher import ChampionWatcher

    a = AppArgs.from_dict(args)
    gen = Generator.options(user_config=GeneratorOptions().to_dict()).bind()
    watcher = ChampionWatcher.bind(GENERATOR, a.poll_interval_s) if a.watch_alias else None
    return Ingress.bind(gen, watcher, a.to_dict())


__all__ = ["app", "Ingress", "build_app", "WATCHER"]
