"""Serving pieces without Ray: the shared-batch sampler, API keys, options, serve files, request rules."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from detailflow.platform.serving.sampling import BatchJob, Final, Preview, SampleSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke():
    from detailflow.platform.serving.testing import smoke_modules

    _, tok, ar = smoke_modules(seed=1)
    return ar, tok


class _Enough(Exception):
    pass


def solo(ar, tok, spec: SampleSpec) -> np.ndarray:
    """The request alone through models.sampler.sample, stopped at t as the registered pyfunc does."""
    from detailflow.models.generator import to_uint8
    from detailflow.models.sampler import sample

    t, kept = spec.tokens or ar.cfg.num_tokens, {}

    def stop_at_t(start, stop, codes):
        if stop >= t:
            kept["codes"] = codes[:, :t].clone()
            raise _Enough

    try:
        sample(ar, torch.tensor(spec.class_ids), cfg_scale=spec.cfg_scale, temperature=spec.temperature,
               top_k=spec.top_k, top_p=spec.top_p, generator=torch.Generator().manual_seed(spec.seed),
               on_pass=stop_at_t)
    except _Enough:
        pass
    return to_uint8(tok.decode(kept["codes"], t)).numpy()


SPECS = [SampleSpec([3, 3], 1.5, seed=7, tokens=16), SampleSpec([1], 1.0, seed=9, tokens=4),
         SampleSpec([2, 5, 9], 3.0, 0.7, 5, 0.9, seed=11, tokens=8),
         SampleSpec([0], 1.0, 0.0, seed=1, tokens=12), SampleSpec([4], 2.0, seed=7, tokens=0)]


def test_batched_requests_equal_each_request_alone(smoke):
    ar, tok = smoke
    job = BatchJob(ar, tok, SPECS)
    finals = job.run()
    assert job.passes_run == ar.cfg.forward_passes == 7  # the longest request sets the passes, not their sum
    for spec, final in zip(SPECS, finals, strict=True):
        assert isinstance(final, Final) and final.batch_requests == len(SPECS) and final.batch_images == 8
        ref = solo(ar, tok, spec)
        assert final.images.shape == ref.shape and (final.images == ref).all(), spec
    # fewer tokens = fewer passes and a smaller image
    assert [f.steps for f in finals] == [7, 4, 5, 6, 7] and [f.canvas for f in finals] == [32, 16, 24, 32, 32]


def test_same_seed_same_images_different_seed_differs(smoke):
    ar, tok = smoke
    a = BatchJob(ar, tok, [SampleSpec([2, 2], 1.5, seed=3)]).run()[0].images
    b = BatchJob(ar, tok, [SampleSpec([5], 1.0, seed=8), SampleSpec([2, 2], 1.5, seed=3)]).run()[1].images
    c = BatchJob(ar, tok, [SampleSpec([2, 2], 1.5, seed=4)]).run()[0].images
    assert (a == b).all() and not (a == c).all()


def test_cancelled_request_leaves_the_batch_and_the_others_are_unchanged(smoke):
    ar, tok = smoke
    job = BatchJob(ar, tok, SPECS)
    events = [job.step(), job.step()]
    job.cancel(2)
    job.cancel(4)
    rows_before = job.codes.shape[0]
    events.append(job.step())
    assert job.codes.shape[0] < rows_before and job.cache.k[0].shape[0] == job.codes.shape[0]
    while not job.done:
        events.append(job.step())
    for i in (2, 4):
        assert all(e[i] is None for e in events[2:]), "a cancelled request still got results"
    for i in (0, 1, 3):
        final = next(e[i] for e in events if isinstance(e[i], Final))
        assert (final.images == solo(ar, tok, SPECS[i])).all()


def test_previews_are_the_prefix_decoded_at_growing_canvases(smoke):
    from detailflow.models.generator import prefix_previews

    ar, tok = smoke
    spec = SampleSpec([6], 1.5, seed=5, previews=True)
    job = BatchJob(ar, tok, [spec])
    events = [e[0] for e in iter(lambda: None if job.done else job.step(), None)]
    previews = [e for e in events if isinstance(e, Preview)]
    assert isinstance(events[-1], Final) and len(previews) == 6
    assert [p.t for p in previews] == [1, 2, 3, 4, 8, 12] and [p.step for p in previews] == list(range(1, 7))
    canvases = [p.canvas for p in previews]
    assert canvases == sorted(canvases) and canvases[0] < canvases[-1]
    from detailflow.models.sampler import sample

    full = sample(ar, torch.tensor([6]), cfg_scale=1.5, generator=torch.Generator().manual_seed(5))
    expected = prefix_previews(tok, full, [p.t for p in previews])
    for p, e in zip(previews, expected, strict=True):
        assert p.images.shape == (1, 3, p.canvas, p.canvas) and (p.images == e.numpy()).all()


def test_key_store_env_file_revocation_and_reload(tmp_path):
    from detailflow.platform.serving.auth import INVALID, MISSING, OK, REVOKED, KeyStore, first_key, key_hash

    f = tmp_path / "keys"
    f.write_text(f"# comment\nkey-one\nsha256:{key_hash('key-two')}\nrevoked key-three\n")
    env = {"K": "env-key, key-three", "R": ""}
    ks = KeyStore.from_sources("K", "R", str(f), environ=env, reload_s=0.0)
    assert ks.check("Bearer key-one")[0] == OK and ks.check("bearer key-two")[0] == OK
    assert ks.check("Bearer env-key")[0] == OK
    assert ks.check("Bearer key-three") == (REVOKED, key_hash("key-three")[:8])  # the file revokes an env key
    assert ks.check(None)[0] == MISSING and ks.check("Bearer nope")[0] == INVALID
    assert ks.check("Basic key-one")[0] == INVALID
    assert "key-one" not in repr(ks) and key_hash("key-one") not in repr(ks)
    f.write_text(f.read_text() + "revoked key-one\n")
    os.utime(f, ns=(1, 2))  # a different stamp even within the file system's time resolution
    assert ks.check("Bearer key-one")[0] == REVOKED
    assert first_key(f) is None  # key-one revoked, key-two only by hash
    with pytest.raises(ValueError):
        KeyStore.from_sources("K", "", "", environ={"K": "sha256:zz"})


def test_generator_options_and_app_args_name_the_field():
    from detailflow.platform.serving.config import AppArgs, GeneratorOptions, ServeConfigError

    opts = GeneratorOptions.from_dict({"max_batch_size": "8", "max_images_per_request": 4})
    assert opts.max_batch_size == 8
    for bad, field in [({"colour": 1}, "colour"), ({"max_images_per_request": 32}, "max_images_per_request"),
                       ({"backend": "magic"}, "backend"), ({"max_batch_size": "x"}, "max_batch_size"),
                       ({"ar_dtype": "float16"}, "ar_dtype"),
                       ({"gil_switch_interval_ms": -1}, "gil_switch_interval_ms")]:
        with pytest.raises(ServeConfigError, match=field):
            GeneratorOptions.from_dict(bad)
    with pytest.raises(ServeConfigError, match="retry_after_s"):
        AppArgs.from_dict({"retry_after_s": 0})


@pytest.mark.parametrize("name", ["serve-local.yaml", "serve-gpu.yaml"])
def test_shipped_serve_files_are_valid_ray_configs(name):
    from detailflow.platform.serving.config import GENERATOR, deployment_entry, load_serve_file

    sf = load_serve_file(ROOT / "configs" / name)
    app = sf.raw["applications"][0]
    gen = deployment_entry(app, GENERATOR)
    auto = gen["autoscaling_config"]
    assert {"min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
            "downscale_delay_s"} <= set(auto) and auto["min_replicas"] >= 1
    assert gen["max_ongoing_requests"] >= sf.generator.max_batch_size and gen["max_queued_requests"] > 0
    # capacity in images: Serve's request bound equals the image bound (a request is >= 1 image), the
    # autoscaler counts images, and a replica being removed outlives its requests' deadline (drains)
    assert gen["max_ongoing_requests"] == sf.generator.max_pending_images
    assert auto["policy"]["policy_function"] == "detailflow.platform.serving.autoscale:ImageQueuePolicy"
    assert gen["graceful_shutdown_timeout_s"] > app["args"]["request_timeout_s"]
    if name == "serve-gpu.yaml":
        assert gen["ray_actor_options"]["num_gpus"] == 1 and sf.generator.device == "cuda"
    else:
        assert gen["ray_actor_options"]["num_cpus"] < 1 and "num_gpus" not in gen["ray_actor_options"]
    assert sf.generator.simulated_pass_s == 0


def test_validation_messages_name_field_and_rule():
    from pydantic import ValidationError

    from detailflow.platform.serving.schemas import GenerateRequest, validation_body

    with pytest.raises(ValidationError) as exc:
        GenerateRequest.model_validate({"class_ids": [1, -2], "cfg_scale": 0.2, "extra": 1, "format": "bmp",
                                        "top_k": 2**70})
    items = {e["field"]: e["rule"] for e in validation_body(exc.value.errors())["error"]["errors"]}
    assert items == {"class_ids.1": "must be >= 0", "cfg_scale": "must be >= 1.0",
                     "extra": "is not a known field", "format": "must be one of 'png', 'json' or 'grid'",
                     "top_k": f"must be <= {2**20}"}
    spec = GenerateRequest(class_ids=[3, 5], num_images=2, seed=4).to_spec(4)
    assert spec.class_ids == [3, 3, 5, 5] and spec.seed == 4


def test_png_grid_layout():
    from detailflow.platform.serving.images import from_png, grid_png, to_png

    imgs = np.random.default_rng(0).integers(0, 255, (5, 3, 8, 8), dtype=np.uint8)
    assert (from_png(to_png(imgs[0])) == imgs[0]).all()
    grid = from_png(grid_png(imgs, columns=3))
    assert grid.shape == (3, 2 * 10 + 2, 3 * 10 + 2)
    assert (grid[:, 2:10, 2:10] == imgs[0]).all() and (grid[:, 12:20, 12:20] == imgs[4]).all()
    assert (from_png(grid_png(imgs[:1])) == imgs[0]).all()  # one image: no border


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (32, 32), (7, 130), (256, 200)])
@pytest.mark.parametrize("content", ["random", "smooth", "extremes"])
def test_png_encoder_round_trips_through_an_independent_decoder(shape, content):
    """images.encode_png is written by hand: PIL (which checks chunk CRCs and zlib) must read back the
    exact pixels, wrap-around of the Up filter included (extremes: 255 above 0 and 0 above 255)."""
    import io

    from PIL import Image

    from detailflow.platform.serving.images import encode_png

    h, w = shape
    rng = np.random.default_rng(h * 1000 + w)
    if content == "random":
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    elif content == "smooth":
        img = (np.add.outer(np.arange(h), np.arange(w))[..., None] * [1, 2, 3] % 256).astype(np.uint8)
    else:
        rows = np.where(np.arange(h) % 2 == 0, 255, 0).astype(np.uint8)  # 255 over 0 over 255 ...
        img = np.broadcast_to(rows[:, None, None], (h, w, 3)).copy()
    png = encode_png(img)
    decoded = Image.open(io.BytesIO(png))
    decoded.load()  # decompresses every IDAT and checks the CRCs on the way
    assert decoded.mode == "RGB" and decoded.size == (w, h)
    assert (np.asarray(decoded) == img).all()


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8),
                                 np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4, 3), np.uint8)])
def test_png_encoder_refuses_what_it_cannot_write(bad):
    from detailflow.platform.serving.images import encode_png

    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        encode_png(bad)


def _served(ar, tok):
    from detailflow.platform.serving.model_store import ServedModel

    return ServedModel("unit-generator", "1", tok, ar, "cpu", {}, {"model": "smoke"})


def test_engine_backend_streams_previews_and_matches_single_image_sampling(smoke):
    """Backend "engine": image i of a request is the engine's (seed + i) request; previews then Final."""
    pytest.importorskip("detailflow.models.engine")  # the engine lands separately (models/engine.py)
    import asyncio

    from detailflow.models.generator import codes_to_uint8
    from detailflow.models.sampler import sample
    from detailflow.platform.serving.config import GeneratorOptions
    from detailflow.platform.serving.engine_backend import EngineBackend
    from detailflow.platform.serving.generator import Ticket

    ar, tok = smoke
    backend = EngineBackend(_served(ar, tok), GeneratorOptions(backend="engine", max_batch_size=4,
                                                               max_images_per_request=4))

    async def collect(spec):
        return [ev async for ev in backend.events(Ticket(spec))]

    try:
        events = asyncio.run(collect(SampleSpec([3, 8], 2.0, seed=21, previews=True)))
        previews, final = events[:-1], events[-1]
        assert isinstance(final, Final) and all(isinstance(p, Preview) for p in previews)
        assert [p.t for p in previews] == [1, 2, 3, 4, 8, 12] and final.images.shape == (2, 3, 32, 32)
        for i, c in enumerate([3, 8]):
            gen = torch.Generator().manual_seed(21 + i)
            codes = sample(ar, torch.tensor([c]), cfg_scale=2.0, generator=gen)
            assert (final.images[i] == codes_to_uint8(tok, codes).numpy()[0]).all()
        for seed in range(20):  # previews that arrive while a Final is being prepared are not lost
            ts = [ev.t for ev in asyncio.run(collect(SampleSpec([3, 8], 2.0, seed=seed, previews=True)))]
            assert ts == [1, 2, 3, 4, 8, 12, 16], (seed, ts)
        short = asyncio.run(collect(SampleSpec([5], 1.0, seed=3, tokens=8)))
        assert len(short) == 1 and short[0].canvas == 24
        # a consumer that leaves after the first preview cancels its engine requests
        async def leave_early():
            gen = backend.events(Ticket(SampleSpec([1, 2], 1.5, seed=4, previews=True)))
            first = await gen.__anext__()
            await gen.aclose()
            return first

        assert isinstance(asyncio.run(leave_early()), Preview)
        deadline = time.time() + 5
        while not backend.engine.idle:
            assert time.time() < deadline, "cancelled engine requests still hold rows"
            time.sleep(0.01)
    finally:
        backend.retire()


