"""python -m bench.real_model: the LLM rows of bench/REAL_MODEL.md, alone (~10 min on 2 cores).

The demo's real chat model (SmolLM2-135M-Instruct, converted once from its GGUF file into
bench/runs/models) served by ours, the hand-written lock server and `transformers serve
--continuous-batching`, each alone on the machine, at 1 and 16 clients; greedy, max_tokens=16.
`python -m bench --model-size smollm2-135m` measures the same and more (STT/TTS, cold start, every
peer) in ~26 min. Writes bench/runs/real-rerun.json and prints the rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import models, servers, throughput

HERE = Path(__file__).resolve().parent
CONCURRENCY, MAX_TOKENS, REQUESTS_PER_CLIENT, MIN_REQUESTS = [1, 16], 16, 6, 30


def main() -> int:
    run_dir = HERE / "runs" / "real-rerun"
    run_dir.mkdir(parents=True, exist_ok=True)
    dirs = models.model_dirs(HERE / "runs" / "models", "smollm2-135m")
    out: dict = {"conversion": dict(models.CONVERSION), "load_average": {}}
    sweep = (CONCURRENCY, MAX_TOKENS, REQUESTS_PER_CLIENT, MIN_REQUESTS)

    out["load_average"]["ours"] = round(os.getloadavg()[0], 2)
    config = servers.bench_serve_config(8300, HERE / "runs" / "models", dirs["llm"], device="auto")
    with servers.serve_run(config, run_dir, "default", {}) as server:
        out["ours_cold_start"] = {k: v for k, v in server.timings.items() if k != "health"}
        out["ours_load_seconds"] = server.timings["health"]["models"]["tiny-llm"].get("load_seconds")
        out["ours"] = throughput.llm_sweep(server.url, "tiny-llm", *sweep)
    out["load_average"]["lock"] = round(os.getloadavg()[0], 2)
    with servers.lock_server("llm", dirs["llm"], 8311, run_dir) as server:
        out["lock"] = throughput.llm_sweep(server.url, "tiny-llm", *sweep)
    out["load_average"]["tf_cb"] = round(os.getloadavg()[0], 2)
    with servers.transformers_serve(dirs["llm"], 8321, run_dir, True) as server:
        out["tf_cb"] = throughput.llm_sweep(server.url, str(dirs["llm"]), *sweep)
    out["load_average"]["end"] = round(os.getloadavg()[0], 2)
    (HERE / "runs" / "real-rerun.json").write_text(json.dumps(out, indent=1, default=str))
    for name in ("ours", "lock", "tf_cb"):
        for row in out[name]:
            print(f"{name:6s} clients {row['concurrency']:3d}  {row['rps']:.2f} req/s  "
                  f"{row['tokens_per_s']:.1f} tok/s  p50 {row['p50_ms']:.0f} ms  p99 {row['p99_ms']:.0f} ms  "
                  f"errors {row['errors']}")
    print("load average", out["load_average"], "ours load_seconds", out["ours_load_seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
