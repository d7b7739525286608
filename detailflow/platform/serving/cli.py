"""`detailflow serve up | status | down` and `detailflow generate`.

    detailflow serve up [--config configs/serve-local.yaml] [--model tiny] [--port 8000] [--num-cpus 4]
    detailflow serve status [--json]           # exit 1 when nothing is served
    detailflow serve down
    detailflow generate --class 3 --num 4 --out grid.png [--strip strip.png] [--cfg 1.5] [--seed 0]
                        [--tokens 0] [--url http://127.0.0.1:8000] [--api-key KEY]
    detailflow generate --local --class 3 --num 4 --out grid.png [--model tiny] [--version 3]

`generate` streams from the endpoint (a progress bar advances with every coarse-to-fine pass) and
writes the grid (and, with --strip, the first image's coarse-to-fine strip). The URL and key default to
what `serve up` wrote (<state_dir>/serve/endpoint.json and its key file); DETAILFLOW_API_KEY overrides.
With --local it loads `<model>-generator@champion` (or --version) through mlflow.pyfunc in this
process instead: the same seed gives the same images as the endpoint serving that version.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from detailflow.platform.cli_settings import get_settings

DEFAULT_CONFIG = "configs/serve-local.yaml"


@click.group()
def serve():
    """Ray Serve generation endpoint: up, status, down."""


@serve.command("up")
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True, help="Serve file.")
@click.option("--model", default=None, help="Registered base name to serve (<model>-generator).")
@click.option("--version", "pin", default=None, help="Serve this version instead of following the alias.")
@click.option("--port", type=int, default=None, help="HTTP port (default: the file's http_options.port).")
@click.option("--num-cpus", type=int, default=4, show_default=True, help="Logical CPUs of a local Ray head.")
@click.option("--front", type=click.Choice(["haproxy", "proxy"]), default="haproxy", show_default=True,
              help="HTTP ingress of a local Ray head: HAProxy straight to the replicas, or Serve's proxy.")
@click.option("--json", "as_json", is_flag=True, help="Print the endpoint as JSON.")
def serve_up(config_path, model, pin, port, num_cpus, front, as_json):
    """Deploy the app (starting a local Ray head unless DETAILFLOW_RAY_ADDRESS names a cluster)."""
    from detailflow.platform.serving import deploy
    from detailflow.platform.serving.config import (
        GENERATOR,
        ServeConfigError,
        deployment_entry,
        load_serve_file,
        parse_serve_config,
    )

    try:
        sf = load_serve_file(config_path)
        if model or pin:
            raw = json.loads(json.dumps(sf.raw))
            app = next(a for a in raw["applications"] if a.get("name", "default") == sf.app_name)
            entry = deployment_entry(app, GENERATOR)
            if entry is None:
                entry = {"name": GENERATOR}
                app.setdefault("deployments", []).append(entry)
            uc = entry.setdefault("user_config", {})
            uc.update({k: v for k, v in {"model": model, "version": pin}.items() if v})
            if pin:
                app.setdefault("args", {})["watch_alias"] = False
            sf = parse_serve_config(raw, config_path)
    except ServeConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    settings = get_settings()
    try:
        info = deploy.up(settings, sf, port=port, num_cpus=num_cpus, front=front)
    except deploy.DeployError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"serving {sf.generator.model}-generator ({'v' + pin if pin else '@' + sf.generator.alias}) "
               f"at {info['url']}")
    click.echo(f"front       {info['front']}")
    click.echo(f"playground  {info['playground']}")
    click.echo(f"API docs    {info['docs']}   (OpenAPI: {info['url']}/openapi.json)")
    if info["api_keys_file"]:
        click.echo(f"API keys    {info['api_keys_file']}")
    click.echo("stop with   detailflow serve down")


@serve.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def serve_status(as_json):
    """Applications, deployments and replicas; the served model version."""
    from detailflow.platform.serving import deploy

    st = deploy.status(get_settings())
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
    elif not st["running"]:
        click.echo(f"not serving: {st.get('reason', 'no application')}")
    else:
        for name, app in st["applications"].items():
            click.echo(f"application {name}: {app['status']} {app['message']}".rstrip())
            for dep, d in app["deployments"].items():
                reps = ", ".join(f"{n} {k.lower()}" for k, n in d["replicas"].items()) or "no replicas"
                click.echo(f"  {dep:16s} {d['status']:10s} {reps}")
        served = st.get("served") or {}
        if "version" in served:
            click.echo(f"model       {served['model']} v{served['version']} on {served['device']} "
                       f"({served['backend']} backend)")
        if st.get("endpoint"):
            click.echo(f"endpoint    {st['endpoint']['url']}")
    if not st["running"]:
        sys.exit(1)


@serve.command("down")
def serve_down():
    """Delete the app and stop the local Ray head `serve up` started."""
    from detailflow.platform.serving import deploy

    out = deploy.down(get_settings())
    click.echo(f"application {'deleted' if out['application_deleted'] else 'was not running'}; "
               f"ray head {'stopped' if out['ray_head_stopped'] else 'was not started by serve up'}")


def _endpoint_defaults(settings) -> tuple[str, str | None]:
    from detailflow.platform.serving.auth import first_key
    from detailflow.platform.serving.deploy import endpoint

    ep = endpoint(settings) or {}
    key = os.environ.get("DETAILFLOW_API_KEY")
    if not key and ep.get("api_keys_file"):
        key = first_key(ep["api_keys_file"])
    return ep.get("url", "http://127.0.0.1:8000"), key


def _strip_png(previews: list, size: int) -> bytes:
    """First image of every preview, upscaled (nearest) to `size` px, side by side."""
    import base64

    import numpy as np

    from detailflow.platform.serving.images import from_png, grid_png

    cells = []
    for grid_b64, canvas, many in previews:
        img = from_png(base64.b64decode(grid_b64))
        if many:  # a grid: the first cell sits after the 2 px border
            img = img[:, 2:2 + canvas, 2:2 + canvas]
        idx = np.arange(size) * canvas // size
        cells.append(img[:, idx][:, :, idx])
    return grid_png(np.stack(cells), columns=len(cells))


@click.command("generate")
@click.option("--class", "class_ids", type=int, multiple=True, required=True, help="Class id (repeatable).")
@click.option("--num", "num_images", type=int, default=1, show_default=True, help="Images per class.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Grid PNG to write.")
@click.option("--strip", type=click.Path(dir_okay=False), default=None, help="Coarse-to-fine strip PNG.")
@click.option("--cfg", "cfg_scale", type=float, default=1.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tokens", type=int, default=0, show_default=True, help="Prefix length t (0 = all).")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--columns", type=int, default=8, show_default=True, help="Images per grid row.")
@click.option("--url", default=None, help="Endpoint (default: what `serve up` wrote).")
@click.option("--api-key", default=None, help="Bearer key (default: $DETAILFLOW_API_KEY, serve up's keys).")
@click.option("--local", is_flag=True, help="Sample in this process with the registered pyfunc.")
@click.option("--model", default="tiny", show_default=True, help="--local: registered base name.")
@click.option("--version", "version", default=None, help="--local: version (default: the champion).")
def generate(class_ids, num_images, out, strip, cfg_scale, seed, tokens, temperature, top_k, top_p, columns,
             url, api_key, local, model, version):
    """Generate a grid of images from the endpoint (or locally with --local).

    More images than the endpoint takes in one request (GET /v1/models: max_images_per_request) are
    asked for in consecutive requests, request j with seed + j."""
    from tqdm import tqdm

    from detailflow.platform.serving.images import grid_png

    settings = get_settings()
    ids = [c for c in class_ids for _ in range(num_images)]
    if local:
        import mlflow
        import numpy as np

        uri = f"models:/{model}-generator/{version}" if version else f"models:/{model}-generator@champion"
        with tqdm(total=3, desc="local", unit="step") as bar:
            mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
            bar.set_postfix_str(f"loading {uri}")
            pyfunc = mlflow.pyfunc.load_model(uri)
            bar.update()
            bar.set_postfix_str("sampling")
            # as the endpoint's engine backend samples them: image i is image 0 of seed + i
            images = np.concatenate([pyfunc.predict(np.array([c], dtype=np.int64), params={
                "seed": seed + i, "cfg_scale": cfg_scale, "num_tokens": tokens, "temperature": temperature,
                "top_k": top_k, "top_p": top_p}) for i, c in enumerate(ids)])
            bar.update()
            Path(out).write_bytes(grid_png(images, columns))
            bar.update()
        click.echo(f"wrote {out} ({len(ids)} images from {uri}, seed {seed})")
        return
    from detailflow.platform.serving.client import ApiError, Client

    default_url, default_key = _endpoint_defaults(settings)
    client = Client(url or default_url, api_key or default_key)
    try:
        limit = int((client.models().get("data") or [{}])[0].get("max_images_per_request") or len(ids))
    except ApiError as exc:
        raise click.ClickException(str(exc)) from exc
    # more images than one request may hold: consecutive requests of <= limit, request j with seed + j
    # (so each part is reproducible on its own); previews (the strip) come from the first request
    parts = [ids[i:i + limit] for i in range(0, len(ids), limit)]
    previews, results = [], []
    bar = tqdm(total=None, desc="generate", unit="pass")

    def on_event(name, data):
        if name == "preview":
            bar.total = data["steps"] * len(parts)
            bar.update()
            bar.set_postfix_str(f"request {len(results) + 1}/{len(parts)} t={data['t']} {data['canvas']}px")
            if not results:
                previews.append((data["grid"], data["canvas"], len(parts[0]) > 1))
        elif name == "done" and bar.total:  # the last pass (the final image) sends no preview
            bar.update(max(0, bar.total // len(parts) * (len(results) + 1) - bar.n))

    try:
        for j, part in enumerate(parts):
            results.append(client.stream(part, 1, on_event=on_event, cfg_scale=cfg_scale, seed=seed + j,
                                         tokens=tokens, temperature=temperature, top_k=top_k, top_p=top_p))
    except ApiError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        bar.close()
    import numpy as np

    from detailflow.platform.serving.client import decode_images

    Path(out).write_bytes(grid_png(np.concatenate([decode_images(r) for r in results]), columns))
    first = results[0]
    seeds = f"{seed}..{seed + len(parts) - 1}" if len(parts) > 1 else f"{first['seed']}"
    msg = (f"wrote {out} ({len(ids)} images in {len(parts)} request(s), {first['model']} "
           f"v{first['model_version']}, seed {seeds})")
    if strip and previews:
        Path(strip).write_bytes(_strip_png(previews, first["canvas"]))
        msg += f"; strip {strip} ({len(previews)} passes)"
    click.echo(msg)