def test_engine_backend_attaches_no_per_pass_hook_without_previews(smoke):
    """A hook makes the engine copy codes to the host after every pass: only preview requests get one."""
    import asyncio

    from detailflow.platform.serving.config import GeneratorOptions
    from detailflow.platform.serving.engine_backend import EngineBackend
    from detailflow.platform.serving.generator import Ticket

    ar, tok = smoke
    backend = EngineBackend(_served(ar, tok), GeneratorOptions(max_batch_size=4, max_images_per_request=4))
    hooks, submit = [], backend.engine.submit

    def recording_submit(request, on_pass=None):  # the real submit, noting which hook it was given
        hooks.append(on_pass)
        return submit(request, on_pass=on_pass)

    backend.engine.submit = recording_submit

    async def collect(spec):
        return [ev async for ev in backend.events(Ticket(spec))]

    try:
        assert isinstance(asyncio.run(collect(SampleSpec([3, 4], 1.5, seed=2)))[-1], Final)
        assert hooks == [None, None]
        asyncio.run(collect(SampleSpec([3], 1.5, seed=2, previews=True)))
        assert len(hooks) == 3 and hooks[2] is not None
    finally:
        backend.retire()


def test_a_dead_engine_process_makes_its_replica_unhealthy_and_a_retired_ones_does_not(smoke):
    """SIGKILL of a retired engine's process leaves the replica serving; of the current one, the replica
    is ended (end_replica: os._exit in Serve, recorded here), its health check fails and admission
    answers Overloaded (503), naming the exit."""
    import os
    import signal
    import time

    from detailflow.platform.serving.config import GeneratorOptions
    from detailflow.platform.serving.engine_backend import EngineBackend
    from detailflow.platform.serving.generator import GeneratorCore, Overloaded, Ticket

    ar, tok = smoke
    core, opts = GeneratorCore(), GeneratorOptions(max_batch_size=2, max_images_per_request=2)
    core.model, core.opts = _served(ar, tok), opts
    ended = []
    core.end_replica = lambda: ended.append(core.engine.dead_reason)  # in Serve: os._exit(1)
    old = EngineBackend(core.model, opts, core._engine_died)
    core.engine = EngineBackend(core.model, opts, core._engine_died)
    try:
        for backend in (old, core.engine):
            os.kill(backend.stats()["engine_pid"], signal.SIGKILL)
            deadline = time.time() + 30
            while backend.alive:
                assert time.time() < deadline, "the engine's death went unnoticed"
                time.sleep(0.02)
            if backend is old:
                time.sleep(0.2)  # on_death runs right after the handles fail: give it its moment
                assert ended == []  # a retired engine: the current one serves on
                core.check_health()
                assert isinstance(core.admit(SampleSpec([1], 1.0, seed=1)), Ticket)
                core.pending_images = 0
        deadline = time.time() + 10
        while not ended:
            assert time.time() < deadline, "the replica was not ended"
            time.sleep(0.02)
        assert len(ended) == 1 and "exited with code -9" in ended[0]
        with pytest.raises(RuntimeError, match="the engine is gone: .*exited with code -9"):
            core.check_health()
        with pytest.raises(Overloaded, match="engine is gone"):
            core.admit(SampleSpec([1], 1.0, seed=1))
    finally:
        old.engine.stop()
        core.engine.engine.stop()


