"""python -m bench: the whole benchmark in one command; figures go to a JSON file and RESULTS.md.

    python -m bench                      # full run (~15 min on 2 cores), writes bench/RESULTS.md
    python -m bench --smoke              # CI setting: concurrency 1 and 4, few requests, ~3 min
    python -m bench --only overhead,cold_start --proxy-modes default
    python -m bench --model-size 0.5b    # Qwen2.5-0.5B-shaped random LLM (for a GPU machine)
    python -m bench --model-size smollm2-135m   # the demo's real chat model (converted from its GGUF)

Every server runs alone on 127.0.0.1:8300-8399 while it is measured; ratios are taken within one
run, since absolute times drift on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from . import cold_start, models, overhead, report, routes, servers, throughput, workloads
from .servers import PROXY_MODES

SECTIONS = ("overhead", "throughput", "cold_start", "peers", "routes")
HERE = Path(__file__).resolve().parent
PORT_OURS, PORT_NOBATCH, PORT_LOCK, PORT_TF = 8300, 8301, 8311, 8321

log = logging.getLogger("bench")
LOADAVG: list = []  # (section, 1-min load average when it started): a busy machine shows here


def section(name: str, *args) -> None:
    log.info(name, *args)
    LOADAVG.append([name % args if args else name, round(os.getloadavg()[0], 2)])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny setting: concurrency 1 and 4, few requests, "
                   "default proxy only, peers limited to the hand-written LLM server")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--model-size", default="tiny", choices=sorted(models.SIZES),
                   help="LLM size: tiny (the demo's random model), a random-weight real-architecture model of "
                   "that shape, or smollm2-135m (the demo's real chat model, converted from its GGUF file)")
    p.add_argument("--proxy-modes", default=None, help=f"Serve proxy settings to compare ({', '.join(PROXY_MODES)}); "
                   "default: all (smoke: default)")
    p.add_argument("--concurrency", default=None, help="LLM client counts (default 1,4,16,64; smoke 1,4)")
    p.add_argument("--max-tokens", type=int, default=32, help="generated tokens per chat request")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default bench/runs/<timestamp>.json)")
    p.add_argument("--results", type=Path, default=None,
                   help="Markdown output (default bench/RESULTS.md for a full run, "
                   "bench/runs/<timestamp>.md for smoke)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    modes = (servers.parse_proxy_modes(args.proxy_modes) if args.proxy_modes
             else ["default"] if args.smoke else list(PROXY_MODES))
    conc = [int(c) for c in (args.concurrency or ("1,4" if args.smoke else "1,4,16,64")).split(",")]
    setting = {
        "smoke": args.smoke, "sections": only, "model_size": args.model_size, "proxy_modes": modes,
        "concurrency": conc, "max_tokens": args.max_tokens,
        "overhead_requests": 30 if args.smoke else 150, "route_requests": 5 if args.smoke else 30,
        "requests_per_client": 3 if args.smoke else 6,
        "min_requests": 8 if args.smoke else 30, "audio_concurrency": [1, 4] if args.smoke else [1, 4, 16],
        "audio_requests_per_client": 2 if args.smoke else 3, "audio_min_requests": 6 if args.smoke else 15,
    }
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = HERE / "runs" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    out = args.out or HERE / "runs" / f"{stamp}.json"
    md = args.results or (HERE / "runs" / f"{stamp}.md" if args.smoke else HERE / "RESULTS.md")

    result: dict = {"meta": report.machine_meta(), "setting": setting, "ours": {}, "peers": {}, "notes": []}
    started = time.perf_counter()
    dirs = models.model_dirs(HERE / "runs" / "models", args.model_size)
    result["meta"]["llm_dir"], result["meta"]["llm_parameters"] = str(dirs["llm"]), models.parameter_count(dirs["llm"])
    if args.model_size in models.GGUF_SIZES:
        result["meta"]["gguf_conversion"] = dict(models.CONVERSION)
    device = "auto" if args.model_size != "tiny" else "cpu"
    try:
        run_ours(result, setting, dirs, run_dir, device, only)
        if "peers" in only:
            run_peers(result, setting, dirs, run_dir)
    finally:
        result["meta"]["total_s"] = round(time.perf_counter() - started, 1)
        result["meta"]["load_average_by_section"] = LOADAVG + [["end", round(os.getloadavg()[0], 2)]]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
        md.write_text(report.markdown(result, json_path=out))
        log.info("wrote %s and %s", out, md)
    return 0


def run_ours(result: dict, setting: dict, dirs: dict, run_dir: Path, device: str, only: list[str]) -> None:
    llm_dir = dirs["llm"] if setting["model_size"] != "tiny" else None
    config = servers.bench_serve_config(PORT_OURS, HERE / "runs" / "models", llm_dir, device=device)
    inproc = None
    if "overhead" in only:
        from .inprocess import InProcess

        # the LLM replica's own options (prefix cache, batch size): the in-process chat computes as it does
        inproc = InProcess(dirs, chat_options=config["applications"][0]["args"]["families"]["llm"])
    conc, mt = setting["concurrency"], setting["max_tokens"]
    audio = workloads.wav_bytes()
    for mode in setting["proxy_modes"]:
        section("ours, proxy mode %s: serve run", mode)
        entry = result["ours"].setdefault(mode, {"env": PROXY_MODES[mode]})
        with servers.serve_run(config, run_dir, mode, mode) as server:
            entry["cold_start"] = {k: v for k, v in server.timings.items() if k != "health"}
            entry["devices"] = {n: m.get("device") for n, m in server.timings["health"]["models"].items()}
            if "cold_start" in only and mode == setting["proxy_modes"][0]:
                log.info("cold start: bare from_pretrained per family")
                entry["cold_start"].update(cold_start.measure(server.timings, dirs))
            if inproc is not None:
                section("overhead (%d requests per route)", setting["overhead_requests"])
                entry["overhead"] = overhead.measure(server.url, inproc, setting["overhead_requests"])
            if "routes" in only and mode == setting["proxy_modes"][0]:
                section("every route, one request at a time (%d each)", setting["route_requests"])
                entry["routes"] = routes.measure(server.url, setting["route_requests"], mt)
            if "throughput" in only or "peers" in only:
                section("ours (%s): LLM throughput, batching on", mode)
                entry["llm"] = throughput.llm_sweep(server.url, "tiny-llm", conc, mt, setting["requests_per_client"],
                                                    setting["min_requests"])
                entry["llm_stream"] = throughput.llm_sweep(server.url, "tiny-llm", conc, mt,
                                                           setting["requests_per_client"], setting["min_requests"],
                                                           stream=True)
            if "peers" in only:
                section("ours (%s): STT and TTS throughput", mode)
                entry["stt"] = throughput.family_sweep(server.url, lambda i: workloads.transcription(
                    "tiny-whisper", audio), setting["audio_concurrency"], setting["audio_requests_per_client"],
                    setting["audio_min_requests"])
                entry["tts"] = throughput.family_sweep(server.url, lambda i: workloads.speech("tiny-vits"),
                                                       setting["audio_concurrency"],
                                                       setting["audio_requests_per_client"],
                                                       setting["audio_min_requests"])
        entry["cold_start"]["stop_s"] = server.timings.get("stop_s")
    if "throughput" in only:
        mode = setting["proxy_modes"][-1]
        section("ours, batching off (max_batch_size=1), proxy mode %s", mode)
        config = servers.bench_serve_config(PORT_NOBATCH, HERE / "runs" / "models", llm_dir, device=device,
                                            only_llm=True, max_batch_size=1)
        with servers.serve_run(config, run_dir, f"{mode}-nobatch", mode) as server:
            result["ours"][mode]["llm_nobatch"] = throughput.llm_sweep(
                server.url, "tiny-llm", conc, mt, setting["requests_per_client"], setting["min_requests"])


def run_peers(result: dict, setting: dict, dirs: dict, run_dir: Path) -> None:
    conc, mt = setting["concurrency"], setting["max_tokens"]
    rpc, mn = setting["requests_per_client"], setting["min_requests"]
    audio = workloads.wav_bytes()
    section("peer: hand-written lock server (LLM)")
    with servers.lock_server("llm", dirs["llm"], PORT_LOCK, run_dir) as s:
        result["peers"]["lock-server"] = {
            "start_s": s.timings["health_200_s"],
            "llm": throughput.llm_sweep(s.url, "tiny-llm", conc, mt, rpc, mn),
            "llm_stream": throughput.llm_sweep(s.url, "tiny-llm", conc, mt, rpc, mn, stream=True),
        }
    for family, make in (("stt", lambda i: workloads.transcription("tiny-whisper", audio)),
                         ("tts", lambda i: workloads.speech("tiny-vits"))):
        section("peer: hand-written lock server (%s)", family.upper())
        with servers.lock_server(family, dirs[family], PORT_LOCK + 1, run_dir) as s:
            result["peers"]["lock-server"][family] = throughput.family_sweep(
                s.url, make, setting["audio_concurrency"], setting["audio_requests_per_client"],
                setting["audio_min_requests"])
    if setting["smoke"]:
        result["notes"].append("smoke: transformers serve skipped")
        return
    for cb in (False, True):
        name = "transformers-serve" + (" --continuous-batching" if cb else "")
        section("peer: %s", name)
        try:
            with servers.transformers_serve(dirs["llm"], PORT_TF, run_dir, cb) as s:
                model = str(dirs["llm"])
                result["peers"][name] = {
                    "start_s": s.timings["health_200_s"],
                    "llm": throughput.llm_sweep(s.url, model, conc, mt, rpc, mn),
                    "llm_stream": throughput.llm_sweep(s.url, model, conc, mt, rpc, mn, stream=True),
                }
        except Exception as exc:  # a peer that cannot run here is reported, not fatal
            result["peers"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            log.warning("%s failed: %s", name, exc)


if __name__ == "__main__":
    raise SystemExit(main())
