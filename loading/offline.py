"""Is the Hub usable right now? Decided in seconds, not after huggingface_hub's retries.

huggingface_hub reads its offline flag once, at import, and on an unreachable network retries
with backoff (~47 s for a model, ~141 s for a tokenizer). We read the flags at call time and
probe the endpoint with one name lookup and TCP connect, bounded together by a short timeout (the
lookup waited for in a worker thread: a socket timeout does not bound getaddrinfo, which takes the
resolver's 5 s x 2 attempts where DNS does not answer); `offline_for_libraries` tells
huggingface_hub what we found, before peft and bitsandbytes, which call the Hub as they are imported.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import ParseResult, urlparse

from .settings import OFFLINE_VARIABLES, Settings

_TRUTHY = {"1", "true", "yes", "on"}
_PROBE_TTL_S = 30.0
_probe_cache: dict[str, tuple[float, HubStatus]] = {}
# What offline_for_libraries set, so that it takes back what a probe set once the Hub answers again:
# huggingface_hub's constant, and HF_HUB_OFFLINE=1 in os.environ (which declared_offline then ignores).
_constant_set_here = False
_variable_set_here = False
_variable_before: str | None = None  # HF_HUB_OFFLINE's value before it was set here ("0", or None: unset)
# Name lookups still running, by (host, port): a probe waits on the one already running instead of starting
# another, so that a resolver that never answers holds at most one thread per name.
_lookups: dict[tuple[str, int], _Lookup] = {}
_lookups_lock = threading.Lock()


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


_DEFAULT_PORTS = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}


def proxies_from_env(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """scheme -> (proxy, the variable naming it), read from `environ` as urllib.request.getproxies_environment
    reads os.environ (and so httpx, huggingface_hub's client): <scheme>_proxy in either case, a lowercase
    name winning over its uppercase one, an empty one unsetting it; HTTP_PROXY is not read in a CGI request
    (REQUEST_METHOD set); NO_PROXY comes back as scheme "no"."""
    proxies: dict[str, tuple[str, str]] = {}
    for name, value in environ.items():
        if value and name.lower().endswith("_proxy"):
            proxies[name.lower()[:-6]] = (value, name)
    if "REQUEST_METHOD" in environ:
        proxies.pop("http", None)
    for name, value in environ.items():
        if name.endswith("_proxy"):
            if value:
                proxies[name.lower()[:-6]] = (value, name)
            else:
                proxies.pop(name.lower()[:-6], None)
    return proxies


def bypasses_proxy(no_proxy: str, scheme: str, host: str, port: int | None) -> bool:
    """Whether a NO_PROXY value sends scheme://host[:port] directly, as httpx reads it (its
    get_environment_proxies, after curl): "*" for every host; an IP address, an IP network (10.0.0.0/8) or
    localhost exactly; example.com for it and its subdomains, .example.com and *.example.com for its
    subdomains only; host:port only for that port (`port` None: the scheme's default); scheme://host for that
    scheme only. Entries it cannot parse are ignored, as there."""
    host = host.lower().strip("[]")
    for entry in (item.strip() for item in no_proxy.split(",")):
        if entry == "*":
            return True
        if entry and _no_proxy_entry_matches(entry.lower(), scheme, host, port):
            return True
    return False


def _no_proxy_entry_matches(entry: str, scheme: str, host: str, port: int | None) -> bool:
    entry_scheme, _, rest = entry.rpartition("://")
    if entry_scheme and entry_scheme not in ("all", scheme):
        return False
    address, slash, prefix = rest.partition("/")
    try:  # an address or a network: 127.0.0.1, ::1, [::1], 10.0.0.0/8
        network = ipaddress.ip_network(f"{address.strip('[]')}{slash}{prefix}", strict=False)
    except ValueError:
        network = None
    if network is not None:
        try:
            return ipaddress.ip_address(host) in network
        except ValueError:
            return False
    if slash:
        return False
    try:
        parsed = urlparse(f"//{rest}")
        pattern, entry_port = parsed.hostname or "", parsed.port
    except ValueError:
        return False
    if entry_port is not None and entry_port != port:
        return False
    if not entry_scheme and pattern != "localhost" and not pattern.startswith("*."):
        pattern = f"*{pattern}"  # example.com and .example.com as httpx reads them: *example.com, *.example.com
    if pattern in ("", "*"):
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    if pattern.startswith("*"):
        return host == pattern[1:] or host.endswith(f".{pattern[1:]}")
    return host == pattern


@dataclass(frozen=True)
class ProbeTarget:
    host: str
    port: int
    proxy_variable: str | None = None  # the variable naming the proxy probed in the endpoint's place

    def __str__(self) -> str:
        where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"{where} (the proxy in {self.proxy_variable})" if self.proxy_variable else where


def probe_target(endpoint: str, environ: Mapping[str, str]) -> ProbeTarget:
    """What must answer for the Hub at `endpoint` to be usable: the proxy the HTTP client would send its
    requests through (for the endpoint's scheme, else ALL_PROXY, unless NO_PROXY names the host), else the
    endpoint itself. The proxy for https:// where the endpoint is http://, or one for a host in NO_PROXY,
    declared a directly reachable mirror offline when that proxy was down."""
    url = urlparse(endpoint)
    scheme = url.scheme.lower() or "https"
    host, port = _host_port(url, "huggingface.co", 443)
    proxies = proxies_from_env(environ)
    no_proxy = proxies.get("no", ("", ""))[0]
    proxy = proxies.get(scheme) or proxies.get("all")
    if proxy is None or bypasses_proxy(no_proxy, scheme, host, None if port == _DEFAULT_PORTS.get(scheme) else port):
        return ProbeTarget(host, port)
    value, variable = proxy
    return ProbeTarget(*_host_port(urlparse(value if "://" in value else f"http://{value}"), host, 80), variable)


def _host_port(url: ParseResult, default_host: str, default_port: int) -> tuple[str, int]:
    """The host and port `url` names; its scheme's default port where it names none (or not a valid one)."""
    try:
        port = url.port
    except ValueError:
        port = None
    return url.hostname or default_host, port or _DEFAULT_PORTS.get(url.scheme.lower(), default_port)


def hub_status(settings: Settings, environ: Mapping[str, str] | None = None, *, use_cache: bool = True) -> HubStatus:
    """Offline if declared; otherwise one TCP connect (cached for 30 s) to the endpoint, or to the proxy
    huggingface_hub's client would reach it through (`probe_target`)."""
    declared = declared_offline(environ)
    if declared:
        return HubStatus(False, f"offline mode declared by {declared}")
    target = probe_target(settings.hub_endpoint, os.environ if environ is None else environ)
    key = str(target)
    now = time.monotonic()
    if use_cache and key in _probe_cache and now - _probe_cache[key][0] < _PROBE_TTL_S:
        return _probe_cache[key][1]
    try:
        connect_within(target.host, target.port, settings.hub_probe_timeout_s)
        status = HubStatus(True, f"{key} reachable")
    except OSError as exc:
        status = HubStatus(
            False,
            f"{key} unreachable within {settings.hub_probe_timeout_s:g} s ({type(exc).__name__}: {exc}; "
            f"gave up after {time.monotonic() - now:.2f} s); treating the Hub as offline",
        )
    _probe_cache[key] = (now, status)
    return status


class _Lookup:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.addresses: list[tuple] = []
        self.error: OSError | None = None


def _look_up(key: tuple[str, int], lookup: _Lookup) -> None:
    try:
        lookup.addresses = socket.getaddrinfo(key[0], key[1], 0, socket.SOCK_STREAM)
    except OSError as exc:
        lookup.error = exc
    finally:
        with _lookups_lock:
            if _lookups.get(key) is lookup:
                del _lookups[key]
        lookup.done.set()


def resolve_within(host: str, port: int, timeout_s: float) -> list[tuple]:
    """socket.getaddrinfo for a TCP connect to (host, port), or TimeoutError after `timeout_s`: the lookup
    runs in a daemon thread (getaddrinfo cannot be interrupted), which a lookup that does not answer
    leaves behind until the resolver gives up; a later call for the same name waits on that one."""
    key = (host, port)
    with _lookups_lock:
        lookup = _lookups.get(key)
        if lookup is None:
            lookup = _lookups[key] = _Lookup()
            threading.Thread(target=_look_up, args=(key, lookup), name=f"hub-probe-lookup {host}",
                             daemon=True).start()
    if not lookup.done.wait(timeout_s):
        raise TimeoutError(f"the name lookup of {host} did not answer")
    if lookup.error is not None:
        raise lookup.error
    return lookup.addresses


def connect_within(host: str, port: int, timeout_s: float) -> None:
    """One TCP connect to (host, port), name lookup included, all within `timeout_s` (OSError otherwise;
    TimeoutError where time ran out). socket.create_connection's timeout bounds each connect, not the lookup."""
    deadline = time.monotonic() + timeout_s
    error: OSError | None = None
    for family, kind, proto, _, address in resolve_within(host, port, timeout_s):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(remaining)
            try:
                sock.connect(address)
                return
            except OSError as exc:
                error = exc
    raise error if error is not None else TimeoutError("timed out")


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
