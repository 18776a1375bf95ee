"""The environment the app is meant to run under: serve.env at the repository root.

Ray reads those settings once per process at import (controller, HAProxy manager, replicas), so they
belong to the process that starts Ray, not to serve_config.yaml. `make serve` includes the file;
the tests and benchmarks that start Ray use `serve_process_env` so they run what users run.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

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
    ports of its own (instance_ports_env) instead of Ray's fixed ones."""
    return {**read_serve_env(), **haproxy_state_env(state_dir), "RAY_SERVE_HAPROXY_BINARY_PATH": haproxy_shim(),
            **instance_ports_env()}


# Ray's direct-ingress ports: each instance allocates from the same 30000 (HTTP) and 40000 (gRPC) up,
# and binds with SO_REUSEPORT. A second instance on the machine then never served its own traffic:
# its HAProxy sent every request to the first instance's app (seen through the fallback proxy port 8500,
# also fixed). A block of this many ports per instance is room for its ingress replicas on the node.
INGRESS_PORT_BLOCK = 32
# Below Linux's ephemeral ports (32768-60999), above Ray's worker ports (10002-19999), apart from Ray's defaults.
PORT_BLOCK_RANGE = (20000, 27999)


def instance_ports_env(rng: random.Random | None = None) -> dict[str, str]:
    """Ports no other instance on the machine holds: HAProxy's stats page and Prometheus exporter (Ray:
    8404, 9101), the fallback proxy actor's HTTP and gRPC ports (8500, 9500), and a block each for the
    ingress replicas' own HTTP and gRPC servers (30000 and 40000 up).

    All come from PORT_BLOCK_RANGE, below the ephemeral ports: a port the kernel had just handed out (bind
    to port 0) was free when chosen, but any outgoing connection could take it before HAProxy bound it, and
    HAProxy then exited with "cannot bind socket" for its stats page (seen once in CI on 51053)."""
    rng = rng or random.Random()
    http, grpc, single = _distinct_blocks(3, INGRESS_PORT_BLOCK, rng)
    return {"RAY_SERVE_HAPROXY_STATS_PORT": str(single), "RAY_SERVE_HAPROXY_METRICS_PORT": str(single + 1),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(single + 2),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(single + 3),
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http + INGRESS_PORT_BLOCK - 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + INGRESS_PORT_BLOCK - 1)}


def _distinct_blocks(count: int, size: int, rng: random.Random) -> list[int]:
    """`count` different free blocks of `size` ports (blocks are aligned to `size`, so they never overlap)."""
    starts: list[int] = []
    while len(starts) < count:
        start = _free_block(size, rng)
        if start not in starts:
            starts.append(start)
    return starts


def _free_block(size: int, rng: random.Random, tries: int = 200,
                span: tuple[int, int] = PORT_BLOCK_RANGE) -> int:
    """The first port of `size` consecutive ports in `span` that nothing on the machine has bound, at random."""
    low, high = span
    for _ in range(tries):
        start = rng.randrange(low, high - size + 1, size) if high - low + 1 >= size else low
        if all(_bindable(port) for port in range(start, start + size)):
            return start
    raise RuntimeError(f"no {size} free consecutive ports in {low}-{high} after {tries} tries")


def _bindable(port: int) -> bool:
    """Without SO_REUSEPORT a bind fails on a port another socket holds on any address, theirs with it too
    (and on one a stopped instance's connections left in TIME_WAIT: such a block is passed over too)."""
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


SINGLE_PORT_RANGE = (28000, 29999)  # as PORT_BLOCK_RANGE, apart from its blocks


def unclaimed_port(rng: random.Random | None = None, tries: int = 200) -> int:
    """A port for a server to bind a moment later (a test's HTTP port, Ray's metrics exporter): one the
    kernel never hands out as an outgoing connection's port, unlike a bind to port 0."""
    return _free_block(1, rng or random.Random(), tries, SINGLE_PORT_RANGE)


