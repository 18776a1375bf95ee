"""One Ray instance and one Serve HTTP proxy per test session; one application per test module.

Everything is real: a local Ray cluster, Serve on a loopback port, the tiny real-architecture
models built into a temporary LOCAL_MODELS_DIR, the demo's real chat model (SmolLM2-135M from a
GGUF file in a pip package) converted once, and the official `openai` client.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from deployments.serve_env import serve_process_env

from serve_testutil import DEMO_KEY, demo_args, free_port, run_app, short_state_dir

# Must be set before Ray starts: token auth breaks local clients, and workers inherit these.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Where the shipped config's GGUF models are converted for the tests: outside the session's tmp dir,
# so that only the first session on a machine pays for the conversion (~20-60 s on 2 cores).
METRICS_PORT = free_port()

GGUF_CACHE = Path(os.environ.get("MODELFLEET_TEST_GGUF_CACHE",
                                 Path.home() / ".cache" / "modelfleet" / "test-converted-gguf"))


def link_converted_gguf_models(models_dir: Path) -> None:
    """Every GGUF source of serve_config.yaml converted (in this process, before Ray starts, under the
    conversion's file lock) into GGUF_CACHE, and linked into `models_dir`, where replicas find the
    conversion current and load it in about a second instead of each test app converting again."""
    from loading.gguf import is_gguf_source, resolve_gguf
    from loading.settings import Settings

    settings = Settings.from_env({**os.environ, "LOCAL_MODELS_DIR": str(GGUF_CACHE)})
    for model in demo_args()["models"]:
        if is_gguf_source(model["source"]):
            converted = resolve_gguf(model["source"], settings).path
            (models_dir / converted.name).symlink_to(converted, target_is_directory=True)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models")
    link_converted_gguf_models(path)
    return path


@pytest.fixture(scope="session")
def serve_url(models_dir, tmp_path_factory):
    import ray
    from ray import serve

    port = free_port()
    # the environment `make serve` runs under (serve.env: HAProxy, user code on the replicas' loops),
    # with HAProxy's files and ports of this session's own; Ray's processes inherit it at init
    os.environ.update(serve_process_env(short_state_dir()))
    # address="local": always a fresh cluster of our own, even if `ray start` left one running;
    # its metrics agent on a known port, which tests/serve/test_metrics.py scrapes as Prometheus would
    # 8 logical CPUs: the two session-wide demo apps and one module's app fit side by side (replicas
    # reserve 0.25 each; torch threads follow the machine's cores, not this number)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=METRICS_PORT,
             runtime_env={"env_vars": {"LOCAL_MODELS_DIR": str(models_dir)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(serve_url) -> str:
    """The Prometheus endpoint of the session cluster's metrics agent."""
    return f"http://127.0.0.1:{METRICS_PORT}/metrics"


@pytest.fixture(scope="session")
def demo_app(serve_url, models_dir):
    """The shipped demo config, every model ready: one app for every module that uses it (a start costs
    30-50 s on 2 cores), so tests compare counters before and after rather than from zero."""
    from ray import serve

    args = demo_args()
    args["local_models_dir"] = str(models_dir)
    # One LLM replica, so that /health's batching counters see every request (autoscaling is
    # tested on its own in tests/cluster).
    args["families"]["llm"]["autoscaling"] = None
    app = run_app(serve_url, "modelfleet", args, session_app=True)
    app.wait_for(lambda h: h["status"] == "ok", timeout=120)
    yield app
    serve.delete("modelfleet")


@pytest.fixture(scope="session")
def chat_app(serve_url, models_dir):
    """The demo's chat models alone (LLM, VLM, their adapters) under /chat: one app for the chat-feature
    modules (test_chat_surface, test_structured, test_tools). Its own name: deploying under the demo's
    name replaced the session's demo app, and every later module using it got 404s."""
    from ray import serve

    from chat_apps import start_chat_app

    yield start_chat_app(serve_url, models_dir, name="chat")
    serve.delete("chat")


@pytest.fixture(scope="session")
def keyed_demo_app(serve_url, models_dir, tmp_path_factory):
    """The shipped demo config with API keys required (DEMO_KEY), under /playground: for the modules that
    drive the whole app as a user with a key does (modelfleet check, the playground page)."""
    import requests
    from ray import serve

    key_file = tmp_path_factory.mktemp("demo-auth") / "keys"
    key_file.write_text(DEMO_KEY + "\n")
    args = demo_args()
    args["local_models_dir"] = str(models_dir)
    args["auth"] = {"api_keys_file": str(key_file), "required": True}
    for options in args["families"].values():
        options["autoscaling"] = None
    app = run_app(serve_url, "playground", args, session_app=True)
    deadline = time.monotonic() + 120
    headers = {"Authorization": f"Bearer {DEMO_KEY}"}
    while (health := requests.get(app.url + "/health", headers=headers, timeout=10).json())["status"] != "ok":
        assert time.monotonic() < deadline, f"the app never became healthy: {health}"
        time.sleep(0.5)
    yield app
    serve.delete("playground")
