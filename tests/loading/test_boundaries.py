"""The layering rule, enforced: `loading/` knows nothing of Ray or HTTP serving, and
`deployments/` knows nothing of how weights are found (it goes through `load_model`/`ModelHandle`)."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVING = {"ray", "fastapi", "starlette", "uvicorn", "aiohttp"}
# How weights are found: the Hub client and loading's resolution internals.
WEIGHT_FINDING = {"huggingface_hub", "loading.resolve", "loading.adapters", "loading.offline", "loading.tiny"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def offenders(package: str, banned: set[str]) -> dict[str, list[str]]:
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        bad = sorted(m for m in imported_modules(path) if any(m == b or m.startswith(b + ".") for b in banned))
        if bad:
            found[str(path.relative_to(REPO))] = bad
    return found


def test_loading_source_imports_no_serving_library():
    assert offenders("loading", SERVING) == {}


def test_deployments_source_does_not_find_weights():
    assert offenders("deployments", WEIGHT_FINDING) == {}


def test_importing_every_loading_module_pulls_in_no_serving_library():
    # Transitively too: a dependency of a dependency must not drag Ray or a web server in.
    modules = ["loading"] + [m.name for m in pkgutil.walk_packages([str(REPO / "loading")], prefix="loading.")]
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(SERVING)!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_in_process_benchmark_and_gpu_checks_pull_in_no_serving_library():
    # The lent GPU machines have no Ray, FastAPI or Starlette (bench/GPU.md): the decode loop, the chat
    # encoding the replicas use, and the benchmark that drives them must import without them.
    code = (
        "import json, sys\n"
        "import bench.continuous, deployments.chat_encoding, deployments.decode_loop\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(SERVING)!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
