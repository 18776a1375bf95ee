"""Helpers shared by the loading/ tests (a plain module: `conftest` names clash across test dirs)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

# Only loopback may be targeted; port 9 (discard) is closed here, so a connect is refused at once.
CLOSED_LOCAL_ENDPOINT = "http://127.0.0.1:9"

TIMINGS: dict[str, float] = {}


def record(name: str, seconds: float) -> None:
    """Keep a measured time; printed at the end of the session (visible with -s)."""
    TIMINGS[name] = seconds
    print(f"\n[timing] {name}: {seconds:.3f} s")


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def set_adapter_base(adapter_dir: Path, base: str) -> None:
    """Rewrite an adapter's base_model_name_or_path, as a fine-tune made elsewhere would carry it."""
    path = adapter_dir / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = base
    path.write_text(json.dumps(data, indent=2))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        return False
