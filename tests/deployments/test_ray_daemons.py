"""Ray's off-path processes go to a low CPU priority (deployments/ray_daemons.py): real processes, real nice
values. The live check (a `serve run`'s dashboard at 19, its raylet, GCS and replicas at 0) is in
tests/serve/test_hostile.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from deployments.ray_daemons import NICE_SETTING, configured_nice, lower_off_path_daemons

# a process with a thread besides its main one, named by its fourth argument (python -c CODE NAME)
SLEEPER = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"


def sleeper(name: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", SLEEPER, name])
    deadline = time.monotonic() + 10
    while len(os.listdir(f"/proc/{process.pid}/task")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    return process


def thread_nices(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield lambda name: started.append(sleeper(name)) or started[-1]
    for process in started:
        process.kill()
        process.wait()


def test_every_thread_of_an_off_path_daemon_is_lowered_and_nothing_else(processes):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    monitor = processes("/venv/lib/python3.11/site-packages/ray/_private/log_monitor.py")
    agent = processes("ray::DashboardAgent")
    proxy = processes("ray::ProxyActor")
    raylet = processes("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet")
    replica = processes("ray::ServeReplica:modelfleet:llm")

    lowered = lower_off_path_daemons(19, environ={"RAY_SERVE_ENABLE_HA_PROXY": "0"})

    assert thread_nices(monitor.pid) == thread_nices(agent.pid) == {19}
    assert monitor.pid in lowered.processes["log monitor"] and agent.pid in lowered.processes["dashboard agent"]
    # without HAProxy the proxy actor carries every HTTP request; the raylet's children would inherit a
    # priority they could not raise back
    for kept in (proxy, raylet, replica):
        assert thread_nices(kept.pid) == {base}
    assert "http proxy actor" not in lowered.processes


def test_the_serve_controller_goes_no_lower_than_rays_own_worker_niceness(processes):
    controller = processes("ray::ServeController")
    lowered = lower_off_path_daemons(19, environ={})
    assert thread_nices(controller.pid) == {15} and controller.pid in lowered.processes["serve controller"]


def test_the_http_proxy_actor_is_lowered_only_while_haproxy_answers(processes):
    proxy = processes("ray::ProxyActor")
    lowered = lower_off_path_daemons(19, environ={"RAY_SERVE_ENABLE_HA_PROXY": "1"})
    assert thread_nices(proxy.pid) == {19} and proxy.pid in lowered.processes["http proxy actor"]
    assert "http proxy actor" in str(lowered)


def test_a_new_thread_of_a_lowered_process_inherits_the_priority():
    code = ("import threading, time, os, sys; sys.stdin.readline(); "
            "t = threading.Thread(target=lambda: print(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),"
            " flush=True)); t.start(); t.join(); time.sleep(30)")
    process = subprocess.Popen([sys.executable, "-c", code, "ray-dashboard-NodeHead-0"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        lower_off_path_daemons(19, environ={})
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "19"
    finally:
        process.kill()
        process.wait()


def test_a_higher_priority_is_never_asked_for(processes):
    """Lowering a nice value needs a privilege the user lacks: a process already lower stays where it is."""
    agent = processes("ray::DashboardAgent")
    lower_off_path_daemons(19, environ={})
    lower_off_path_daemons(10, environ={})
    assert thread_nices(agent.pid) == {19}


def test_zero_leaves_every_process_as_it_is(processes):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    agent = processes("ray::DashboardAgent")
    lowered = lower_off_path_daemons(environ={NICE_SETTING: "0"})
    assert lowered.processes == {} and thread_nices(agent.pid) == {base}


def test_the_setting_defaults_to_19_and_a_bad_value_names_itself():
    assert configured_nice({}) == 19
    assert configured_nice({NICE_SETTING: " 5 "}) == 5
    for bad in ("high", "-5", "20"):
        with pytest.raises(ValueError, match=rf"{NICE_SETTING}='{bad}' is not a nice value from 0 .* to 19"):
            configured_nice({NICE_SETTING: bad})


def test_build_app_refuses_a_bad_setting(monkeypatch):
    from deployments.builder import build_app

    monkeypatch.setenv(NICE_SETTING, "lowest")
    with pytest.raises(ValueError, match=f"{NICE_SETTING}='lowest'"):
        build_app({"models": [{"name": "m", "source": "tiny-llm", "build_tiny": "llm"}]})
