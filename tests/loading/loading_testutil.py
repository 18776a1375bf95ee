"""Helpers shared by the loading/ tests (a plain module: `conftest` names clash across test dirs)."""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

# Only loopback may be targeted; port 9 (discard) is closed here, so a connect is refused at once.
CLOSED_LOCAL_ENDPOINT = "http://127.0.0.1:9"

# What "fails fast" / "without Hub retries" means in these tests: 10 x the Hub probe's default
# timeout (1.5 s). Measured here: < 0.05 s. The failures guarded against take 23 s (local_files_only
# still probing for adapter_config.json), 46.5 s (a model) and 141 s (a tokenizer) of huggingface_hub
# retries, so the bound catches them with room for a loaded 2-core machine.
DEFAULT_PROBE_TIMEOUT_S = 1.5
FAIL_FAST_S = 10 * DEFAULT_PROBE_TIMEOUT_S


@contextmanager
def unanswering_endpoint() -> Iterator[str]:
    """An http:// endpoint on loopback that never answers a TCP connect: not refused, just silent.

    A listening socket that never accepts, its accept queue filled: Linux then drops further SYNs
    (no RST), so a connect hangs until its own timeout, as towards a firewalled or blackholed Hub.
    Checked before it is handed out, so a test cannot silently turn into a refused-port test.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(64):  # fill the accept queue until a connect is no longer answered
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(filler)
            filler.settimeout(0.2)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            raise RuntimeError("could not fill the listener's accept queue")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.2)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                pass
            else:
                raise RuntimeError(f"127.0.0.1:{port} answered a connect: not an unanswering endpoint")
        yield f"http://127.0.0.1:{port}"
    finally:
        for sock in fillers:
            with suppress(OSError):
                sock.close()
        listener.close()

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