def test_batch_decoder_merges_calls_that_arrive_while_one_runs(smoke):
    """Three decodes queued while the first runs: 2 tokenizer calls in all, each caller gets exactly the
    images of decoding its own codes alone."""
    import asyncio
    import threading

    from detailflow.models.generator import to_uint8
    from detailflow.platform.serving.engine_backend import BatchDecoder

    ar, tok = smoke
    gate, sizes = threading.Event(), []

    def decode(codes, t):
        sizes.append(len(codes))
        gate.wait(5)  # the first call holds until the others are queued
        return to_uint8(tok.decode(codes, t)).numpy()

    dec = BatchDecoder(decode)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, ar.cfg.vocab_size, (k, 8), generator=gen) for k in (1, 2, 3, 1)]

    async def run():
        first = asyncio.ensure_future(dec(inputs[0], 8))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(dec(x, 8)) for x in inputs[1:]]
        await asyncio.sleep(0.05)
        gate.set()
        return [await first] + [await r for r in rest]

    outs = asyncio.run(run())
    assert sizes == [1, 6] and dec.calls == 2 and dec.rows == 7
    for x, out in zip(inputs, outs, strict=True):
        assert (out == to_uint8(tok.decode(x, 8)).numpy()).all()


def test_rate_limit_and_daily_quota_closed_form():
    from detailflow.platform.serving.limits import Limiter, retry_after

    now = [86400 * 100 + 3600.0]  # 01:00 UTC
    lim = Limiter(default_rate=2.0, default_burst=2, default_quota=5, clock=lambda: now[0])
    assert lim.admit("k", 1) is None and lim.admit("k", 1) is None  # the bucket of 2
    wait, which = lim.admit("k", 1)
    assert which == "rate" and wait == pytest.approx(0.5) and retry_after(wait) == "1"
    now[0] += 0.5
    assert lim.admit("k", 3) is None  # 1 + 1 + 3 = 5 images today
    now[0] += 10
    wait, which = lim.admit("k", 1)
    assert which == "quota" and wait == pytest.approx(23 * 3600 - 10.5)
    assert lim.admit("other", 1) is None  # per key
    now[0] += 23 * 3600  # the next UTC day
    assert lim.admit("k", 5) is None and lim.used_today("k") == 5
    own = Limiter(clock=lambda: now[0])  # no defaults: unlimited unless the key file says so
    assert all(own.admit("k", 100) is None for _ in range(50))
    assert own.admit("k", 1, {"rate": 1, "burst": 1}) is None and own.admit("k", 1, {"rate": 1})[1] == "rate"


