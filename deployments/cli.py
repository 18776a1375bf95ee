"""The `modelfleet` console script: `check` talks to a running server (deployments/check.py); `doctor`
and `fetch` prepare a machine (loading/cli.py). Each is imported only when asked for, so `modelfleet
check` starts without torch."""

from __future__ import annotations

import sys

CHECK_USAGE = ("modelfleet check [--url URL] [--api-key KEY] [--json] [--timeout S]: "
               "every family of a running server answers a real request (see `modelfleet check --help`)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:
        from .check import main as check

        return check(argv[1:])
    from loading.cli import main as loading_main

    if argv[:1] in ([], ["-h"], ["--help"]):  # loading's help knows doctor and fetch: name check too
        try:
            return loading_main(argv)
        finally:
            print(f"\nalso: {CHECK_USAGE}", file=sys.stdout if argv else sys.stderr)
    return loading_main(argv)


if __name__ == "__main__":
    sys.exit(main())
