"""python -m bench.replicas: replicas of one family on one CPU node (~20 min on 2 cores).

1. Pinned: the real chat model (SmolLM2-135M-Instruct) on one LLM replica against two on the same
   node (`max_replicas_per_node: 2`), 16 clients and 1 client, greedy, max_tokens=16.
2. serve_config.yaml's LLM autoscaling (min 1, max 2 replicas) under 64 clients, in windows of about
   a minute: with the default `max_replicas_per_node` (1 for CPU replicas), and with 2 (what the
   autoscaler did before that default: it placed the second replica beside the first).
Writes bench/REPLICAS.md and bench/runs/replicas.json.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import models, report, servers, throughput

HERE = Path(__file__).resolve().parent
MAX_TOKENS, WINDOWS, WINDOW_S = 16, 4, 60
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 5, "metrics_interval_s": 1}


def config_with(llm_dir: Path, **llm_options) -> dict:
    config = servers.bench_serve_config(8310, HERE / "runs" / "models", llm_dir)
    config["applications"][0]["args"]["families"]["llm"].update(llm_options)
    return config


def llm_replicas() -> dict:
    """Serve's replica states of the LLM deployment (`serve status` against the running cluster)."""
    out = subprocess.run([str(Path(sys.executable).with_name("serve")), "status"], capture_output=True, text=True,
                         env={**os.environ, "RAY_ADDRESS": "auto"}, timeout=60).stdout
    try:
        return yaml.safe_load(out)["applications"]["modelfleet"]["deployments"]["llm"]["replica_states"]
    except (TypeError, KeyError, yaml.YAMLError):
        return {}


def pinned(llm_dir: Path, replicas: int, run_dir: Path) -> dict:
    scaling = None if replicas == 1 else {"min_replicas": replicas, "max_replicas": replicas}
    config = config_with(llm_dir, autoscaling=scaling, max_replicas_per_node=replicas)
    with servers.serve_run(config, run_dir, f"pinned-{replicas}") as server:
        time.sleep(3)
        many = throughput.llm_sweep(server.url, "tiny-llm", [16], MAX_TOKENS, 6, 30)[0]
        one = throughput.llm_sweep(server.url, "tiny-llm", [1], MAX_TOKENS, 10, 10)[0]
        return {"replicas": replicas, "states": llm_replicas(), "16": many, "1": one}


def autoscaled(llm_dir: Path, per_node: int | None, run_dir: Path) -> dict:
    options: dict = {"autoscaling": AUTOSCALING}
    if per_node is not None:
        options["max_replicas_per_node"] = per_node
    with servers.serve_run(config_with(llm_dir, **options), run_dir, f"autoscaled-{per_node}") as server:
        throughput.llm_sweep(server.url, "tiny-llm", [16], MAX_TOKENS, 1, 16)
        windows = []
        for _ in range(WINDOWS):
            row = throughput.llm_sweep(server.url, "tiny-llm", [64], MAX_TOKENS, 2, 128, max_wall_s=WINDOW_S)[0]
            windows.append({**row, "states": llm_replicas()})
        return {"max_replicas_per_node": per_node, "windows": windows}


def markdown(result: dict) -> str:
    lines = [
        "# Replicas of one family on one CPU node", "",
        report.run_line(result, "python -m bench.replicas") +
        f"SmolLM2-135M-Instruct (float32), greedy, max_tokens={MAX_TOKENS}, closed loop; each replica computes "
        "with torch_threads' default (every core of the node).", "",
        "## Pinned replicas", "",
        "| LLM replicas on the node | 16 clients req/s | p50 (ms) | 1 client p50 (ms) | errors |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in result["pinned"]:
        lines.append(f"| {row['replicas']} | {row['16']['rps']:.2f} | {row['16']['p50_ms']:.0f} | "
                     f"{row['1']['p50_ms']:.0f} | {row['16']['errors'] + row['1']['errors']} |")
    lines += ["", f"## serve_config.yaml's autoscaling (min 1, max 2) under 64 clients, windows of ~{WINDOW_S} s", "",
              "| max_replicas_per_node | window | req/s | p50 (ms) | errors | LLM replicas after it |",
              "|---|---:|---:|---:|---:|---|"]
    for run in result["autoscaled"]:
        label = "default (1 on CPU)" if run["max_replicas_per_node"] is None else str(run["max_replicas_per_node"])
        for i, row in enumerate(run["windows"]):
            states = ", ".join(f"{k} {v}" for k, v in sorted(row["states"].items())) or "?"
            lines.append(f"| {label} | {i + 1} | {row['rps']:.2f} | {row['p50_ms']:.0f} | {row['errors']} | {states} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    run_dir = HERE / "runs" / "replicas"
    run_dir.mkdir(parents=True, exist_ok=True)
    llm_dir = models.model_dirs(HERE / "runs" / "models", "smollm2-135m")["llm"]
    meta = report.machine_meta()
    result = report.stamped(meta, pinned=[pinned(llm_dir, n, run_dir) for n in (1, 2)],
                            autoscaled=[autoscaled(llm_dir, per_node, run_dir) for per_node in (None, 2)])
    report.write(result, HERE / "runs" / "replicas.json", HERE / "REPLICAS.md", markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
