"""`modelfleet check`: the installed console script against real Serve apps on loopback.

Two apps: the shipped demo with API keys on (every family answers), and a small one whose first LLM
cannot load (a Hub id that is nowhere) next to a LoRA adapter and its ready base. Plus a URL where
nothing listens, and the import cost of the command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve_testutil import DEMO_KEY, REPO, demo_args, free_port, run_app

CONSOLE_SCRIPT = Path(sys.executable).parent / "modelfleet"
KEY = DEMO_KEY
CHECKS = ["speech", "chat", "chat-stream", "vision", "transcription", "voice"]

pytestmark = pytest.mark.skipif(not CONSOLE_SCRIPT.exists(),
                                reason="modelfleet not installed (pip install -e . --no-deps)")


@pytest.fixture(scope="module")
def healthy(keyed_demo_app):
    """The shipped demo config (every family, the real SmolLM2 chat model), API keys required."""
    return keyed_demo_app


@pytest.fixture(scope="module")
def broken(serve_url, models_dir):
    """One family (llm): a model that fails to load listed first, then an adapter, then its base."""
    from ray import serve

    args = {
        "device": "cpu",
        "local_models_dir": str(models_dir),
        "models": [
            {"name": "broken-llm", "source": "acme/no-such-model", "family": "llm"},
            {"name": "tiny-llm-lora", "source": "tiny-llm-lora", "base_model": "tiny-llm", "build_tiny": "llm-lora",
             "max_new_tokens": 16},
            {"name": "tiny-llm", "source": "tiny-llm", "build_tiny": "llm", "max_new_tokens": 16},
        ],
        "families": {"llm": {"autoscaling": None}},
    }
    app = run_app(serve_url, "checkbroken", args)
    app.wait_for(lambda h: h["models"]["broken-llm"]["state"] == "failed"
                 and all(h["models"][m]["state"] == "ready" for m in ("tiny-llm", "tiny-llm-lora")), timeout=120)
    yield app
    serve.delete("checkbroken")


def modelfleet(*args: str, env: dict | None = None, timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    environment = {k: v for k, v in os.environ.items() if k not in ("MODELFLEET_URL", "MODELFLEET_API_KEY")}
    started = time.perf_counter()
    proc = subprocess.run([str(CONSOLE_SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**environment, **(env or {})})
    seconds = time.perf_counter() - started
    print(f"\n$ modelfleet {' '.join(args)}  ({seconds:.2f} s, exit {proc.returncode})\n{proc.stdout}{proc.stderr}")
    return proc, seconds


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_a_healthy_server_passes_every_family_json(healthy):
    proc, _ = modelfleet("check", "--url", healthy.url, "--api-key", KEY, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["exit_code"] == 0 and report["failed"] == [] and report["error"] is None
    checks = by_name(report)
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert all(c["status"] == "ok" and c["latency_ms"] > 0 for c in report["checks"]), report["checks"]
    # the first ready model of each family, a base before its adapter
    assert checks["chat"]["model"] == checks["chat-stream"]["model"] == "smollm2-135m-instruct"
    assert checks["vision"]["model"] == "tiny-llava"
    assert (checks["speech"]["model"], checks["transcription"]["model"]) == ("tiny-vits", "tiny-whisper")
    assert checks["voice"]["model"] == "tiny-whisper+smollm2-135m-instruct+tiny-vits"
    # what each probe measured
    assert checks["speech"]["facts"]["samples"] > 0 and checks["speech"]["facts"]["sample_rate"] > 0
    stream = checks["chat-stream"]["facts"]
    assert stream["deltas"] >= 1 and 0 < stream["first_token_ms"] <= checks["chat-stream"]["latency_ms"]
    assert checks["chat"]["facts"]["completion_tokens"] >= 1
    assert checks["transcription"]["facts"]["audio"] == "the speech check's audio"
    assert checks["voice"]["facts"]["audio_seconds"] > 0
    assert report["summary"] == {"ok": 6, "FAIL": 0, "skip": 0}
    assert {m["id"] for m in report["models"]} >= {"tiny-llm-lora", "tiny-llava-lora"}


def test_a_healthy_server_text_one_line_per_check_url_and_key_from_the_environment(healthy):
    proc, _ = modelfleet("check", env={"MODELFLEET_URL": healthy.url, "MODELFLEET_API_KEY": KEY})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    served = len(demo_args()["models"])
    assert lines[0] == f"modelfleet check {healthy.url}: {served} models (llm, stt, tts, vlm)", lines[0]
    rows = [line.split() for line in lines[1:-1]]
    assert [(row[0], row[1]) for row in rows] == [("ok", name) for name in CHECKS], proc.stdout
    assert all(row[4] == "ms" and float(row[3]) > 0 for row in rows), proc.stdout
    assert lines[-1].startswith("6 ok, 0 failed, 0 skipped in "), lines[-1]


def test_a_model_that_failed_to_load_is_a_failure_naming_it_and_its_error(broken):
    proc, _ = modelfleet("check", "--url", broken.url, "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["failed"] == ["load broken-llm"] and report["ok"] is False
    load = report["checks"][0]
    assert (load["status"], load["name"], load["model"]) == ("FAIL", "load", "broken-llm")
    assert load["detail"].startswith("failed: Model 'acme/no-such-model' was not found"), load
    assert "modelfleet fetch" in load["detail"]  # the error's last line says what to do
    assert "Looked at:" in load["facts"]["error"]  # the whole error from /health
    checks = by_name(report)
    # the family is still checked, on its ready base model rather than the failed one or the adapter
    assert (checks["chat"]["status"], checks["chat"]["model"]) == ("ok", "tiny-llm")
    assert checks["chat-stream"]["status"] == "ok"
    for name, family in (("speech", "tts"), ("vision", "vlm"), ("transcription", "stt")):
        assert (checks[name]["status"], checks[name]["detail"]) == ("skip", f"no {family} model served")
    assert checks["voice"]["status"] == "skip" and "no usable stt, tts" in checks["voice"]["detail"]

    text, _ = modelfleet("check", "--url", broken.url)
    assert text.returncode == 1
    assert any(line.startswith("FAIL  load") and "broken-llm" in line for line in text.stdout.splitlines())
    assert text.stdout.splitlines()[-1].endswith("; FAILED: load broken-llm"), text.stdout


def test_an_unreachable_server_exits_2_at_once_with_a_clear_message():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc, seconds = modelfleet("check", "--url", url)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"cannot check the server at {url}" in proc.stderr and "ConnectionRefusedError" in proc.stderr, proc.stderr
    assert seconds < 10, seconds  # the Python start and one refused connection
    as_json, _ = modelfleet("check", "--url", url, "--json")
    report = json.loads(as_json.stdout)
    assert as_json.returncode == report["exit_code"] == 2 and "cannot connect" in report["error"]


@pytest.mark.parametrize("url,says", [
    ("localhost:8000", "it has no scheme; write it as http://localhost:8000"),
    ("127.0.0.1:8000", "it has no scheme; write it as http://127.0.0.1:8000"),
    ("http://", "it is not an http(s) URL with a host"),
    ("http://127.0.0.1:99999", "InvalidURL"),  # one requests refuses only when it sends
])
def test_a_url_the_check_cannot_use_exits_2_naming_it(url, says):
    """requests' InvalidSchema / InvalidURL were a traceback (exit 1); MODELFLEET_URL is read the same way."""
    proc, _ = modelfleet("check", env={"MODELFLEET_URL": url})
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot check the server at {url!r}" in proc.stderr or f"at {url}:" in proc.stderr, proc.stderr
    assert says in proc.stderr, proc.stderr


