"""What our app costs the machine at rest, and what that does to one client's latency.

    python -m bench.idle --model-size smollm2-135m --rounds 3 --lock \
        --variant "ray-defaults:RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.1,RAY_SERVE_METRICS_EXPORT_INTERVAL_MS=100"

Each round starts every variant in turn, alone on the machine (`serve run` under serve.env plus the variant's
settings; `--lock`: the hand-written lock server too), and measures:
- CPU at rest, per process of the server's session, over `--idle-s` seconds after a warm-up: Ray's controller,
  GCS, raylet, dashboard, HAProxy and every replica wake up on timers of their own;
- one client's chats (greedy, `--max-tokens`), plain and streamed: latency p50 and time to first token.

On 2 cores a forward computed on both (torch's threads meet at a barrier after each operation) waits for
whichever thread a background wake-up has delayed, so the server's own work at rest shows in its latency.
`--in-process` measures that alone: one chat at a time through the decode loop in this process (the replica's
code, no Ray, no HTTP), alternately with and without `--background-cores` of small CPU bursts in other
processes, as Ray's timers make.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing
import os
import statistics
import time
from pathlib import Path

from . import report, servers, workloads
from .load import run_load

HERE = Path(__file__).resolve().parent
log = logging.getLogger("bench.idle")
TICKS = os.sysconf("SC_CLK_TCK")


def at_rest(server: servers.Server, seconds: float) -> dict:
    """Cores used at rest by the server's processes (by process name, summed), over `seconds`."""
    before = servers.session_cpu(server.process.pid)
    time.sleep(seconds)
    after = servers.session_cpu(server.process.pid)
    by_name: dict[str, float] = {}
    for pid, (name, ticks) in after.items():
        if pid in before:
            by_name[name] = by_name.get(name, 0.0) + (ticks - before[pid][1]) / TICKS / seconds
    return {"cores": round(sum(by_name.values()), 3),
            "by_process": {k: round(v, 3) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])}}


def one_client(server: servers.Server, model: str, requests: int, max_tokens: int) -> dict:
    plain = run_load(server.url, workloads.numbered_chat(server.url, model, max_tokens, False), 1, requests).as_dict()
    streamed = run_load(server.url, workloads.numbered_chat(server.url, model, max_tokens, True), 1, requests).as_dict()
    return {"p50_ms": plain["p50_ms"], "stream_ttft_p50_ms": streamed["ttft_p50_ms"],
            "stream_p50_ms": streamed["p50_ms"], "errors": plain["errors"] + streamed["errors"]}


def _bursts(share: float, stop, priority: str = "0") -> None:
    """Busy `share` of every 10 ms, asleep the rest: a process of timers at `share` of a core.

    `priority`: a nice value, or "idle" for SCHED_IDLE (what Ray's daemons could be given)."""
    if priority == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(int(priority))
    while not stop.is_set():
        started = time.perf_counter()
        while time.perf_counter() - started < 0.01 * share:
            pass
        time.sleep(0.01 * (1 - share))


