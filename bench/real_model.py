"""python -m bench.real_model: the LLM rows of bench/REAL_MODEL.md, alone (~10 min on 2 cores).

The demo's real chat model (SmolLM2-135M-Instruct, converted once from its GGUF file into
bench/runs/models) served by ours, the hand-written lock server and `transformers serve
--continuous-batching`, each alone on the machine, at 1, 16 and 64 clients and 16 streaming clients (time to
first token); greedy, max_tokens=16; the peak RSS of each server's whole process tree (ours: `serve run`
and the Ray cluster it starts) during each level.
`python -m bench --model-size smollm2-135m` measures the same and more (STT/TTS, cold start, every
peer) in ~26 min. Writes bench/runs/real-rerun.json and prints the rows.

`--dtype bfloat16` runs every server with bf16 weights (ours packs them for oneDNN where the CPU
multiplies bf16 natively, loading/cpu_kernels.py) and writes bench/runs/real-rerun-bfloat16.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from . import models, servers, throughput
from .memory import Sampler

HERE = Path(__file__).resolve().parent
CONCURRENCY, MAX_TOKENS, REQUESTS_PER_CLIENT, MIN_REQUESTS = [1, 16, 64], 16, 6, 30
STREAM_CONCURRENCY = 16


def sweep(server, model: str) -> list[dict]:
    """Each level (plain, then streamed; llm_sweep warms each up) with the server's peak RSS while it ran."""
    rows = []
    sampler = Sampler({"server": server.process.pid}, interval=0.25)
    sampler.start()
    try:
        for clients, stream in [*((c, False) for c in CONCURRENCY), (STREAM_CONCURRENCY, True)]:
            phase = f"{clients}{' stream' if stream else ''}"
            sampler.set_phase(phase)
            row = throughput.llm_sweep(server.url, model, [clients], MAX_TOKENS, REQUESTS_PER_CLIENT, MIN_REQUESTS,
                                       stream=stream)[0]
            rows.append({**row, "stream": stream, "peak_rss_mb": round(sampler.peak_mb(phase, "server") or 0)})
    finally:
        sampler.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="the chat model's weights dtype in every server (auto: each server's default)")
    dtype = parser.parse_args(argv).dtype
    suffix = "" if dtype == "auto" else f"-{dtype}"
    run_dir = HERE / "runs" / f"real-rerun{suffix}"
    run_dir.mkdir(parents=True, exist_ok=True)
    dirs = models.model_dirs(HERE / "runs" / "models", "smollm2-135m")
    out: dict = {"conversion": dict(models.CONVERSION), "load_average": {}, "dtype": dtype}

    out["load_average"]["ours"] = round(os.getloadavg()[0], 2)
    config = servers.bench_serve_config(8300, HERE / "runs" / "models", dirs["llm"], device="auto")
    for spec in config["applications"][0]["args"]["models"]:
        if spec["name"] == "tiny-llm":
            spec["dtype"] = dtype
    with servers.serve_run(config, run_dir, "default") as server:
        out["ours_cold_start"] = {k: v for k, v in server.timings.items() if k != "health"}
        out["ours_load_seconds"] = server.timings["health"]["models"]["tiny-llm"].get("load_seconds")
        out["ours_kernels"] = server.timings["health"]["models"]["tiny-llm"].get("kernels")
        out["ours"] = sweep(server, "tiny-llm")
    out["load_average"]["lock"] = round(os.getloadavg()[0], 2)
    with servers.lock_server("llm", dirs["llm"], 8311, run_dir, dtype) as server:
        out["lock"] = sweep(server, "tiny-llm")
    out["load_average"]["tf_cb"] = round(os.getloadavg()[0], 2)
    with servers.transformers_serve(dirs["llm"], 8321, run_dir, True, dtype) as server:
        out["tf_cb"] = sweep(server, str(dirs["llm"]))
    out["load_average"]["end"] = round(os.getloadavg()[0], 2)
    (HERE / "runs" / f"real-rerun{suffix}.json").write_text(json.dumps(out, indent=1, default=str))
    for name in ("ours", "lock", "tf_cb"):
        for row in out[name]:
            print(f"{name:6s} clients {row['concurrency']:3d}{' stream' if row['stream'] else '       '}  "
                  f"{row['rps']:.2f} req/s  {row['tokens_per_s']:.1f} tok/s  p50 {row['p50_ms']:.0f} ms  "
                  f"p99 {row['p99_ms']:.0f} ms  ttft p50 {row['ttft_p50_ms']} ms  errors {row['errors']}  "
                  f"peak RSS {row['peak_rss_mb']} MB")
    print("load average", out["load_average"], "ours load_seconds", out["ours_load_seconds"],
          "kernels", out["ours_kernels"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