@pytest.mark.parametrize("timeout", ["inf", "1e10", "0", "nan"])
def test_a_timeout_no_socket_takes_exits_2_naming_it_and_the_range(timeout):
    """--timeout inf (or 1e10: past ~9.2e9 s) was accepted and then, once a server took the connection, a
    traceback of urllib3's sock.settimeout (OverflowError: timestamp out of range), exit 1. A server that
    accepts and never answers is enough: the error came when the check waited for the first answer."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        proc, _ = modelfleet("check", "--url", url, "--timeout", timeout, timeout=30)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert f"--timeout {float(timeout):g} is out of range: give seconds above 0 and at most 86400" in proc.stderr, \
        proc.stderr


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef"])
def test_a_missing_or_wrong_api_key_exits_2_naming_the_401(healthy, key):
    proc, _ = modelfleet("check", "--url", healthy.url, *(["--api-key", key] if key else []))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "HTTP 401 on GET /v1/models" in proc.stderr and "--api-key" in proc.stderr, proc.stderr


def test_the_check_imports_neither_ray_nor_torch():
    code = ("import sys, time; t = time.perf_counter(); import deployments.cli, deployments.check; "
            "print(round(time.perf_counter() - t, 3)); print(sorted({'ray', 'torch', 'loading'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    seconds, heavy = proc.stdout.splitlines()
    print(f"\nimport deployments.cli + deployments.check: {seconds} s")
    assert heavy == "[]", proc.stdout
    help_proc, wall = modelfleet("check", "--help")
    assert help_proc.returncode == 0 and "--api-key" in help_proc.stdout
    assert wall < 5, wall
