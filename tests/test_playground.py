"""The playground page at / in headless Chromium (Debian's `chromium`), driven over the DevTools protocol.

A real Serve app with a registered smoke model; the page streams from /v1/generate/stream and must show
the image refining pass by pass. Screenshots: out/test-artifacts/playground-midway.png (during the
stream) and out/test-artifacts/playground.png (done), or under $DETAILFLOW_TEST_ARTIFACTS.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from serving_models import register_smoke

from detailflow.platform.serving import testing as st

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("DETAILFLOW_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "out" /
                                "test-artifacts"))
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")]


class DevTools:
    """Just enough of the Chrome DevTools protocol: call(method, **params) -> result."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 2**20, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, timeout: float = 30.0, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 60.0):
        deadline = time.time() + timeout
        while not (value := self.js(expression)):
            assert time.time() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value

    def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        return png


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "chromium-profile"
    log = open(tmp_path / "chromium.log", "wb")
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                             "--disable-background-networking", "--disable-component-update",
                             "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
                             "--window-size=1100,800", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.time() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None, (tmp_path / "chromium.log").read_text()[-2000:]
            assert time.time() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                 if t["type"] == "page"]
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        tools.call("Page.enable")
        tools.call("Runtime.enable")
        tools.call("Emulation.setDeviceMetricsOverride", width=1100, height=800, deviceScaleFactor=1,
                   mobile=False)
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def page_app(ray_session, services, storage, tmp_path_factory):

    from detailflow.platform.serving.config import parse_serve_config
    from detailflow.platform.serving.deploy import delete_app, deploy_app

    name = st.unique_name("page")
    version = register_smoke(services, storage, name, seed=3, champion=True)
    keys = tmp_path_factory.mktemp("page-keys") / "api-keys"
    key = "dfk_playground_test_key_0123"
    keys.write_text(key + "\n")
    cfg = st.test_serve_config(name, str(keys), app="dfpage", route="/", port=st.free_port(),
                               simulated_pass_s=0.25, max_replicas=1)
    deploy_app(parse_serve_config(cfg))
    try:
        yield f"http://127.0.0.1:{st.http_port()}", key, name, version
    finally:
        delete_app("dfpage")


def test_playground_refines_group_by_group_in_headless_chromium(page_app, browser):
    from detailflow.platform.serving.images import from_png

    url, key, name, version = page_app
    browser.call("Page.navigate", url=f"{url}/#key={key}")
    browser.wait("document.readyState === 'complete' && document.body.dataset.model")
    assert browser.js("location.hash") == "", "the key must leave the address bar"
    assert f"{name}-generator v{version}" in browser.js("document.getElementById('model').textContent")
    browser.js("""(() => { const s = (id, v) => { document.getElementById(id).value = v; };
        s('class', 3); s('num', 4); s('cfg', 2); s('seed', 11);
        document.getElementById('cfg').dispatchEvent(new Event('input'));
        document.getElementById('go').click(); return true; })()""")
    browser.wait("Number(document.body.dataset.previews) >= 3", timeout=60)
    midway = browser.screenshot(ARTIFACTS / "playground-midway.png")
    browser.wait("document.body.dataset.state !== 'running'", timeout=60)
    status = browser.js("document.getElementById('status').textContent")
    assert browser.js("document.body.dataset.state") == "done", status
    shot = browser.screenshot(ARTIFACTS / "playground.png")
    events = browser.js("window.dfEvents")
    previews = [e for e in events if e["event"] == "preview"]
    assert [e["event"] for e in events][-1] == "done" and len(previews) == 6
    canvases = [e["canvas"] for e in previews]
    assert canvases == sorted(canvases) and canvases[0] < canvases[-1]
    assert browser.js("document.querySelectorAll('#strip figure').length") == 7  # 6 previews + the final
    # what the page shows at the end is what the API returns for the same request
    shown = browser.js("document.getElementById('current').src").split(",", 1)[1]
    api = requests.post(f"{url}/v1/generate", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                        json={"class_ids": [3], "num_images": 4, "cfg_scale": 2, "seed": 11, "tokens": 0,
                              "temperature": 1, "top_k": 0, "format": "grid"})
    assert base64.b64decode(shown) == api.content
    for png in (midway, shot):
        img = from_png(png)
        assert img.shape == (3, 800, 1100) and img.std() > 5  # a rendered page, not a blank
    print(f"screenshots: {ARTIFACTS / 'playground-midway.png'}, {ARTIFACTS / 'playground.png'}")


def test_playground_shows_api_errors(page_app, browser):
    url, key, _, _ = page_app
    browser.call("Page.navigate", url=f"{url}/#key=dfk_wrong")
    browser.wait("document.readyState === 'complete'")
    browser.wait("document.getElementById('status').textContent.length > 0", timeout=30)
    assert "unknown API key" in browser.js("document.getElementById('status').textContent")