def test_key_file_limits_are_parsed_per_key(tmp_path):
    from detailflow.platform.serving.auth import OK, KeyStore, key_id

    path = tmp_path / "keys"
    path.write_text("dfk_a rate=2 burst=5 quota=100\ndfk_b\nrevoked dfk_c quota=1\n")
    keys = KeyStore.from_sources(path=str(path), environ={})
    assert keys.check("Bearer dfk_a") == (OK, key_id("dfk_a")) and keys.check("Bearer dfk_b")[0] == OK
    assert keys.limits == {key_id("dfk_a"): {"rate": 2.0, "burst": 5, "quota": 100}}
    path.write_text("dfk_a colour=red\n")
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        KeyStore.from_sources(path=str(path), environ={})


def _front_app(limit: int = 1024):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from detailflow.platform.serving.front import Front

    async def echo(request):
        body = await request.body()
        return JSONResponse({"n": len(body), "id": request.scope["state"]["request_id"]})

    async def boom(request):
        raise RuntimeError("broken")

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/boom", boom)])
    app.add_middleware(Front, max_body_bytes=lambda: limit)
    return app


def _asgi(app, method: str, path: str, chunks: list[bytes], headers: dict | None = None):
    """One request straight through the ASGI app (no server): (status, headers, JSON body)."""
    import asyncio
    import json

    sent = []
    parts = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
             for i, c in enumerate(chunks)]
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
             "root_path": ""}

    async def receive():
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body or b"null")


