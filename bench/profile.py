"""Where a chat request's time goes through `serve run`: CPU per request per process, and py-spy.

    python -m bench.profile [--proxy-modes proxy-actor,default] [--clients 16] [--max-tokens 1] [--seconds 20]

Runs our app on the tiny LLM (one replica, autoscaling off), drives closed-loop chat load and,
during the load, (1) reads each Serve/Ray process's CPU time from /proc before and after, giving
CPU milliseconds per request per process, and (2) samples each Python process with py-spy
(`--nonblocking`, so the sampler does not pause it), classifying every sample by the file of its
innermost frame. Writes bench/PROFILE.md (and a JSON beside the run). Linux only; py-spy must be
on PATH or in the venv (`pip install py-spy`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from . import models, report, servers, workloads
from .load import run_load
from .servers import REPO

HERE = Path(__file__).resolve().parent
PORT = 8390
log = logging.getLogger("bench.profile")

# Process title (as `ps` shows it) -> the role named in the report; first match wins.
ROLES: list[tuple[str, str]] = [
    ("ray::ProxyActor", "HTTP proxy actor"),
    ("ServeReplica:modelfleet:ingress", "ingress replica"),
    ("ServeReplica:modelfleet:llm", "LLM replica"),
    ("ServeReplica:", "other replicas"),
    ("ray::ServeController", "Serve controller"),
    ("haproxy", "HAProxy"),
    ("raylet", "raylet"),
    ("gcs_server", "GCS"),
    ("serve run", "serve run (driver)"),
    ("ray::", "other Ray workers"),
    ("/ray/", "other Ray daemons (dashboard, log monitor, ...)"),
]
# Python processes worth sampling (the rest are counted for CPU time only).
SAMPLED = {"HTTP proxy actor", "ingress replica", "LLM replica", "Serve controller", "serve run (driver)"}
# Innermost frame's file -> what the time was spent on; first match wins.
CATEGORIES: list[tuple[str, str]] = [
    ("/ray/serve/", "Ray Serve (router, proxy, replica wrapper)"),
    ("/ray/", "Ray core (actor calls, serialization, gRPC)"),
    ("_raylet", "Ray core (actor calls, serialization, gRPC)"),
    ("/torch/", "torch"),
    ("/transformers/", "transformers"),
    ("/tokenizers/", "tokenizers"),
    ("/pydantic", "pydantic"),
    ("/uvicorn/", "HTTP server (uvicorn/starlette/fastapi)"),
    ("/starlette/", "HTTP server (uvicorn/starlette/fastapi)"),
    ("/fastapi/", "HTTP server (uvicorn/starlette/fastapi)"),
    ("/h11/", "HTTP server (uvicorn/starlette/fastapi)"),
    ("/asyncio/", "asyncio event loop"),
    ("/grpc/", "Ray core (actor calls, serialization, gRPC)"),
]


def role_of(args: str) -> str | None:
    return next((role for needle, role in ROLES if needle in args), None)


def category_of(path: str) -> str:
    if _is_ours(path):
        return "modelfleet (deployments/, loading/)"
    return next((cat for needle, cat in CATEGORIES if needle in path), "other libraries")


def _stat(pid: int | str) -> tuple[str, list[str]]:
    """/proc/PID/stat as (comm, the fields after it: state is [0], so field N of proc(5) is [N - 3])."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every process in the session `serve run` was started in."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm, fields = _stat(entry.name)
            if int(fields[3]) != sid:  # field 6: session id
                continue
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            out[int(entry.name)] = args or comm
        except (OSError, ValueError):
            continue
    return out


def cpu_seconds(pid: int) -> float | None:
    try:
        _, fields = _stat(pid)
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14, 15: utime + stime


def _file(frame: str) -> str:
    return frame[frame.rfind("(") + 1:frame.rfind(")")] if "(" in frame else frame


def _is_stdlib(path: str) -> bool:
    return path.startswith("<frozen") or ("/lib/python3" in path and "site-packages" not in path)


