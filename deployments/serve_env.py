"""The environment the app is meant to run under: serve.env at the repository root.

Ray reads those settings once per process at import (controller, HAProxy manager, replicas), so they
belong to the process that starts Ray, not to serve_config.yaml. `make serve` includes the file;
the tests and benchmarks that start Ray use `serve_process_env` so they run what users run.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

SERVE_ENV = Path(__file__).resolve().parents[1] / "serve.env"

# HAProxy's files; Ray's defaults are fixed paths under /tmp/haproxy-serve, shared by every
# instance on the machine, and its admin socket is created mode 666.
HAPROXY_STATE_PATHS = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
}


def read_serve_env(path: Path = SERVE_ENV) -> dict[str, str]:
    """KEY=VALUE lines of `path` (comments and blank lines skipped), naming a malformed line."""
    settings: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        settings[key] = value
    return settings


# Ray puts each file in a subdirectory named by the node id (56 hex digits), and HAProxy refuses a
# unix socket path over 97 characters: the state directory must be short (a pytest tmp dir is not).
NODE_ID_CHARS = 56
MAX_SOCKET_PATH = 97


def haproxy_state_env(state_dir: Path) -> dict[str, str]:
    """HAProxy's config, sockets and server state under `state_dir`, created private (0700),
    so two instances on one machine never share them and no other user reaches the admin socket."""
    longest = len(str(state_dir)) + 1 + NODE_ID_CHARS + 1 + max(map(len, HAPROXY_STATE_PATHS.values()))
    if longest > MAX_SOCKET_PATH:
        raise ValueError(f"HAProxy state directory {str(state_dir)!r} is too long for its sockets "
                         f"({longest} > {MAX_SOCKET_PATH} characters with Ray's node-id subdirectory); "
                         f"use one of at most {len(str(state_dir)) - longest + MAX_SOCKET_PATH} characters")
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    return {key: str(state_dir / name) if name else str(state_dir) for key, name in HAPROXY_STATE_PATHS.items()}


def haproxy_shim() -> str:
    """The `modelfleet-haproxy` console script beside this interpreter (serve.env says why)."""
    path = Path(sys.executable).parent / "modelfleet-haproxy"
    found = str(path) if path.is_file() else shutil.which("modelfleet-haproxy")
    if found is None:
        raise FileNotFoundError(f"modelfleet-haproxy is not installed next to {sys.executable}: run `make install` "
                                "(or `pip install -e .`)")
    return found


def serve_process_env(state_dir: Path) -> dict[str, str]:
    """serve.env for one Ray instance of a test or benchmark: HAProxy's state under `state_dir`, and
    free ports for its stats page and Prometheus exporter instead of Ray's fixed 8404 and 9101 (a
    second instance on the machine would fail to bind them)."""
    return {**read_serve_env(), **haproxy_state_env(state_dir), "RAY_SERVE_HAPROXY_BINARY_PATH": haproxy_shim(),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
