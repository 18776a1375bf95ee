"""The Hub reachability probe (loading/offline.py hub_status): bounded as a whole by its timeout.

Issue: socket.create_connection(timeout=) bounds the connect, not the name lookup before it: where DNS did
not answer, getaddrinfo took the resolver's 5 s x 2 attempts and the probe documented as < 2 s took 10 s.
"""

from __future__ import annotations

import socket
import threading

import pytest

from loading import Settings
from loading.offline import hub_status

from loading_testutil import Timer, record


@pytest.fixture
def silent_dns(monkeypatch):
    """socket.getaddrinfo as where the DNS server does not answer: it blocks (here until the test ends, at
    most 10 s, then fails as glibc does). Yields the list of names looked up."""
    looked_up: list[str] = []
    release = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in ("127.0.0.1", "::1"):
            return real(host, port, *args, **kwargs)
        looked_up.append(host)
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield looked_up
    release.set()


def test_probe_is_bounded_when_the_name_lookup_does_not_answer(isolated_env, monkeypatch, silent_dns):
    monkeypatch.setenv("MODELFLEET_HUB_PROBE_TIMEOUT_S", "0.5")
    with Timer() as t:
        status = hub_status(Settings.from_env(), use_cache=False)
    record("hub probe: DNS that does not answer, 0.5 s timeout", t.seconds)
    assert silent_dns == ["huggingface.co"]
    assert t.seconds < 0.5 + 1.0  # before: the lookup's own time (10 s here, 10 s with glibc's defaults)
    assert not status.online
    assert status.reason.startswith("huggingface.co:443 unreachable within 0.5 s (TimeoutError: the name lookup "
                                    "of huggingface.co did not answer; gave up after 0.5")
    assert status.reason.endswith("treating the Hub as offline")


def test_probes_while_a_lookup_hangs_share_it(isolated_env, monkeypatch, silent_dns):
    # A resolver that never answers leaves its lookup thread behind: later probes wait on it, not on new ones.
    monkeypatch.setenv("MODELFLEET_HUB_PROBE_TIMEOUT_S", "0.2")
    before = threading.active_count()
    for _ in range(3):
        assert not hub_status(Settings.from_env(), use_cache=False).online
    assert silent_dns == ["huggingface.co"]
    assert threading.active_count() <= before + 1


