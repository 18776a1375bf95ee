"""Is the Hub usable right now? Decided in seconds, not after huggingface_hub's retries.

huggingface_hub reads its offline flag once, at import, and on an unreachable network retries
with backoff (~47 s for a model, ~141 s for a tokenizer). We read the flags at call time and
probe the endpoint with one TCP connect bounded by a short timeout; `offline_for_libraries` tells
huggingface_hub what we found, before peft and bitsandbytes, which call the Hub as they are imported.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

from .settings import OFFLINE_VARIABLES, Settings

_TRUTHY = {"1", "true", "yes", "on"}
_PROBE_TTL_S = 30.0
_probe_cache: dict[str, tuple[float, HubStatus]] = {}
# What offline_for_libraries set, so that it takes back what a probe set once the Hub answers again:
# huggingface_hub's constant, and HF_HUB_OFFLINE=1 in os.environ (which declared_offline then ignores).
_constant_set_here = False
_variable_set_here = False
_variable_before: str | None = None  # HF_HUB_OFFLINE's value before it was set here ("0", or None: unset)


@dataclass(frozen=True)
class HubStatus:
    online: bool
    reason: str


def reset_probe_cache() -> None:
    """Forget cached reachability probes (the next hub_status() probes again) and what
    offline_for_libraries told huggingface_hub after them."""
    _probe_cache.clear()
    _take_back()


def declared_offline(environ: Mapping[str, str] | None = None) -> str | None:
    """The variable that declares offline mode (e.g. 'HF_HUB_OFFLINE=1'), or None. HF_HUB_OFFLINE=1 that
    offline_for_libraries set in this process's environment after a probe declares nothing."""
    env = os.environ if environ is None else environ
    for name in OFFLINE_VARIABLES:
        if name == "HF_HUB_OFFLINE" and environ is None and _variable_set_here:
            continue
        if env.get(name, "").strip().lower() in _TRUTHY:
            return f"{name}={env[name]}"
    return None


def _probe_target(endpoint: str, environ: dict[str, str]) -> tuple[str, int]:
    # Behind an HTTPS proxy, the proxy is what must be reachable.
    proxy = environ.get("HTTPS_PROXY") or environ.get("https_proxy")
    url = urlparse(proxy if proxy else endpoint)
    default_port = 443 if url.scheme == "https" else 80
    return url.hostname or "huggingface.co", url.port or default_port


def hub_status(settings: Settings, environ: Mapping[str, str] | None = None, *, use_cache: bool = True) -> HubStatus:
    """Offline if declared; otherwise one TCP connect to the endpoint (cached for 30 s)."""
    declared = declared_offline(environ)
    env = dict(os.environ if environ is None else environ)
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


def offline_for_libraries(settings: Settings) -> HubStatus:
    """hub_status, told to huggingface_hub: call it before importing peft or bitsandbytes (or loading
    weights that import them). bitsandbytes' CPU backend fetches a kernel from the Hub as it is imported
    (peft imports it), through huggingface_hub's retries: ~140 s where the Hub does not answer, even for
    a local adapter. huggingface_hub reads only HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE, once, at its
    import; so where the Hub is offline (declared by any of our variables, or probed) its constant is set,
    and HF_HUB_OFFLINE=1 for the libraries that read the environment. A probe's offline is taken back
    when a later probe finds the Hub again."""
    global _constant_set_here, _variable_set_here, _variable_before
    import huggingface_hub.constants as hub_constants

    status = hub_status(settings)
    if not status.online:
        if not hub_constants.HF_HUB_OFFLINE:
            hub_constants.HF_HUB_OFFLINE, _constant_set_here = True, True
        if not _variable_set_here and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in _TRUTHY:
            _variable_before = os.environ.get("HF_HUB_OFFLINE")
            os.environ["HF_HUB_OFFLINE"], _variable_set_here = "1", True
    else:
        _take_back()
    return status


def _take_back() -> None:
    """Undo what offline_for_libraries set: huggingface_hub's constant, HF_HUB_OFFLINE in os.environ."""
    global _constant_set_here, _variable_set_here
    if _constant_set_here:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE, _constant_set_here = False, False
    if _variable_set_here:
        if _variable_before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = _variable_before
        _variable_set_here = False
