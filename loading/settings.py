"""Settings read from the environment at call time (never cached at import).

| variable | default | meaning |
|---|---|---|
| LOCAL_MODELS_DIR | ./models | directory searched for models by id and by last path component |
| OFFLOAD_FOLDER | /tmp/transformers_offload | accepted for compatibility; modelfleet never offloads to disk |
| HF_HOME | ~/.cache/huggingface | Hugging Face home; the Hub cache is $HF_HOME/hub |
| HF_HUB_CACHE | $HF_HOME/hub | the Hub cache directory itself (wins over HF_HOME) |
| HF_ENDPOINT | https://huggingface.co | the Hub endpoint probed and downloaded from |
| MODELFLEET_HUB_PROBE_TIMEOUT_S | 1.5 | seconds the reachability probe waits before declaring the Hub unreachable |
| MODELFLEET_HUB_READ_TIMEOUT_S | 60 | seconds a Hub call may wait for an answer (huggingface_hub waits forever) |
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OFFLINE", "HF_FORCE_OFFLINE")


@dataclass(frozen=True)
class Settings:
    local_models_dir: Path
    offload_folder: Path
    hf_home: Path
    hf_hub_cache: Path
    hub_endpoint: str
    hub_probe_timeout_s: float
    warnings: tuple[str, ...] = ()
    hub_read_timeout_s: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        warnings = []
        if env.get("TRANSFORMERS_CACHE") and not env.get("HF_HOME"):
            message = (
                f"TRANSFORMERS_CACHE={env['TRANSFORMERS_CACHE']!r} is set without HF_HOME: it is deprecated "
                "and not read by huggingface_hub. Set HF_HOME instead (the cache is then $HF_HOME/hub)."
            )
            log.warning(message)
            warnings.append(message)
        hf_home = Path(env.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
        return cls(
            local_models_dir=Path(env.get("LOCAL_MODELS_DIR", "./models")).expanduser(),
            offload_folder=Path(env.get("OFFLOAD_FOLDER", "/tmp/transformers_offload")),
            hf_home=hf_home,
            hf_hub_cache=Path(env.get("HF_HUB_CACHE") or hf_home / "hub").expanduser(),
            hub_endpoint=env.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/"),
            hub_probe_timeout_s=seconds_from_env(env, "MODELFLEET_HUB_PROBE_TIMEOUT_S", "1.5"),
            hub_read_timeout_s=seconds_from_env(env, "MODELFLEET_HUB_READ_TIMEOUT_S", "60"),
            warnings=tuple(warnings),
        )


def seconds_from_env(env: Mapping[str, str], name: str, default: str) -> float:
    """A positive number of seconds from variable `name`; a ValueError naming the variable, its value and
    an example otherwise (float()'s own message names neither, and a replica's load failed with it)."""
    text = env.get(name, default)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={text!r} is not a positive number of seconds: set it to one, e.g. "
                         f"{name}={default}, or unset it for the default ({default} s)")
    return value
