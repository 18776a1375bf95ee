"""Write serve_config.gpu.yaml into cluster/rayservice.yaml's `spec.serveConfigV2`, so they never drift.

    python -m cluster.render           # rewrite the block in place
    python -m cluster.render --check   # exit 1 if the manifest differs from what it would write

The GPU config is the one that belongs on a GPU cluster (`device: gpu`, real Hub models, HTTP on
0.0.0.0:8000 where KubeRay's serve Service points); serve_config.yaml is the CPU demo. The file is
embedded verbatim, comments included, as the YAML block scalar KubeRay expects.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serve_config.gpu.yaml"
MANIFEST = REPO / "cluster" / "rayservice.yaml"
KEY = "  serveConfigV2: |"  # under `spec:`, two spaces in
INDENT = " " * 4


def render(manifest: str, serve_config: str) -> str:
    """`manifest` with the block under `serveConfigV2: |` replaced by `serve_config`, indented."""
    lines = manifest.splitlines()
    try:
        start = lines.index(KEY)
    except ValueError:
        raise SystemExit(f"{MANIFEST}: no line {KEY!r} to render into") from None
    end = start + 1
    # the block runs until the first non-blank line indented less than the block
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(INDENT)):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines after the block stay outside it
        end -= 1
    block = [INDENT + line if line.strip() else "" for line in serve_config.rstrip("\n").splitlines()]
    return "\n".join(lines[: start + 1] + block + lines[end:]) + "\n"


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on drift instead of writing")
    args = parser.parse_args(argv)
    current = MANIFEST.read_text()
    wanted = render(current, SERVE_CONFIG.read_text())
    if current == wanted:
        print(f"{_shown(MANIFEST)}: serveConfigV2 matches {SERVE_CONFIG.name}")
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), wanted.splitlines(True),
                                                   _shown(MANIFEST), "rendered"))
        print(f"\n{_shown(MANIFEST)} drifted from {SERVE_CONFIG.name}: run `python -m cluster.render`",
              file=sys.stderr)
        return 1
    MANIFEST.write_text(wanted)
    print(f"{_shown(MANIFEST)}: serveConfigV2 rewritten from {SERVE_CONFIG.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
