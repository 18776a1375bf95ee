"""Is the Hub usable right now? Decided in seconds, not after huggingface_hub's retries.

huggingface_hub reads its offline flag once, at import, and on an unreachable network retries
with backoff (~47 s for a model, ~141 s for a tokenizer). We read the flags at call time and
probe the endpoint with one TCP connect bounded by a short timeout.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from .settings import OFFLINE_VARIABLES, Settings

_TRUTHY = {"1", "true", "yes", "on"}
_PROBE_TTL_S = 30.0
_probe_cache: dict[str, tuple[float, HubStatus]] = {}


@dataclass(frozen=True)
class HubStatus:
    online: bool
    reason: str


def reset_probe_cache() -> None:
    """Forget cached reachability probes (the next hub_status() probes again)."""
    _probe_cache.clear()


def declared_offline(environ: dict[str, str] | None = None) -> str | None:
    """The variable that declares offline mode (e.g. 'HF_HUB_OFFLINE=1'), or None."""
    env = os.environ if environ is None else environ
    for name in OFFLINE_VARIABLES:
        if env.get(name, "").strip().lower() in _TRUTHY:
            return f"{name}={env[name]}"
    return None


def _probe_target(endpoint: str, environ: dict[str, str]) -> tuple[str, int]:
    # Behind an HTTPS proxy, the proxy is what must be reachable.
    proxy = environ.get("HTTPS_PROXY") or environ.get("https_proxy")
    url = urlparse(proxy if proxy else endpoint)
    default_port = 443 if url.scheme == "https" else 80
    return url.hostname or "huggingface.co", url.port or default_port


def hub_status(settings: Settings, environ: dict[str, str] | None = None, *, use_cache: bool = True) -> HubStatus:
    """Offline if declared; otherwise one TCP connect to the endpoint (cached for 30 s)."""
    env = dict(os.environ if environ is None else environ)
    declared = declared_offline(env)
    if declared:
        return HubStatus(False, f"offline mode declared by {declared}")
    host, port = _probe_target(settings.hub_endpoint, env)
    key = f"{host}:{port}"
    now = time.monotonic()
    if use_cache and key in _probe_cache and now - _probe_cache[key][0] < _PROBE_TTL_S:
        return _probe_cache[key][1]
    try:
        with socket.create_connection((host, port), timeout=settings.hub_probe_timeout_s):
            status = HubStatus(True, f"{key} reachable")
    except OSError as exc:
        status = HubStatus(
            False,
            f"{key} unreachable within {settings.hub_probe_timeout_s:g} s ({type(exc).__name__}: {exc}); "
            "treating the Hub as offline",
        )
    _probe_cache[key] = (now, status)
    return status