def leaf_counts(raw: str) -> tuple[Counter, Counter, int, int]:
    """py-spy raw stacks -> (samples per category, per leaf function, total, samples with our code on the stack).

    A sample counts for the innermost frame outside the standard library: time in asyncio, threading
    or C code is charged to the library that called into it (py-spy without --native shows C time
    as the last Python frame).
    """
    by_category, by_leaf, total, ours = Counter(), Counter(), 0, 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        owner = next((f for f in reversed(frames) if not _is_stdlib(_file(f))), None)
        by_category[category_of(_file(owner)) if owner else "Python standard library only"] += n
        leaf = frames[-1]
        by_leaf[f"{leaf.split(' (')[0]}  ({_short_file(_file(leaf))})"] += n
        total += n
        if any(_is_ours(_file(f)) for f in frames):
            ours += n
    return by_category, by_leaf, total, ours


def _is_ours(path: str) -> bool:
    return path.startswith((f"{REPO}/deployments/", f"{REPO}/loading/"))


def _short_file(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    if path.startswith(f"{REPO}/"):
        return path[len(str(REPO)) + 1:]
    if "/lib/python3" in path:
        return path.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return path


def py_spy_binary() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy not found: pip install py-spy")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--proxy-modes", default="proxy-actor,default",
                   help=f"comma-separated, from {', '.join(servers.PROXY_MODES)}")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--seconds", type=float, default=20.0, help="length of each measured load window")
    p.add_argument("--results", type=Path, default=HERE / "PROFILE.md")
    args = p.parse_args(argv)
    modes = servers.parse_proxy_modes(args.proxy_modes)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    py_spy = py_spy_binary()

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = HERE / "runs" / f"profile-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    models.model_dirs(HERE / "runs" / "models")
    result: dict = {"meta": report.machine_meta(), "stamp": stamp,
                    "setting": vars(args) | {"results": str(args.results)},
                    "modes": {mode: profile_mode(mode, args, run_dir, py_spy) for mode in modes}}
    (run_dir / "profile.json").write_text(json.dumps(result, indent=1, default=str))
    args.results.write_text(markdown(result))
    log.info("wrote %s and %s", run_dir / "profile.json", args.results)
    return 0


def profile_mode(mode: str, args: argparse.Namespace, run_dir: Path, py_spy: str) -> dict:
    config = servers.bench_serve_config(PORT, HERE / "runs" / "models", None, only_llm=True)
    request = workloads.chat("tiny-llm", args.max_tokens)
    with servers.serve_run(config, run_dir, f"profile-{mode}", mode) as server:
        run_load(server.url, lambda i: request, args.clients, args.clients * 20)  # warm-up
        procs = {pid: a for pid, a in session_processes(server.process.pid).items() if role_of(a)}
        log.info("%s: profiling %d processes for %.0f s under %d clients", mode, len(procs), args.seconds,
                 args.clients)
        # Window 1: CPU time per process, nothing else running. Window 2: py-spy (it costs CPU).
        before = {pid: cpu_seconds(pid) for pid in procs}
        started = time.perf_counter()
        stats = run_load(server.url, lambda i: request, args.clients, 10**9, max_wall_s=args.seconds)
        wall = time.perf_counter() - started
        after = {pid: cpu_seconds(pid) for pid in procs}
        spies = {}
        for pid, cmd in procs.items():
            if role_of(cmd) not in SAMPLED:
                continue
            out = run_dir / f"py-spy-{mode}-{pid}.txt"
            spies[pid] = (out, subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)), "--rate", "200",
                 "--nonblocking", "--full-filenames", "--format", "raw", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        run_load(server.url, lambda i: request, args.clients, 10**9, max_wall_s=args.seconds + 2)
        for _, proc in spies.values():
            proc.wait(timeout=args.seconds + 30)
    done = stats.requests - stats.errors

    per_role: dict[str, dict] = defaultdict(lambda: {"cpu_s": 0.0, "processes": 0})
    for pid, cmd in procs.items():
        if before.get(pid) is None or after.get(pid) is None:
            continue
        entry = per_role[role_of(cmd)]
        entry["cpu_s"] += after[pid] - before[pid]
        entry["processes"] += 1
    profiles: dict[str, dict] = {}
    for pid, (out, _) in spies.items():
        if not out.exists():
            continue
        cats, leaves, total, ours = leaf_counts(out.read_text())
        profiles[role_of(procs[pid])] = {"samples": total, "ours_inclusive": ours,
                                         "categories": dict(cats.most_common()),
                                         "top_leaves": leaves.most_common(12)}
    return {"env": servers.PROXY_MODES[mode],
            "load": {"requests": done, "errors": stats.errors, "wall_s": wall, "rps": done / wall,
                     "p50_ms": stats.p50_ms, "p99_ms": stats.p99_ms},
            "cpu": {role: v | {"ms_per_request": 1000 * v["cpu_s"] / max(done, 1)} for role, v in per_role.items()},
            "profiles": profiles}