# The first port Ray takes for each, unless the environment moves it (Ray's defaults).
RAY_PORTS = {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": 30000, "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": 40000,
             "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500, "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 9500}


def port_setting(env: Mapping[str, str], key: str, default: int) -> int:
    """The port `env` sets in `key` (else Ray's default), or a ValueError naming the variable."""
    value = env.get(key)
    if value is None:
        return default
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port < 65536:
        raise ValueError(f"{key}={value!r} is not a port number: set it to a free port (1-65535), or unset it for "
                         f"Ray's {default}")
    return port


def held_ports(env: Mapping[str, str]) -> list[tuple[str, int]]:
    """The ports an instance started under `env` would take that something on the machine holds already."""
    ports = [(key, port_setting(env, key, default)) for key, default in RAY_PORTS.items()]
    listening = _listening_ports()
    return [(key, port) for key, port in ports if (port in listening if listening is not None else not _bindable(port))]


def _listening_ports() -> set[int] | None:
    """TCP ports something listens on (/proc/net/tcp and tcp6, state 0A), or None where /proc has no such
    table. A listener, not a bind probe: a stopped instance's connections in TIME_WAIT refuse a probe's
    bind for a minute, but not Ray's (SO_REUSEPORT)."""
    ports: set[int] = set()
    found = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports if found else None


#: Ray Serve's HTTP port where a config's http_options names none
RAY_HTTP_PORT = 8000


def http_port(config: Path) -> int | None:
    """The port `serve run <config>` answers HTTP on: its http_options.port, else Ray's 8000; None where the file
    says no valid one (`modelfleet validate` and `serve run` say why)."""
    import yaml

    try:
        data = yaml.safe_load(config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    options = (data.get("http_options") if isinstance(data, dict) else None) or {}
    port = options.get("port", RAY_HTTP_PORT) if isinstance(options, dict) else None
    return port if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 else None


def check_ports(env: Mapping[str, str], out: TextIO = sys.stderr, config: Path | None = None) -> int:
    """0 if the instance `env` would start can have Ray's ports, and `config`'s http_options.port (where given);
    else 1, naming them and the fix (2: a port variable of `env` is not a port number)."""
    try:
        held = held_ports(env)
    except ValueError as exc:
        print(f"serve: {exc}", file=out)
        return 2
    port = http_port(config) if config is not None else None
    if port is not None and port in (_listening_ports() or set()):
        # HAProxy would fail to bind it only after Ray has started: a Ray traceback some 15 s later, ending in
        # "cannot bind socket (Address already in use)", and serve run exits
        print(f"serve: port {port} (http_options.port in {config}) is held already by another process (`ss -ltnp "
              f"'sport = :{port}'` names it): stop it, or set http_options.port in {config} to a free port",
              file=out)
        return 1
    if not held:
        return 0
    names = ", ".join(f"{port} ({key})" for key, port in held)
    settings = " ".join(f"{key}={value}" for key, value in instance_ports_env().items())
    print(f"serve: port {names} is held already, most likely by another Ray Serve instance on this machine. "
          "Ray binds its ingress ports with SO_REUSEPORT, so this instance's requests would be answered by that "
          "instance's app. Stop it, or give this one ports of its own (and its own http_options.port in "
          f"serve_config.yaml):\n  make serve HAPROXY_STATE=/tmp/modelfleet-haproxy-{os.getpid()} {settings}",
          file=out)
    return 1


if __name__ == "__main__":  # `make serve` runs `python -m deployments.serve_env check-ports CONFIG` before Ray starts
    if sys.argv[1:2] != ["check-ports"] or len(sys.argv) > 3:
        sys.exit("usage: python -m deployments.serve_env check-ports [SERVE_CONFIG]")
    sys.exit(check_ports(os.environ, config=Path(sys.argv[2]) if len(sys.argv) > 2 else None))
