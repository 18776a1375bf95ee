"""Start and stop the servers under test as subprocesses, each alone on the machine while measured.

Ours runs through the real CLI (`serve run <config>`), in its own Ray temp dir so it never joins
another Ray cluster on this machine; peers run as plain processes. Every server listens on
127.0.0.1, ports 8300-8399.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import requests
import yaml

from deployments.serve_env import read_serve_env, serve_process_env

from . import models, workloads

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"

# Serve's request path (environment of `serve run`): what `make serve` runs, and Ray's own defaults.
RAY_DEFAULTS = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
PROXY_MODES: dict[str, dict[str, str]] = {
    # serve.env: Ray's bundled HAProxy in front of the ingress replica's own HTTP server (no proxy
    # actor hop), user code and router on the replicas' event loops, gRPC between replicas.
    "default": read_serve_env(),
    # Ray's defaults: the HTTP proxy actor, user code in a thread of its own (before 2026-12-04 the
    # project's default; bench/RESULTS.md's older runs call it "default" and serve.env's settings
    # "haproxy+throughput").
    "proxy-actor": RAY_DEFAULTS,
}


def mode_with(name: str, settings: dict[str, str]) -> str:
    """Register proxy mode `name`: serve.env's default one plus `settings` (an A/B of an environment setting)."""
    PROXY_MODES[name] = {**PROXY_MODES["default"], **settings}
    return name


def parse_proxy_modes(text: str) -> list[str]:
    """'default,haproxy' -> ["default", "haproxy"], naming the choices when one is unknown."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in PROXY_MODES]
    if unknown:
        raise SystemExit(f"unknown proxy mode {unknown[0]!r}; choose from {', '.join(PROXY_MODES)}")
    return modes


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    started_at: float
    timings: dict = field(default_factory=dict)


@dataclass
class BenchRun:
    """One benchmark command's run: its stamp, its directory of logs and configs, and the models it serves."""

    stamp: str
    dir: Path
    models_root: Path
    dirs: dict[str, Path]  # family -> model directory (the LLM's per --model-size)
    llm_dir: Path | None  # the LLM in tiny-llm's place in our config, None for the tiny one
    device: str  # args.device of our config


def start_run(kind: str, model_size: str) -> BenchRun:
    """Logging set up, bench/runs/<kind>-<stamp>/ made, the models built or found (bench/runs/models)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(message)s", datefmt="%H:%M:%S")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    runs = REPO / "bench" / "runs"
    run_dir = runs / f"{kind}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    dirs = models.model_dirs(runs / "models", model_size)
    tiny = model_size == "tiny"
    return BenchRun(stamp, run_dir, runs / "models", dirs, None if tiny else dirs["llm"], "cpu" if tiny else "auto")


def session_cpu(session: int) -> dict[int, tuple[str, int]]:
    """pid -> (process name, CPU ticks so far) for the live processes of a session (a server and everything it
    started)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[3]) == session:
            out[int(name)] = (text[text.index("(") + 1:text.rindex(")")], int(fields[11]) + int(fields[12]))
    return out


def session_cpu_s(session: int) -> float:
    """CPU seconds used so far by the live processes of a session."""
    return sum(ticks for _, ticks in session_cpu(session).values()) / os.sysconf("SC_CLK_TCK")


