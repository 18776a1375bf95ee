"""Helpers for the Serve tests: deploy an app, talk to it, wait for its health."""

from __future__ import annotations

import atexit
import base64
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import soundfile as sf
import yaml
from PIL import Image

from deployments.serve_env import unclaimed_port

REPO = Path(__file__).resolve().parents[2]
DEMO_KEY = "demo-key-0123456789abcdef"  # the API key of conftest's keyed_demo_app
SESSION_APPS = ("modelfleet", "playground", "chat")  # names of conftest's session-wide apps


def free_port() -> int:
    """A free port outside the ephemeral range (serve_env.unclaimed_port: HAProxy once failed to bind a
    port an outgoing connection had taken since it was chosen)."""
    return unclaimed_port()


def short_state_dir() -> Path:
    """A private directory for one Ray instance's HAProxy files, removed when the tests end: under
    /tmp, as HAProxy's socket paths must stay under 97 characters (a pytest tmp dir is too long)."""
    path = Path(tempfile.mkdtemp(prefix="mf-hap-", dir="/tmp"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def demo_args() -> dict:
    """The `args:` of the shipped serve_config.yaml: the tests serve exactly what users run."""
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    return config["applications"][0]["args"]


class App:
    """A running Serve application and the ways tests talk to it."""

    def __init__(self, url: str, name: str):
        self.url, self.name = url, name

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=60, max_retries=0)

    def get(self, path: str, **kw):
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, **kw):
        return requests.post(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def wait_for(self, predicate, timeout: float = 60.0, interval: float = 0.25):
        """Poll /health until predicate(health_json) is true; return that JSON."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.get("/health", timeout=10).json()
                if predicate(last):
                    return last
            except (requests.RequestException, ValueError):
                pass
            time.sleep(interval)
        raise AssertionError(f"health never matched within {timeout} s; last: {last}")


def run_app(serve_url: str, name: str, args: dict, *, blocking: bool = True, session_app: bool = False) -> App:
    """Deploy the builder's application. Non-blocking for apps whose replicas may never be ready
    (serve.run waits for RUNNING): then it deploys in a thread and returns once HTTP answers."""
    from ray import serve

    from deployments.builder import build_app

    # conftest's session-wide apps own these names: a module deploying under one of them would replace
    # that app for every later module, and delete it at its teardown (CI: 21 failures of 404)
    assert session_app or name not in SESSION_APPS, \
        f"app name {name!r} belongs to a session-wide fixture in conftest: use that fixture or another name"
    app = build_app(args)
    if blocking:
        serve.run(app, name=name, route_prefix=f"/{name}" if name != "modelfleet" else "/")
    else:
        # serve.run waits for RUNNING; its non-waiting twin deploys and returns (no thread left waiting
        # on a controller that the module's teardown kills)
        from ray.serve.api import _run

        _run(app, _blocking=False, name=name, route_prefix=f"/{name}")
    url = serve_url if name == "modelfleet" else f"{serve_url}/{name}"
    handle = App(url, name)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return handle
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise AssertionError(f"app {name} never answered /health")


def wav_bytes(seconds: float, rate: int = 16000, channels: int = 1, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    data = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    buf = io.BytesIO()
    sf.write(buf, data.astype(np.float32), rate, format=fmt)
    return buf.getvalue()


def png_data_uri(color=(200, 30, 30), size=(48, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