def test_front_413_from_content_length_and_while_streaming_request_ids_and_json_500():
    app = _front_app(1024)
    status, head, body = _asgi(app, "POST", "/echo", [b"x" * 1024], {"content-length": "1024"})
    assert status == 200 and body["n"] == 1024
    assert head["x-request-id"] == body["id"] and len(body["id"]) == 16
    status, _, body = _asgi(app, "POST", "/echo", [b"x" * 1025], {"content-length": "1025"})
    assert status == 413 and body["error"]["type"] == "payload_too_large"
    status, _, body = _asgi(app, "POST", "/echo", [b"x" * 200] * 10)  # no Content-Length: cut while streaming
    assert status == 413 and "limit of 1024" in body["error"]["message"]
    status, head, body = _asgi(app, "POST", "/echo", [b"{}"], {"x-request-id": "abc-1"})
    assert body["id"] == "abc-1" and "x-request-id" not in head  # the proxy that set it echoes it
    status, head, body = _asgi(app, "GET", "/boom", [b""])
    assert status == 500 and head["content-type"] == "application/json"
    assert body["error"]["request_id"] == head["x-request-id"]


def test_proxy_errors_answer_502_json_with_the_request_id_when_no_replica_answers():
    """Serve's proxy returns without a response when the replica died mid-request (uvicorn would send
    a plain-text 500): ProxyErrors answers 502 JSON naming the request id; the id it puts on the request
    is the one the app behind it sees; answers that did start pass through untouched."""
    from detailflow.platform.serving.proxy_errors import ProxyErrors, proxy_middlewares

    seen = {}

    async def silent(scope, receive, send):  # what the proxy does for a dead replica
        seen["id"] = dict(scope["headers"]).get(b"x-request-id", b"").decode()

    async def raising(scope, receive, send):
        raise RuntimeError("actor died")

    async def answering(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type",
                                                                                b"application/json")]})
        await send({"type": "http.response.body", "body": b"{\"ok\": 1}"})

    status, head, body = _asgi(ProxyErrors(silent), "POST", "/v1/generate", [b"{}"])
    assert status == 502 and head["content-type"] == "application/json" and head["retry-after"] == "1"
    assert body["error"]["type"] == "replica_failed" and len(head["x-request-id"]) == 16
    assert body["error"]["request_id"] == head["x-request-id"] == seen["id"]
    status, head, body = _asgi(ProxyErrors(raising), "GET", "/x", [b""], {"x-request-id": "client-7"})
    assert status == 502 and head["x-request-id"] == body["error"]["request_id"] == "client-7"
    _asgi(ProxyErrors(silent), "GET", "/x", [b""], {"x-request-id": "bad id with spaces"})
    assert seen["id"] != "bad id with spaces" and len(seen["id"]) == 16  # an insane id is replaced
    status, head, body = _asgi(ProxyErrors(answering), "GET", "/x", [b""])
    assert status == 200 and body == {"ok": 1}

    def serve_says(code, text, content_type=b"text/plain; charset=utf-8"):
        async def app(scope, receive, send):  # what the proxy sends for its own errors
            await send({"type": "http.response.start", "status": code, "headers": [(b"content-type",
                                                                                    content_type)]})
            await send({"type": "http.response.body", "body": text[:5], "more_body": True})
            await send({"type": "http.response.body", "body": text[5:]})
        return app

    status, head, body = _asgi(ProxyErrors(serve_says(503, b"Request dropped due to backpressure")), "POST",
                               "/v1/generate", [b"{}"], {"x-request-id": "client-9"})
    assert status == 503 and head["content-type"] == "application/json" and head["retry-after"] == "1"
    assert body["error"]["type"] == "overloaded" and body["error"]["request_id"] == "client-9"
    assert "Request dropped due to backpressure" in body["error"]["message"]
    status, head, body = _asgi(ProxyErrors(serve_says(500, b"boom")), "GET", "/x", [b""])
    assert status == 500 and body["error"]["type"] == "internal" and "retry-after" not in head
    replica_json = b'{"error": {"type": "overloaded", "request_id": "r1"}}'
    status, head, body = _asgi(ProxyErrors(serve_says(503, replica_json, b"application/json")), "GET", "/x",
                               [b""])
    assert status == 503 and body == {"error": {"type": "overloaded", "request_id": "r1"}}  # untouched
    assert [m.cls for m in proxy_middlewares()] == [ProxyErrors]
    # what Serve's proxy does at start with the env variable: import + call + validate, then wrap its app
    # (its own RequestIdMiddleware innermost): the id the proxy's app sees is the one the 502 names
    from ray.serve._private.http_util import _apply_middlewares, validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    from detailflow.platform.serving.proxy_errors import IMPORT_PATH

    middlewares = validate_http_proxy_callback_return(call_function_from_import_path(IMPORT_PATH))
    status, head, body = _asgi(_apply_middlewares(silent, middlewares), "POST", "/v1/generate", [b"{}"])
    assert status == 502 and body["error"]["request_id"] == head["x-request-id"] == seen["id"]


