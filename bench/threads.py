"""Threads per model: what torch's intra-op threads buy and cost by model size, and through Serve.

    python -m bench.threads [--sizes tiny,small,smollm2-135m] [--serve]

In-process (no Ray): the decode loop (deployments/decode_loop.py) in a closed loop of 1 and 16
clients, greedy, 16 tokens, on 1 thread and on every core: req/s, p50 latency, and the CPU seconds
the process burned per request (all its threads: an idle OpenMP thread spins after every operation
and that time is gone for the other replicas). `--serve`: the tiny test LLM through `serve run`
(the bench's config) with `torch_threads` pinned to the cores against the default, which computes
a model under `single_thread_below_params` on one thread (deployments/threads.py).
Writes bench/THREADS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import models
from bench.continuous import Continuous, measure
from loading import ModelSpec, load_model

HERE = Path(__file__).resolve().parent
MAX_TOKENS = 16


def in_process(model_dir: Path, threads: int, clients: int, requests: int, rounds: int) -> dict:
    """One setting in a fresh process: torch's thread pools do not start over within one (a count set
    after another was used measured 2x slower for the same setting in a fresh process)."""
    out = subprocess.run([sys.executable, "-m", "bench.threads", "--one",
                          json.dumps([str(model_dir), threads, clients, requests, rounds])],
                         capture_output=True, text=True, check=True, cwd=HERE.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _one(model_dir: str, threads: int, clients: int, requests: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    spec = ModelSpec(name="m", source=str(model_dir), max_new_tokens=MAX_TOKENS)
    loaded = load_model(spec)
    engine = Continuous(spec, loaded, 16)
    measure(engine, loaded, clients, min(8, requests), MAX_TOKENS)  # warm up
    runs = []
    for _ in range(rounds):
        cpu = time.process_time()
        row = measure(engine, loaded, clients, requests, MAX_TOKENS)
        row["cpu_ms_per_request"] = (time.process_time() - cpu) * 1000 / requests
        runs.append(row)
    row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    row["parameters"] = sum(p.numel() for p in loaded.model.parameters())
    return row


def through_serve(cores: int) -> list[tuple[str, int, dict]]:
    from bench import servers, throughput

    run_dir = HERE / "runs" / "threads"
    run_dir.mkdir(parents=True, exist_ok=True)
    base = servers.bench_serve_config(8395, HERE / "runs" / "models", None)
    out = []
    for label, pinned in ((f"torch_threads: {cores}", cores), ("default (1 for this model)", None)):
        config = copy.deepcopy(base)
        if pinned is not None:
            config["applications"][0]["args"]["families"]["llm"]["torch_threads"] = pinned
        with servers.serve_run(config, run_dir, "pinned" if pinned else "default") as server:
            for row in throughput.llm_sweep(server.url, "tiny-llm", [1, 16], MAX_TOKENS, 20, 40):
                out.append((label, row["concurrency"], row))
                print(label, row["concurrency"], round(row["rps"], 1), round(row["p50_ms"], 1), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small,smollm2-135m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", action="store_true", help="also the tiny LLM through serve run")
    parser.add_argument("--results", type=Path, default=HERE / "THREADS.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one in-process setting (JSON arguments)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_one(*json.loads(args.one))), flush=True)
        os._exit(0)  # the engine's daemon thread would abort the interpreter's teardown (SIGABRT)
    cores = len(os.sched_getaffinity(0))
    rows = []
    for size in args.sizes.split(","):
        model_dir = models.model_dirs(HERE / "runs" / "models", size)["llm"]
        for clients in (1, 16):
            requests = 12 if size == "smollm2-135m" and clients == 1 else 32 if size == "smollm2-135m" else 96
            for threads in sorted({1, cores}):
                row = in_process(model_dir, threads, clients, requests, args.rounds)
                rows.append((size, clients, threads, row))
                print(size, clients, threads, {k: round(v, 3) for k, v in row.items()}, flush=True)
    served = through_serve(cores) if args.serve else []
    lines = ["# Threads per model\n",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, `python -m bench.threads"
             f"{' --serve' if args.serve else ''}`, {cores} cores, load average {os.getloadavg()[0]:.1f} at the end. "
             f"Greedy chats of up to {MAX_TOKENS} tokens, closed loop, median of {args.rounds} rounds.\n",
             "## In-process: the decode loop alone\n",
             "CPU ms/request counts every thread of the process: what the other replicas of the node lose. "
             "The default `single_thread_below_params` (5M) computes the tiny model on one thread and the others "
             "on every core of the node.\n",
             "| model | parameters | clients | threads | req/s | p50 latency (ms) | CPU ms/request |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for size, clients, threads, row in rows:
        lines.append(f"| {size} | {row['parameters'] / 1e6:.2f}M | {clients} | {threads} | {row['req_s']:.1f} | "
                     f"{row['p50_s'] * 1000:.1f} | {row['cpu_ms_per_request']:.1f} |")
    if served:
        lines += ["", "## Through `serve run`: the tiny LLM (the bench's config, every family running)\n",
                  "| LLM replica | clients | req/s | p50 (ms) | p99 (ms) |", "|---|---:|---:|---:|---:|"]
        for label, clients, row in served:
            lines.append(f"| {label} | {clients} | {row['rps']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} |")
    args.results.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