def base_env(extra: dict[str, str] | None = None, repo: Path = REPO) -> dict[str, str]:
    """`repo`: the checkout whose code the server imports (another one for bench.paired's --against)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def bench_serve_config(port: int, models_dir: Path, llm_dir: Path | None, *, device: str = "cpu",
                       only_llm: bool = False, max_batch_size: int | None = None,
                       batch_wait_timeout_s: float | None = None, repo: Path = REPO) -> dict:
    """serve_config.yaml with the bench's port and models dir and one replica per family.

    Replicas are pinned (autoscaling off) so that figures do not move with the autoscaler.
    `llm_dir` replaces the tiny LLM (for --model-size); `only_llm` keeps just that model.
    """
    config = yaml.safe_load((repo / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    config["http_options"]["host"] = HOST
    app = config["applications"][0]
    args = app["args"]
    args["device"] = device
    args["local_models_dir"] = str(models_dir)
    # The bench serves its own models under the tiny ones' names: the demo's real chat model (a GGUF
    # source) is left out here; `--model-size smollm2-135m` measures it in tiny-llm's place.
    args["models"] = [m for m in args["models"] if not str(m["source"]).startswith("pkg://")
                      and not str(m["source"]).endswith(".gguf")]
    if llm_dir is not None:  # the tiny LoRA adapter fits only the tiny base
        args["models"] = [m for m in args["models"] if m.get("base_model") != "tiny-llm"]
        for spec in args["models"]:
            if spec["name"] == "tiny-llm":
                spec.update(source=str(llm_dir), build_tiny=None)
                spec.pop("build_tiny")
    if only_llm:
        args["models"] = [m for m in args["models"] if m["name"] == "tiny-llm"]
    families = args.setdefault("families", {})
    for family in ("llm", "stt", "tts", "vlm"):
        options = families.setdefault(family, {})
        options["autoscaling"] = None
        if family == "llm" and max_batch_size is not None:
            options["max_batch_size"] = max_batch_size
        if family == "llm" and batch_wait_timeout_s is not None:
            options["batch_wait_timeout_s"] = batch_wait_timeout_s
    return config


def _wait_http(url: str, process: subprocess.Popen, timeout_s: float, ok=lambda r: r.status_code == 200) -> float:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            response = requests.get(url, timeout=5)
            if ok(response):
                return time.perf_counter()
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def _stop(process: subprocess.Popen, grace_s: float) -> float:
    """SIGINT the group we started (serve run shuts Serve and its local Ray down), then SIGKILL it."""
    started = time.perf_counter()
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # leftovers of this group only
    except ProcessLookupError:
        pass
    process.wait()
    return time.perf_counter() - started


def _spawn(cmd: list[str], env: dict, log_path: Path, cwd: Path = REPO) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@contextmanager
def serve_run(config: dict, run_dir: Path, label: str, mode: str = "default",
              ready_timeout_s: float = 300.0, repo: Path = REPO) -> Iterator[Server]:
    """`serve run` our app under PROXY_MODES[mode]; timings: health_200_s (first 200 on /health),
    all_ready_s (status ok), stop_s (Ctrl-C to exit)."""
    port = config["http_options"]["port"]
    config_path = run_dir / f"serve_config.{label}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp = Path(f"/tmp/mfbench-{port}")  # short: Ray's socket paths have a length limit
    tmp.mkdir(exist_ok=True)
    url = f"http://{HOST}:{port}"
    log_path = run_dir / f"serve.{label}.log"
    for attempt in (1, 2):
        # HAProxy's files and ports of this instance's own (never a peer's or `make serve`'s), picked free
        # anew for each attempt
        haproxy = serve_process_env(tmp / "hap")
        env = base_env({"RAY_TMPDIR": str(tmp), **haproxy, **PROXY_MODES[mode]}, repo)
        started = time.perf_counter()
        process = _spawn([str(VENV_BIN / "serve"), "run", str(config_path)], env, log_path, repo)
        try:
            health = _wait_http(url + "/health", process, ready_timeout_s)
            break
        except RuntimeError:
            # A port found free was taken before HAProxy bound it (another process's ephemeral port): once,
            # start again with other ports; any other failure is the benchmark's to report.
            _stop(process, 60)
            if attempt == 2 or "Address already in use" not in log_path.read_text(errors="replace"):
                raise
    server = Server(label, url, process, log_path, started)
    workloads.new_server(url)  # its chats' request numbers start at 0, as every server's do
    try:
        ready = _wait_http(url + "/health", process, ready_timeout_s,
                           ok=lambda r: r.status_code == 200 and r.json().get("status") == "ok")
        server.timings = {"health_200_s": health - started, "all_ready_s": ready - started,
                          "health": requests.get(url + "/health", timeout=10).json()}
        yield server
    finally:
        server.timings["stop_s"] = _stop(process, 60)


@contextmanager
def lock_server(family: str, model_dir: Path, port: int, run_dir: Path, dtype: str = "auto") -> Iterator[Server]:
    cmd = [sys.executable, "-m", "bench.peers.lock_server", "--family", family, "--model", str(model_dir),
           "--port", str(port), "--dtype", dtype]
    yield from _plain(cmd, f"lock-{family}", port, run_dir)


@contextmanager
def transformers_serve(model_dir: Path, port: int, run_dir: Path, continuous_batching: bool,
                       dtype: str = "auto") -> Iterator[Server]:
    cmd = [str(VENV_BIN / "transformers"), "serve", "--host", HOST, "--port", str(port), "--device", "cpu"
           if not _cuda() else "auto", "--continuous-batching" if continuous_batching else "--no-continuous-batching",
           "--dtype", dtype, str(model_dir)]
    yield from _plain(cmd, "transformers-serve" + ("-cb" if continuous_batching else ""), port, run_dir)


def _plain(cmd: list[str], label: str, port: int, run_dir: Path):
    started = time.perf_counter()
    process = _spawn(cmd, base_env(), run_dir / f"{label}.log")
    server = Server(label, f"http://{HOST}:{port}", process, run_dir / f"{label}.log", started)
    workloads.new_server(server.url)  # its chats' request numbers start at 0, as every server's do
    try:
        server.timings["health_200_s"] = _wait_http(server.url + "/health", process, 300) - started
        yield server
    finally:
        server.timings["stop_s"] = _stop(process, 20)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def log_tail(server: Server, lines: int = 30) -> str:
    try:
        return "\n".join(server.log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
