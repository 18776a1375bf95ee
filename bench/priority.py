"""What `scheduling_policy: priority` buys: a few urgent clients among many background ones.

    python -m bench.priority [--model-size smollm2-135m] [--background 48] [--urgent 8] [--seconds 60]

Our app through `serve run` (the bench's config: the LLM family alone, one replica, the demo's
max_batch_size 32 and max_ongoing_requests 64), closed loop: `--background` clients send priority 0
and `--urgent` clients priority -1, at once, for `--seconds`; greedy chats of 16 tokens, each its own
question. Run once with the family's `scheduling_policy: fcfs` (the urgent clients then send 0, as
they must there) and once with `priority`. Per class: req/s and latency percentiles. With more clients
than batch places, a request waits for a place; the policy decides who waits. The clients stay below
max_ongoing_requests: past it, requests wait in Ray's router, in arrival order (at 56 + 8 clients the
urgent p50 was 7.3 s against 7.8 s under fcfs; at 48 + 8, 5.7 s against 9.0 s for the others). Writes
bench/runs/priority-<stamp>.json and prints the rows (bench/PRIORITY.md is the curated record).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import requests

from . import models, report, servers, workloads
from .load import Request, Stats, run_load

HERE = Path(__file__).resolve().parent
PORT = 8395
MAX_TOKENS = 16


def chat(priority: int, offset: int):
    def make(i: int) -> Request:
        body = workloads.chat_body("tiny-llm", MAX_TOKENS, request=offset + i)
        body["priority"] = priority
        return Request("/v1/chat/completions", json=body)

    return make


def mixed_load(url: str, background: int, urgent: int, urgent_priority: int, seconds: float) -> dict[str, Stats]:
    """Both classes at once, each closed-loop, from their own threads."""
    out: dict[str, Stats] = {}
    classes = {"background": (background, 0, 0), "urgent": (urgent, urgent_priority, 10**6)}

    def run(name: str) -> None:
        clients, priority, offset = classes[name]
        out[name] = run_load(url, chat(priority, offset), clients, 10**9, max_wall_s=seconds)

    threads = [threading.Thread(target=run, args=(name,)) for name in classes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.priority", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", default="smollm2-135m", choices=["tiny", "smollm2-135m"])
    parser.add_argument("--background", type=int, default=48)
    parser.add_argument("--urgent", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = HERE / "runs" / f"priority-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    dirs = models.model_dirs(HERE / "runs" / "models", args.model_size)
    llm_dir = None if args.model_size == "tiny" else dirs["llm"]
    result: dict = {"meta": report.machine_meta(), "setting": vars(args), "policies": {}}
    for policy, urgent_priority in (("fcfs", 0), ("priority", -1)):
        config = servers.bench_serve_config(PORT, HERE / "runs" / "models", llm_dir, device="auto", only_llm=True)
        config["applications"][0]["args"]["families"]["llm"]["scheduling_policy"] = policy
        with servers.serve_run(config, run_dir, policy) as server:
            run_load(server.url, chat(0, 10**7), 16, 32)  # warm-up
            started = time.perf_counter()
            load = mixed_load(server.url, args.background, args.urgent, urgent_priority, args.seconds)
            wall = time.perf_counter() - started
            batching = requests.get(server.url + "/health", timeout=10).json()["models"]["tiny-llm"]
        result["policies"][policy] = {"wall_s": round(wall, 1), "batching": batching["replica"]["batching"],
                                      **{name: stats.as_dict() for name, stats in load.items()}}
    (run_dir / "priority.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"{args.model_size}: {args.background} background clients (priority 0) + {args.urgent} urgent, "
          f"{args.seconds:.0f} s per policy; raw {run_dir / 'priority.json'}")
    for policy, rows in result["policies"].items():
        for name in ("urgent", "background"):
            row = rows[name]
            print(f"{policy:8s} {name:10s} {row['rps']:.2f} req/s  p50 {row['p50_ms']:.0f} ms  "
                  f"p99 {row['p99_ms']:.0f} ms  mean {row['mean_ms']:.0f} ms  errors {row['errors']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
