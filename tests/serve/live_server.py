"""`serve run` of a config file, in its own process and its own Ray cluster, as users start it.

The config is the shipped serve_config.yaml with a free port, one pinned replica per family (so
that "no replica was replaced" is one pid per family to compare) and optional overrides.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from deployments.serve_env import serve_process_env

from serve_testutil import REPO, free_port, short_state_dir


class LiveServer:
    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url, self.process, self.log = url, process, log

    def health(self, **headers) -> dict:
        return requests.get(self.url + "/health", headers=headers, timeout=30).json()

    def replica_pids(self, **headers) -> dict[str, int]:
        """family -> pid of its replica, and the ingress's, from /health."""
        body = self.health(**headers)
        pids = {info["family"]: info["replica"]["pid"] for info in body["models"].values() if "replica" in info}
        pids["ingress"] = body["ingress"]["pid"]
        return pids

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def live_config(tmp: Path, port: int, args_overrides: dict | None = None) -> Path:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    for options in args["families"].values():
        options["autoscaling"] = None  # one replica per family: its pid must never change
    for key, value in copy.deepcopy(args_overrides or {}).items():
        args[key] = value
    path = tmp / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(tmp: Path, models_dir: Path, args_overrides: dict | None = None, env: dict | None = None,
          health_headers: dict | None = None, timeout_s: float = 240) -> LiveServer:
    port = free_port()
    config = live_config(tmp, port, args_overrides)
    log = tmp / "serve_run.log"
    environment = {**os.environ, "RAY_ADDRESS": "local",  # a cluster of its own, never the test session's
                   "LOCAL_MODELS_DIR": str(models_dir), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "PYTHONPATH": str(REPO),
                   # serve.env as `make serve` uses it, with HAProxy's files and ports of its own
                   **serve_process_env(short_state_dir()),
                   **(env or {})}
    process = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(config)], cwd=REPO,
                               env=environment, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve run exited with {process.returncode}:\n{server.tail()}")
        try:
            if requests.get(server.url + "/health", timeout=5, headers=health_headers).json()["status"] == "ok":
                try:
                    assert_answers_itself(server, health_headers)
                except AssertionError:
                    stop(server)  # the caller gets no server to stop: this one must not outlive the test
                    raise
                return server
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(1)
    stop(server)
    raise AssertionError(f"serve run never became healthy in {timeout_s} s:\n{server.tail()}")


def assert_answers_itself(server: LiveServer, headers: dict | None = None) -> None:
    """The ingress answering on the server's port is one of its own processes, not another instance's
    on the machine (before each instance had ports of its own, serve_env.instance_ports_env, a second
    instance's HAProxy sent every request to the first one's app)."""
    for _ in range(10):  # new connections: SO_REUSEPORT spreads them over every socket on a port
        pid = server.health(**{"Connection": "close", **(headers or {})})["ingress"]["pid"]
        stat = Path(f"/proc/{pid}/stat").read_text()
        session = int(stat[stat.rindex(")") + 2:].split()[3])
        assert session == server.process.pid, (
            f"{server.url} is answered by ingress pid {pid} of another Ray instance (session {session}, "
            f"not this serve run's {server.process.pid})")


def stop(server: LiveServer) -> None:
    """Ctrl-C as a user would, then make sure the whole process group (Ray included) is gone."""
    try:
        os.killpg(server.process.pid, signal.SIGINT)
        server.process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
