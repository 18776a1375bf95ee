"""Settings read from the environment at call time (never cached at import).

| variable | default | meaning |
|---|---|---|
| LOCAL_MODELS_DIR | ./models | directory searched for models by id and by last path component |
| OFFLOAD_FOLDER | /tmp/transformers_offload | accepted for compatibility; modelfleet never offloads to disk |
| HF_HOME | $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface | Hugging Face home; the Hub cache is $HF_HOME/hub |
| HF_HUB_CACHE | $HUGGINGFACE_HUB_CACHE (legacy), else $HF_HOME/hub | the Hub cache itself (wins over HF_HOME) |
| HF_ENDPOINT | https://huggingface.co | the Hub endpoint probed and downloaded from |
| MODELFLEET_HUB_PROBE_TIMEOUT_S | 1.5 | seconds the probe (name lookup + connect) may take before the Hub is offline |
| MODELFLEET_HUB_READ_TIMEOUT_S | 60 | seconds a Hub call may wait for an answer (huggingface_hub waits forever) |

HF_HOME and HF_HUB_CACHE are found as huggingface_hub finds them (its constants.py), so that a model
huggingface-cli or transformers cached is found here: same precedence, ~ and $VARS expanded.
"""

from __future__ import annotations

import logging
import math
import os
import re
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
        hf_home, hf_hub_cache = hf_cache_paths(env)
        return cls(
            local_models_dir=Path(env.get("LOCAL_MODELS_DIR", "./models")).expanduser(),
            offload_folder=Path(env.get("OFFLOAD_FOLDER", "/tmp/transformers_offload")),
            hf_home=Path(hf_home),
            hf_hub_cache=Path(hf_hub_cache),
            hub_endpoint=env.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/"),
            hub_probe_timeout_s=seconds_from_env(env, "MODELFLEET_HUB_PROBE_TIMEOUT_S", "1.5"),
            hub_read_timeout_s=seconds_from_env(env, "MODELFLEET_HUB_READ_TIMEOUT_S", "60"),
            warnings=tuple(warnings),
        )


def hf_cache_paths(env: Mapping[str, str]) -> tuple[str, str]:
    """(HF_HOME, the Hub cache) as huggingface_hub computes them at its import (huggingface_hub/constants.py),
    from `env` instead of os.environ: HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface;
    the cache HF_HUB_CACHE, else the legacy HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub; each with ~ and then
    $VARS expanded. A variable set to "" counts as set, as with os.getenv there. Computed otherwise, a model
    that huggingface-cli or transformers cached was "not found" offline (and downloaded again online)."""
    default_home = os.path.join(_expanduser("~", env), ".cache")
    hf_home = _expandvars(_expanduser(env.get("HF_HOME", os.path.join(env.get("XDG_CACHE_HOME", default_home),
                                                                     "huggingface")), env), env)
    legacy = env.get("HUGGINGFACE_HUB_CACHE", os.path.join(hf_home, "hub"))
    return hf_home, _expandvars(_expanduser(env.get("HF_HUB_CACHE", legacy), env), env)


def _expanduser(path: str, env: Mapping[str, str]) -> str:
    """os.path.expanduser with `env` for os.environ: ~ is $HOME where `env` sets it, else the password
    database's home; ~user is always the password database's (os.path.expanduser reads no variable for it)."""
    if path != "~" and not path.startswith("~/"):
        return os.path.expanduser(path)  # ~user, or no ~ at all
    home = env["HOME"] if "HOME" in env else _password_home()
    return (home.rstrip("/") + path[1:]) or "/"


def _password_home() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError):  # no password database entry: what Path.home() says
        return str(Path.home())


_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})", re.ASCII)


def _expandvars(path: str, env: Mapping[str, str]) -> str:
    """os.path.expandvars (POSIX) with `env` for os.environ: $name and ${name} replaced by their values,
    unset ones left as written, values not expanded again."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("{") and name.endswith("}"):
            name = name[1:-1]
        return env.get(name, match.group(0)) if name else match.group(0)

    return _VARIABLE.sub(value, path) if "$" in path else path


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