def test_result_cache_is_an_lru_of_its_size():
    from detailflow.platform.serving.generator import ResultCache

    cache = ResultCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)  # "b" is the least recently used
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    cache.resize(0)
    cache.put("d", 4)
    assert cache.get("d") is None and not cache.data


def _autoscaling_ctx(config, pending: dict, queued: float, current: int, target: int):
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingContext

    dep = DeploymentID(name="Generator", app_name="t")
    replicas = [ReplicaID(unique_id=r, deployment_id=dep) for r in pending]
    return AutoscalingContext(
        deployment_id=dep, deployment_name="Generator", app_name="t", current_num_replicas=current,
        target_num_replicas=target, running_replicas=replicas,
        total_num_requests=lambda: queued + len(pending), total_queued_requests=queued,
        aggregated_metrics={"pending_images": dict(zip(replicas, pending.values(), strict=True))},
        raw_metrics={}, capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas, policy_state={}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=0.0, config=config)


@pytest.mark.parametrize("pending, queued, current, want", [
    ({"a": 40.0, "b": 30.0}, 0.0, 2, 3),     # 70 images / 32 -> 2.19 -> 3 replicas
    ({"a": 32.0, "b": 32.0}, 0.0, 2, 2),     # exactly at target: stay
    ({"a": 32.0, "b": 32.0}, 1.0, 2, 3),     # one queued request (>= 1 image) tips it over
    ({"a": 2.0, "b": 1.0, "c": 0.0}, 0.0, 3, 1),  # little work: down to min_replicas
    ({"a": 16.0 * 16}, 0.0, 1, 8),           # 16 requests of 16 images: capped at max_replicas
])
def test_image_queue_autoscaling_policy_closed_form(pending, queued, current, want):
    """desired = ceil((sum of pending images + queued requests) / target), clipped to [min, max], through
    Serve's own wrapper (delays 0); the policy is the one a serve file names (string import path)."""
    import math

    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig

    config = AutoscalingConfig(min_replicas=1, max_replicas=8, upscale_delay_s=0, downscale_delay_s=0,
                               policy={"policy_function":
                                       "detailflow.platform.serving.autoscale:ImageQueuePolicy",
                                       "policy_kwargs": {"target_images_per_replica": 32}})
    policy_cls = config.policy.get_policy()
    policy = policy_cls(**config.policy.policy_kwargs)
    closed = min(8, max(1, math.ceil((sum(pending.values()) + queued) / 32)))
    assert closed == want
    ctx = _autoscaling_ctx(config, pending, queued, current, current)
    decided, _ = _apply_autoscaling_config(policy)(ctx)
    assert decided == want
    raw, state = policy(_autoscaling_ctx(config, pending, queued, current, current))
    assert raw == pytest.approx((sum(pending.values()) + queued) / 32)
    assert state == {"pending_images": sum(pending.values()), "queued_requests": queued}