def markdown(r: dict) -> str:
    s, meta = r["setting"], r["meta"]
    lines = [
        "# Where a chat request's time goes",
        "",
        f"`python -m bench.profile --proxy-modes {s['proxy_modes']} --clients {s['clients']} "
        f"--max-tokens {s['max_tokens']} --seconds {s['seconds']:.0f}` on {r['stamp']} "
        f"(git {meta.get('git_commit', '?')}); {meta.get('cpus', '?')} CPUs ({meta.get('cpu', '?')}), device cpu, "
        "tiny LLM on one replica, closed-loop chat load. Proxy modes as in [RESULTS.md](RESULTS.md).",
        "",
        "**CPU per request** is what each process used during a load window (/proc utime+stime) divided by "
        "the requests answered. Their sum is the machine's CPU cost of one request; with 2 CPUs it caps "
        "requests/s near 2000 / total ms, whatever the model costs.",
        "",
        "**py-spy** samples a second window of the same load at 200 Hz (`--nonblocking`, idle threads "
        "excluded). A sample counts for the innermost frame outside the standard library (C time shows as "
        "the last Python frame). *modelfleet inclusive* = samples with a frame of `deployments/` or "
        "`loading/` anywhere on the stack (our code and what it calls, the model included).",
        "",
        "## CPU per request, by process",
        "",
        "| process | " + " | ".join(f"{m} (ms)" for m in r["modes"]) + " |",
        "|---|" + "---|" * len(r["modes"]),
    ]
    roles = sorted({role for m in r["modes"].values() for role in m["cpu"]},
                   key=lambda role: -max(m["cpu"].get(role, {}).get("ms_per_request", 0) for m in r["modes"].values()))
    for role in roles:
        cells = [f"{m['cpu'][role]['ms_per_request']:.2f}" if role in m["cpu"] else "-" for m in r["modes"].values()]
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    totals = [sum(v["ms_per_request"] for v in m["cpu"].values()) for m in r["modes"].values()]
    lines.append("| **all** | " + " | ".join(f"**{t:.1f}** (cap ≈ {2000 / t:.0f} req/s)" for t in totals) + " |")
    lines.append("| measured load | " + " | ".join(
        f"{m['load']['rps']:.1f} req/s, p50 {m['load']['p50_ms']:.0f} ms, {m['load']['errors']} errors"
        for m in r["modes"].values()) + " |")
    lines.append("")
    for mode, m in r["modes"].items():
        lines += [f"## py-spy, proxy mode {mode}", ""]
        for role, prof in sorted(m["profiles"].items(), key=lambda kv: -kv[1]["samples"]):
            n = max(prof["samples"], 1)
            lines += [f"### {role}: {prof['samples']} samples, modelfleet inclusive "
                      f"{100 * prof['ours_inclusive'] / n:.0f}%", "", "| time in | share |", "|---|---|"]
            lines += [f"| {cat} | {100 * c / n:.1f}% |" for cat, c in prof["categories"].items()]
            lines += ["", "<details><summary>top leaf functions</summary>", "", "| function | share |", "|---|---|"]
            lines += [f"| `{leaf}` | {100 * c / n:.1f}% |" for leaf, c in prof["top_leaves"]]
            lines += ["", "</details>", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