def test_a_refused_connect_still_says_so_at_once(isolated_env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with Timer() as t:
        status = hub_status(Settings.from_env(), use_cache=False)
    assert t.seconds < 0.5 and not status.online
    assert status.reason.startswith("127.0.0.1:9 unreachable within 1.5 s (ConnectionRefusedError")


def test_a_name_that_does_not_exist_is_reported_as_the_lookup_said(isolated_env, monkeypatch):
    def getaddrinfo(host, port, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    status = hub_status(Settings.from_env(), use_cache=False)
    assert not status.online
    assert "hub.invalid:443 unreachable within 1.5 s (gaierror: [Errno -2] Name or service not known" in status.reason


def test_a_reachable_endpoint_is_online(isolated_env, monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        status = hub_status(Settings.from_env(), use_cache=False)
    assert status.online and status.reason == f"127.0.0.1:{port} reachable"


# -- which address the probe tries: what huggingface_hub's HTTP client would connect to ---------------------
# Issue: the probe connected to HTTPS_PROXY whenever it was set, even for an http:// HF_ENDPOINT (the client
# uses HTTP_PROXY there) and for a host in NO_PROXY (the client goes direct): a directly reachable internal
# mirror was declared offline when the outbound proxy was down.

@pytest.fixture
def mirror_and_dead_proxy():
    """(port of a listening 'mirror' on loopback, a loopback port nothing listens on)."""
    with socket.socket() as mirror, socket.socket() as closed:
        mirror.bind(("127.0.0.1", 0))
        mirror.listen(8)
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
        closed.close()
        yield mirror.getsockname()[1], dead


@pytest.mark.parametrize("env", [
    pytest.param({"HTTPS_PROXY": "http://127.0.0.1:{dead}"}, id="http mirror, HTTPS_PROXY"),
    pytest.param({"https_proxy": "http://127.0.0.1:{dead}"}, id="http mirror, https_proxy"),
    pytest.param({"HTTP_PROXY": "http://127.0.0.1:{dead}", "NO_PROXY": "127.0.0.1"}, id="http mirror in NO_PROXY"),
    pytest.param({"HTTP_PROXY": "http://127.0.0.1:{dead}", "no_proxy": "localhost,127.0.0.0/8"},
                 id="http mirror in no_proxy's network"),
    pytest.param({"ALL_PROXY": "http://127.0.0.1:{dead}", "NO_PROXY": "*"}, id="NO_PROXY=*"),
    pytest.param({"HTTP_PROXY": "http://127.0.0.1:{dead}", "http_proxy": ""}, id="empty http_proxy unsets"),
])
def test_a_mirror_the_client_reaches_directly_is_online_whatever_the_proxy(isolated_env, monkeypatch,
                                                                          mirror_and_dead_proxy, env):
    port, dead = mirror_and_dead_proxy
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(dead=dead))
    status = hub_status(Settings.from_env(), use_cache=False)
    assert status.online and status.reason == f"127.0.0.1:{port} reachable"


def test_an_https_mirror_in_no_proxy_is_probed_directly(isolated_env, monkeypatch, mirror_and_dead_proxy):
    port, dead = mirror_and_dead_proxy
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{port}")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("NO_PROXY", "internal.example,127.0.0.1")
    assert hub_status(Settings.from_env(), use_cache=False).online


@pytest.mark.parametrize("scheme, variable", [("https", "HTTPS_PROXY"), ("http", "http_proxy"), ("https", "ALL_PROXY")])
def test_the_proxy_the_client_would_use_is_what_must_answer(isolated_env, monkeypatch, mirror_and_dead_proxy,
                                                            scheme, variable):
    port, dead = mirror_and_dead_proxy
    monkeypatch.setenv("HF_ENDPOINT", f"{scheme}://127.0.0.1:{port}")
    monkeypatch.setenv(variable, f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("NO_PROXY", "hub.internal")
    status = hub_status(Settings.from_env(), use_cache=False)
    assert not status.online
    assert status.reason.startswith(f"127.0.0.1:{dead} (the proxy in {variable}) unreachable within 1.5 s")


PROXY_ENVIRONMENTS = {
    "none": {},
    "HTTPS_PROXY": {"HTTPS_PROXY": "http://sproxy:3128"},
    "https_proxy without scheme or port": {"https_proxy": "sproxy"},
    "HTTP_PROXY": {"HTTP_PROXY": "http://hproxy:3129"},
    "ALL_PROXY": {"ALL_PROXY": "socks5://aproxy:1080"},
    "ALL_PROXY and HTTPS_PROXY": {"ALL_PROXY": "http://aproxy:1", "HTTPS_PROXY": "http://sproxy:2"},
    "lowercase wins": {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2"},
    "empty lowercase unsets": {"HTTPS_PROXY": "http://upper:1", "https_proxy": ""},
    "CGI request": {"HTTP_PROXY": "http://hproxy:3129", "REQUEST_METHOD": "GET"},
    **{f"NO_PROXY={value}": {"HTTPS_PROXY": "http://sproxy:3128", "HTTP_PROXY": "http://hproxy:3129",
                             "NO_PROXY": value}
       for value in ("*", "example.com", ".example.com", "*.example.com", "hub.example.com:8443", "10.0.0.0/8",
                     "127.0.0.1,::1,localhost", " example.com , other.org ", "http://hub.example.com",
                     "EXAMPLE.COM", "[::1]", "example.com,*")},
    "no_proxy wins over NO_PROXY": {"HTTPS_PROXY": "http://sproxy:3128", "NO_PROXY": "example.com",
                                    "no_proxy": "other.org"},
}
ENDPOINTS = ("https://huggingface.co", "http://hub.example.com", "https://hub.example.com",
             "https://hub.example.com:8443", "https://example.com", "https://wwwexample.com", "http://10.1.2.3:8080",
             "https://127.0.0.1:5000", "http://localhost:8000", "https://[::1]:5000", "HTTPS://HUB.EXAMPLE.COM")


def _httpx_choice(env: dict[str, str], endpoint: str) -> tuple[str, int] | None:
    """The proxy (host, port) huggingface_hub's client (httpx2, trust_env) sends a request to `endpoint` through
    in environment `env`, None for direct: its mounts from the environment, most specific first."""
    from unittest import mock

    from httpx2 import URL
    from httpx2._utils import URLPattern, get_environment_proxies

    with mock.patch.dict("os.environ", env, clear=True):
        mounts = get_environment_proxies()
    url = URL(endpoint)
    for pattern, proxy in sorted(mounts.items(), key=lambda item: URLPattern(item[0])):
        if URLPattern(pattern).matches(url):
            if proxy is None:
                return None
            proxy_url = URL(proxy)
            return proxy_url.host, proxy_url.port or {"http": 80, "https": 443, "socks5": 1080}[proxy_url.scheme]
    return None


@pytest.mark.parametrize("env_name", PROXY_ENVIRONMENTS)
def test_probe_target_is_where_huggingface_hubs_client_connects(env_name):
    from loading.offline import probe_target

    env = PROXY_ENVIRONMENTS[env_name]
    differ = []
    for endpoint in ENDPOINTS:
        target = probe_target(endpoint, env)
        expected = _httpx_choice(env, endpoint)
        got = (target.host, target.port) if target.proxy_variable else None
        if got != expected:
            differ.append(f"{endpoint}: httpx {expected or 'direct'}, probe {got or 'direct'} ({target})")
    assert not differ, "\n".join(differ)