def test_image_queue_policy_refuses_a_non_positive_target():
    from detailflow.platform.serving.autoscale import ImageQueuePolicy, desired_replicas

    with pytest.raises(ValueError, match="target_images_per_replica"):
        ImageQueuePolicy(0)
    with pytest.raises(ValueError, match="target_images_per_replica"):
        desired_replicas(1, 0, -1)


class _Recorder:
    """Stand-in for ray.serve.metrics: every metric records its calls (name, method, value, tags)."""

    def __init__(self):
        self.calls: list[tuple] = []
        rec = self

        class Metric:
            def __init__(self, name, *_, **__):
                self.name = name

            def inc(self, value=1, tags=None):
                rec.calls.append((self.name, "inc", value, tags))

            def observe(self, value, tags=None):
                rec.calls.append((self.name, "observe", value, tags))

            def set(self, value, tags=None):
                rec.calls.append((self.name, "set", value, tags))

        self.Counter = self.Histogram = self.Gauge = Metric


@pytest.mark.parametrize("n", [1, 7, 40])
def test_request_counters_are_summed_and_handed_to_ray_once_per_tag_set_at_the_gauge_sample(n):
    from detailflow.platform.serving.metrics import ServeMetrics

    rec = _Recorder()
    m = ServeMetrics(rec)
    keys = ["k1", "k2"]
    for i in range(n):
        m.request("/v1/generate", 200 if i % 3 else 429, keys[i % 2], images=2 if i % 3 else 0, seconds=0.01)
    assert not [c for c in rec.calls if c[1] == "inc"]  # nothing handed to Ray per request
    assert len([c for c in rec.calls if c[1] == "observe"]) == n  # latency: one observation per request
    m.gauges(pending_images=3, queue_images=1, slots_used=4, slots=8)
    incs = [c for c in rec.calls if c[1] == "inc"]
    want_requests: dict = {}
    want_images: dict = {}
    for i in range(n):  # the expected totals, counted here independently
        tags = ("/v1/generate", "200" if i % 3 else "429", keys[i % 2])
        want_requests[tags] = want_requests.get(tags, 0) + 1
        if i % 3:
            want_images[keys[i % 2]] = want_images.get(keys[i % 2], 0) + 2
    got_requests = {(t["route"], t["status"], t["key"]): v for name, _, v, t in incs
                    if name == "detailflow_requests_total"}
    got_images = {t["key"]: v for name, _, v, t in incs if name == "detailflow_images_total"}
    assert got_requests == want_requests and got_images == want_images
    assert len(incs) == len(want_requests) + len(want_images)  # one call per tag set
    assert ("detailflow_slot_occupancy", "set", 0.5, None) in rec.calls
    before = len(rec.calls)
    m.gauges(pending_images=0, queue_images=0, slots_used=0, slots=8)  # nothing new: no counter call
    assert not [c for c in rec.calls[before:] if c[1] == "inc"]


@pytest.mark.parametrize("ms", [0.5, 2.0])
def test_gil_switch_interval_is_set_and_zero_restores_the_interpreters_own(ms):
    import sys

    from detailflow.platform.serving.config import GeneratorOptions
    from detailflow.platform.serving.generator import apply_process_settings

    own = sys.getswitchinterval()  # this interpreter's, untouched so far
    try:
        apply_process_settings(GeneratorOptions(gil_switch_interval_ms=ms))
        assert sys.getswitchinterval() == pytest.approx(ms / 1000)
        apply_process_settings(GeneratorOptions())  # a reconfigure back to the default
        assert sys.getswitchinterval() == pytest.approx(own)
    finally:
        sys.setswitchinterval(own)
