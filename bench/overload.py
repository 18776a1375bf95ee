"""More streaming clients than a replica takes at once: where the requests wait, and what it costs.

    python -m bench.overload [--max-ongoing 64,256] [--loads closed:16,closed:64,closed:100,closed:160,open:140]
    python -m bench.overload --family vlm --max-ongoing 8,32 --loads closed:4,closed:8,closed:24,closed:36
    python -m bench.overload --family tts --max-ongoing 32,80 --loads closed:8,closed:32,closed:48,closed:80
    python -m bench.overload --setting max_batch_size --values 32,64 --loads closed:16,closed:64,closed:100

Our app through `serve run` (the bench's config, tiny models, one replica per family), once per value of
the family's `max_ongoing_requests` (or of the option `--setting` names). Each load sends `--requests`
requests: for the LLM streamed chats of 32 tokens, for the VLM (`--family vlm`) chats about a small
image (16 tokens, not streamed), for STT and TTS the bench's transcription and speech requests.
`closed:N` from N closed-loop clients, `open:R` arriving at R per second (Poisson, bench/load.py). Per load: req/s
answered, time to first token p50/p99 (streams), latency p50, errors (with the first one), and the
cores the server's processes used.

Past `max_ongoing_requests`, requests wait in the ingress's Ray router, which retries a full replica
with backoff of up to 0.5 s (RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S): a place that frees in the replica
stays empty until a retry comes. Below it they wait in the replica's decode loop, which fills a freed
place at its next step. Writes bench/runs/overload-<stamp>.{json,md}; bench/OVERLOAD.md is the curated
record.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from . import report, servers, workloads
from .load import Request, run_load, run_open_loop
from .paired import with_settings
from .servers import session_cpu_s

HERE = Path(__file__).resolve().parent
log = logging.getLogger("bench.overload")


_WAV = workloads.wav_bytes()
WORKLOADS = {  # family -> (server url -> a request of its load)
    # the chats numbered from the server's running count: no load resends a question it has answered
    "llm": lambda url: workloads.numbered_chat(url, "tiny-llm", 32, stream=True),
    "vlm": lambda url: lambda i: workloads.image_chat("tiny-llava", 16),
    "stt": lambda url: lambda i: workloads.transcription("tiny-whisper", _WAV),
    "tts": lambda url: lambda i: workloads.speech("tiny-vits"),
}


def measure(server: servers.Server, load: str, requests: int, make: Callable[[int], Request]) -> dict:
    mode, _, amount = load.partition(":")
    if mode not in ("closed", "open") or not amount:
        raise SystemExit(f"--loads {load!r}: expected closed:CLIENTS or open:RATE, e.g. closed:100 or open:140")

    before, started = session_cpu_s(server.process.pid), time.perf_counter()
    stats = (run_load(server.url, make, int(amount), requests, max_wall_s=600) if mode == "closed"
             else run_open_loop(server.url, make, float(amount), requests)).as_dict()
    stats["cores"] = round((session_cpu_s(server.process.pid) - before) / (time.perf_counter() - started), 2)
    return stats


def markdown(result: dict) -> str:
    family = result["family"]
    lines = [f"# Overload: {result['requests']} requests per load, {family}; {result['meta'].get('cpu')}, "
             f"{result['meta'].get('cpus')} CPUs; git {result['meta'].get('git_commit')}", "",
             f"| {family} {result['setting']} | load | req/s | TTFT p50 (ms) | TTFT p99 (ms) | latency p50 (ms) | "
             "errors | cores |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        s = run["stats"]
        lines.append(f"| {run['value']} | {run['load']} | {s['rps']:.1f} | {s['ttft_p50_ms'] or 0:.0f} | "
                     f"{s['ttft_p99_ms'] or 0:.0f} | {s['p50_ms'] or 0:.0f} | {s['errors']} | {s['cores']} |")
    errors = {f"{r['value']} {r['load']}": r["stats"]["first_error"] for r in result["runs"]
              if r["stats"]["errors"]}
    if errors:
        lines += ["", "First errors:", ""] + [f"- {k}: `{v[:200]}`" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.splitlines()[0])
    p.add_argument("--family", default="llm", choices=sorted(WORKLOADS))
    p.add_argument("--setting", default="max_ongoing_requests", help="the family option to vary")
    p.add_argument("--max-ongoing", "--values", dest="values", default="64,256", help="the values of --setting")
    p.add_argument("--loads", default="closed:16,closed:64,closed:100,closed:160,open:140")
    p.add_argument("--requests", type=int, default=800, help="requests per load")
    args = p.parse_args(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = HERE / "runs" / f"overload-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    root = HERE / "runs" / "models"
    result: dict = {"meta": report.machine_meta(), "family": args.family, "setting": args.setting,
                    "requests": args.requests, "runs": []}
    for value in [int(v) for v in args.values.split(",")]:
        config = with_settings(servers.bench_serve_config(8300, root, None, device="cpu"),
                               [f"families.{args.family}.{args.setting}={value}"])
        with servers.serve_run(config, run_dir, f"{args.setting}-{value}") as server:
            make = WORKLOADS[args.family](server.url)
            run_load(server.url, make, 2, 6)  # warm-up
            for load in args.loads.split(","):
                stats = measure(server, load, args.requests, make)
                log.info("%s %s %d, %s: %.1f req/s, TTFT p50 %s ms, %d errors", args.family, args.setting, value,
                         load, stats["rps"], stats["ttft_p50_ms"], stats["errors"])
                result["runs"].append({"value": value, "load": load, "stats": stats})
    out = HERE / "runs" / f"overload-{stamp}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(result))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