def in_process(model_dir: Path, threads: int, background_cores: float, rounds: int, requests: int,
               max_tokens: int, background_priority: str = "0") -> dict:
    """p50 of one chat at a time through the decode loop, without and with a background, alternated by round."""
    import torch

    from deployments.chat_encoding import encode_text_chat
    from deployments.decode_loop import DecodeLoop
    from deployments.options import ChatOptions
    from deployments.params import ChatParams
    from loading import ModelSpec, load_model

    torch.set_num_threads(threads)
    spec = ModelSpec(name="tiny-llm", source=str(model_dir), family="llm", max_new_tokens=max_tokens)
    loaded = load_model(spec)
    decoder = DecodeLoop.for_options(ChatOptions(), {"model_calls": 0, "requests": 0, "largest_batch": 0})
    numbers = itertools.count(workloads.OVERHEAD_NUMBERS)

    def chat() -> float:
        body = workloads.chat_body(spec.name, max_tokens, request=next(numbers))
        params = ChatParams(model=spec.name, messages=body["messages"], max_new_tokens=max_tokens, temperature=0)
        params.inputs = encode_text_chat(loaded.tokenizer, params)
        results: list = []
        started = time.perf_counter()
        decoder.submit(spec, loaded, params, results.append)
        decoder.run()
        if isinstance(results[0], BaseException):
            raise results[0]
        return time.perf_counter() - started

    chat()
    out: dict = {"threads": threads, "background_cores": background_cores,
                 "background_priority": background_priority, "quiet_ms": [], "background_ms": []}
    processes = max(1, round(background_cores / 0.1))  # bursts of 1 ms in 10 from each
    for _ in range(rounds):
        out["quiet_ms"].append(round(statistics.median(chat() for _ in range(requests)) * 1000, 1))
        stop = multiprocessing.Event()
        share = background_cores / processes
        burners = [multiprocessing.Process(target=_bursts, args=(share, stop, background_priority))
                   for _ in range(processes)]
        for burner in burners:
            burner.start()
        try:
            out["background_ms"].append(round(statistics.median(chat() for _ in range(requests)) * 1000, 1))
        finally:
            stop.set()
            for burner in burners:
                burner.join()
    out["ratio"] = round(statistics.median(out["background_ms"]) / statistics.median(out["quiet_ms"]), 3)
    return out


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """"name:KEY=VALUE,KEY=VALUE" (or just "name") -> (name, settings over serve.env)."""
    name, _, settings = text.partition(":")
    pairs = [item.split("=", 1) for item in settings.split(",") if item]
    return name, {key: value for key, value in pairs}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="our app under serve.env plus these settings (repeatable); `default` (serve.env as it is) "
                   "is always measured")
    p.add_argument("--lock", action="store_true", help="measure the hand-written lock server too")
    p.add_argument("--model-size", default="tiny", choices=["tiny", "small", "smollm2-135m", "0.5b"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=16, help="chats per figure")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--idle-s", type=float, default=30.0)
    p.add_argument("--in-process", action="store_true", help="the decode loop in this process, with and without "
                   "--background-cores of bursts (no server)")
    p.add_argument("--background-cores", type=float, default=0.2)
    p.add_argument("--background-priority", default="0",
                   help='the bursts\' nice value, or "idle" for SCHED_IDLE (--in-process)')
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (--in-process)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run = servers.start_run("idle", args.model_size)
    stamp, run_dir, root, dirs = run.stamp, run.dir, run.models_root, run.dirs
    if args.in_process:
        measured = in_process(dirs["llm"], args.threads, args.background_cores, args.rounds, args.requests,
                              args.max_tokens, args.background_priority)
        (HERE / "runs" / f"idle-inprocess-{stamp}.json").write_text(json.dumps(
            {"meta": report.machine_meta(), "setting": vars(args), **measured}, indent=1))
        print(json.dumps(measured))
        return 0
    variants = dict([("default", {})] + [parse_variant(v) for v in args.variant])
    result: dict = {"meta": report.machine_meta(), "setting": vars(args), "variants": variants, "rounds": []}
    for i in range(args.rounds):
        entry = {}
        for name, settings in variants.items():
            mode = servers.mode_with(f"idle-{name}", settings)
            config = servers.bench_serve_config(8300, root, run.llm_dir, device=run.device)
            with servers.serve_run(config, run_dir, name, mode=mode) as server:
                one_client(server, "tiny-llm", 3, args.max_tokens)  # warm-up
                time.sleep(5)
                entry[name] = {"at_rest": at_rest(server, args.idle_s),
                               **one_client(server, "tiny-llm", args.requests, args.max_tokens),
                               "load_average": os.getloadavg()[0]}
            log.info("round %d, %s: %s", i + 1, name, {k: v for k, v in entry[name].items() if k != "at_rest"}
                     | {"at_rest_cores": entry[name]["at_rest"]["cores"]})
        if args.lock:
            with servers.lock_server("llm", dirs["llm"], 8311, run_dir) as server:
                one_client(server, "tiny-llm", 3, args.max_tokens)
                time.sleep(5)
                entry["lock server"] = {"at_rest": at_rest(server, args.idle_s),
                                        **one_client(server, "tiny-llm", args.requests, args.max_tokens),
                                        "load_average": os.getloadavg()[0]}
            log.info("round %d, lock server: p50 %.0f ms", i + 1, entry["lock server"]["p50_ms"])
        result["rounds"].append(entry)
    out = HERE / "runs" / f"idle-{stamp}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    names = list(result["rounds"][0])
    lines = ["| server | round | at rest (cores) | 1 client p50 (ms) | stream TTFT p50 (ms) | stream p50 (ms) |",
             "|---|---:|---:|---:|---:|---:|"]
    for i, entry in enumerate(result["rounds"]):
        for name in names:
            m = entry[name]
            lines.append(f"| {name} | {i + 1} | {m['at_rest']['cores']:.3f} | {m['p50_ms']:.0f} | "
                         f"{m['stream_ttft_p50_ms']:.0f} | {m['stream_p50_ms']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
