"""The run's JSON (everything) and its Markdown summary (every figure, in tables)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "ray", "fastapi", "uvicorn", "starlette", "aiohttp")


def machine_meta() -> dict:
    import torch

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_name(), "cpus": os.cpu_count(), "memory_gib": round(mem_gib, 1),
        "gpu": gpu, "device": "cuda" if gpu else "cpu", "load_average_at_start": os.getloadavg(),
        "versions": {p: _version(p) for p in PACKAGES}, "git_commit": commit,
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _f(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return out + [""]


def _by_c(rows: list[dict] | None) -> dict[int, dict]:
    return {r["concurrency"]: r for r in rows or []}


def _stream_errors(row: dict) -> str:
    """A streamed sweep's failed streams ("12 of 96"), "-" where there was no streamed sweep."""
    if not row:
        return "-"
    return f"{row['errors']} of {row['requests']}" if row["errors"] else "0"


def markdown(result: dict, json_path: Path | None = None) -> str:
    meta, setting, ours, peers = result["meta"], result["setting"], result["ours"], result["peers"]
    lines = ["# Benchmark results", ""]
    lines += [
        f"Run `{'python -m bench --smoke' if setting['smoke'] else 'python -m bench'}`"
        f"{' --model-size ' + setting['model_size'] if setting['model_size'] != 'tiny' else ''} "
        f"on {meta['date']} (git {meta['git_commit'] or '?'}), "
        f"{meta['total_s'] if 'total_s' in meta else '?'} s in all.",
        "",
        f"- Machine: {meta['cpu']}, {meta['cpus']} CPUs, {meta['memory_gib']} GiB, device **{meta['device']}**"
        f"{' (' + meta['gpu'] + ')' if meta['gpu'] else ''}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in meta['load_average_at_start'])}.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + f", Python {meta['python']}.",
        f"- LLM: `{Path(meta.get('llm_dir', '')).name}` ({meta.get('llm_parameters') or '?'} parameters), "
        f"greedy, max_tokens={setting['max_tokens']}; every server loads the same directories.",
        *([f"- GGUF: `{meta['gguf_conversion']['source']}` converted into that directory "
           f"{'in this run' if meta['gguf_conversion']['converted_now'] else 'before this run'} in "
           f"{meta['gguf_conversion']['conversion_seconds']} s."] if meta.get("gguf_conversion") else []),
        "- Ours: `serve run` of serve_config.yaml's models on one replica per family (autoscaling pinned "
        "off so figures do not move with it). Proxy modes are environment settings of `serve run`: "
        + "; ".join(f"**{m}** `{' '.join(f'{k}={v}' for k, v in e.get('env', {}).items()) or '(none)'}`"
                    for m, e in ours.items()) + ".",
        f"- Load: closed loop, {setting['requests_per_client']} requests per client (at least "
        f"{setting['min_requests']}), each chat a question its server has not been asked (numbered on across "
        "warm-ups, levels and sweeps, the same questions for every server); latencies in ms; p99 of a few "
        "dozen requests is the worst one or two.",
        "",
    ]
    if json_path:
        lines += [f"Raw figures: `{json_path.name}` (bench/runs/, not committed).", ""]

    lines += targets(result)

    # 1. overhead
    if any("overhead" in e for e in ours.values()):
        lines += ["## 1. Serving overhead (one request at a time)", "",
                  "In-process: the replica's own functions on the loaded model in the benchmark process (audio "
                  "decode/encode included on both sides; the chat through the decode loop with the replica's "
                  "prefix cache setting). HTTP: the same request through `serve run`. Each chat asks a question "
                  "of its own on both sides, so neither side's prefix cache holds more than the chat template.",
                  ""]
        rows = []
        for mode, e in ours.items():
            for route, o in (e.get("overhead") or {}).items():
                rows.append([mode, route, o["inprocess_p50_ms"], o["http_p50_ms"], o["added_p50_ms"],
                             o["inprocess_p99_ms"], o["http_p99_ms"], o["added_p99_ms"], o["errors"]])
        lines += _table(["proxy mode", "route", "in-process p50", "HTTP p50", "**added p50**", "in-process p99",
                         "HTTP p99", "added p99", "errors"], rows)

    # 2. throughput
    if any("llm" in e for e in ours.values()):
        lines += ["## 2. LLM throughput against concurrency", ""]
        rows = []
        for mode, e in ours.items():
            for label, key in (("batching on", "llm"), ("batching off", "llm_nobatch")):
                stream = _by_c(e.get("llm_stream")) if key == "llm" else {}
                for r in e.get(key) or []:
                    s = stream.get(r["concurrency"], {})
                    rows.append([f"ours ({mode}), {label}", r["concurrency"], r["rps"], r["tokens_per_s"], r["p50_ms"],
                                 r["p99_ms"], s.get("ttft_p50_ms"), s.get("ttft_p99_ms"), r["errors"],
                                 _stream_errors(s)])
        for name, p in peers.items():
            stream = _by_c(p.get("llm_stream"))
            for r in p.get("llm") or []:
                s = stream.get(r["concurrency"], {})
                rows.append([name, r["concurrency"], r["rps"], r["tokens_per_s"], r["p50_ms"], r["p99_ms"],
                             s.get("ttft_p50_ms"), s.get("ttft_p99_ms"), r["errors"], _stream_errors(s)])
            if "error" in p:
                rows.append([name, "-", "-", "-", "-", "-", "-", "-", p["error"][:80], "-"])
        lines += ["Each row pairs the plain sweep (req/s, tokens/s, latency, errors) with the streamed sweep at "
                  "the same clients (TTFT over the streams that succeeded, and the streams that failed: an HTTP "
                  "error, an error event after the 200, or a stream cut off).", ""]
        lines += _table(["server", "clients", "req/s", "gen tok/s", "p50", "p99", "TTFT p50 (stream)",
                         "TTFT p99 (stream)", "errors", "stream errors"], rows)

    # 3. cold start
    cold = [(m, e["cold_start"]) for m, e in ours.items() if e.get("cold_start")]
    if cold:
        lines += ["## 3. Cold start", "", "Seconds from starting `serve run` (Ray included) to the first 200 on "
                  "/health and to every model ready; stop = Ctrl-C to exit.", ""]
        lines += _table(["proxy mode", "/health 200", "all models ready", "stop"],
                        [[m, c.get("health_200_s"), c.get("all_ready_s"), c.get("stop_s")] for m, c in cold])
        for m, c in cold:
            if c.get("families"):
                lines += [f"Load time per family (proxy mode {m}): ours = the replica's load_seconds in /health "
                          "(resolve, config, processor, weights, placement); bare = tokenizer/processor + "
                          "`from_pretrained` in a fresh process, imports excluded on both sides.", ""]
                lines += _table(["family", "model", "ours (s)", "bare from_pretrained (s)", "ours / bare"],
                                [[f, d["model"], _f(d["ours_load_s"], 3), _f(d["bare_from_pretrained_s"], 3),
                                  _f(d["ratio"], 2)] for f, d in c["families"].items()])

    # 4. peers: ratios
    if peers and ours:
        lines += ["## 4. Ours against peers (same models, same load)", "",
                  "Ratios ours / peer at each concurrency: req/s (higher is better for us) and p50 latency "
                  "(lower is better for us).", ""]
        rows = []
        for mode, e in ours.items():
            for family, key in (("llm", "llm"), ("stt", "stt"), ("tts", "tts")):
                mine = _by_c(e.get(key))
                for name, p in peers.items():
                    for c, r in _by_c(p.get(key)).items():
                        if c in mine and r["rps"] and r["p50_ms"]:
                            rows.append([mode, family, name, c, mine[c]["rps"] / r["rps"],
                                         (mine[c]["p50_ms"] or 0) / r["p50_ms"]])
        lines += _table(["ours (proxy mode)", "family", "peer", "clients", "req/s ratio", "p50 ratio"],
                        [[*r[:4], f"{r[4]:.2f}x", f"{r[5]:.2f}x"] for r in rows])
        audio = []
        for name, p in [*(("ours (" + m + ")", e) for m, e in ours.items()), *peers.items()]:
            for family in ("stt", "tts"):
                for r in p.get(family) or []:
                    audio.append([name, family, r["concurrency"], r["rps"], r["p50_ms"], r["p99_ms"], r["errors"]])
        if audio:
            lines += ["STT (1 s WAV) and TTS (short sentence) figures:", ""]
            lines += _table(["server", "family", "clients", "req/s", "p50", "p99", "errors"], audio)
    # 5. every route
    for mode, e in ours.items():
        if e.get("routes"):
            lines += [f"## 5. Every route, one request at a time (proxy mode {mode})", "",
                      "Latency a client sees per route on the demo's tiny models (sequential requests, "
                      "kept-alive connection); TTFT for the streamed chat.", ""]
            lines += _table(["route", "requests", "p50", "p99", "TTFT p50", "errors"],
                            [[name, r["n"], r["p50_ms"], r["p99_ms"], r.get("ttft_p50_ms"), r["errors"]]
                             for name, r in e["routes"].items()])
    if meta.get("load_average_by_section"):
        lines += ["1-minute load average as each step started (2 CPUs; above ~2 another job shared the machine):", ""]
        lines += _table(["step", "load"], meta["load_average_by_section"])
    if result.get("notes"):
        lines += ["## Notes", ""]
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


#: req/s at 16 clients against each peer: the lock server's from the first issue, the continuous-batching
#: peer's from the throughput issue (14)
NEED_16 = {"lock-server": 3.0, "transformers-serve": 1.0, "transformers-serve --continuous-batching": 1.3}
CB_PEER = "transformers-serve --continuous-batching"


def _issue_14_targets(mode: str, e: dict, peers: dict) -> list[list]:
    """Stream time to first token at 16 clients against the continuous-batching peer, no errors at 64
    clients, and 1 client's p50 against the lock server's."""
    rows = []
    mine = _by_c(e.get("llm_stream")).get(16)
    theirs = _by_c((peers.get(CB_PEER) or {}).get("llm_stream")).get(16)
    if mine and theirs and (mine.get("ttft_p50_ms") or mine["errors"]) and theirs.get("ttft_p50_ms"):
        # TTFT is taken over the streams that succeeded: the target needs every one of ours to succeed
        a, b = mine.get("ttft_p50_ms"), theirs["ttft_p50_ms"]
        figure = (f"{_f(a, 0)} vs {b:.0f} ms; stream errors {mine['errors']} of {mine['requests']} vs "
                  f"{theirs['errors']} of {theirs['requests']}")
        if mine["errors"]:
            verdict = f"missed ({mine['errors']} of {mine['requests']} streams failed)"
        else:
            verdict = "met" if a <= b else f"missed ({a / b:.1f}x its value)"
        rows.append([mode, f"LLM stream, 16 clients: TTFT p50 <= {CB_PEER}'s, 0 stream errors", figure, verdict])
    many, many_stream = _by_c(e.get("llm")).get(64), _by_c(e.get("llm_stream")).get(64)
    if many or many_stream:
        plain_errors = many["errors"] if many else None
        stream_errors = many_stream["errors"] if many_stream else None
        total = (plain_errors or 0) + (stream_errors or 0)
        rows.append([mode, "LLM, 64 clients: no errors (plain and streamed)",
                     f"{_f(plain_errors)} plain, {_f(stream_errors)} streamed errors",
                     "met" if total == 0 and many and many_stream else "missed" if total else "not measured"])
    one, lock = _by_c(e.get("llm")).get(1), _by_c((peers.get("lock-server") or {}).get("llm")).get(1)
    if one and lock and lock.get("p50_ms"):
        ratio = one["p50_ms"] / lock["p50_ms"]
        rows.append([mode, "LLM, 1 client: p50 <= 1.1x lock-server's", f"{ratio:.2f}x",
                     "met" if ratio <= 1.1 else f"missed ({ratio:.2f}x)"])
    return rows


def targets(result: dict) -> list[str]:
    """The issue's targets, checked on this run's figures (per proxy mode)."""
    ours, peers = result["ours"], result["peers"]
    rows = []
    for mode, e in ours.items():
        chat = (e.get("overhead") or {}).get("chat (max_tokens=1)")
        if chat and chat.get("added_p50_ms") is not None:
            v = chat["added_p50_ms"]
            verdict = "met" if v <= 10 else f"missed by {v - 10:.1f} ms"
            rows.append([mode, "chat: added p50 <= 10 ms", f"{v:.1f} ms", verdict])
        mine = _by_c(e.get("llm")).get(16)
        for name, p in peers.items():
            theirs = _by_c(p.get("llm")).get(16)
            if mine and theirs and theirs["rps"]:
                ratio = mine["rps"] / theirs["rps"]
                need = NEED_16.get(name, 1.0)
                rows.append([mode, f"LLM, 16 clients: req/s >= {need:g}x {name}", f"{ratio:.2f}x",
                             "met" if ratio >= need else f"missed ({ratio / need:.0%} of the target)"])
        rows += _issue_14_targets(mode, e, peers)
        health = (e.get("cold_start") or {}).get("health_200_s")
        if health is not None:
            rows.append([mode, "/health 200 <= 15 s after serve run", f"{health:.1f} s",
                         "met" if health <= 15 else f"missed by {health - 15:.1f} s"])
    if not rows:
        return []
    return ["## Targets", ""] + _table(["proxy mode", "target", "this run", "verdict"], rows)


def stamped(meta: dict, **figures) -> dict:
    """A standalone bench's result: when, at which commit, on which machine, then its figures."""
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "git": meta["git_commit"],
            "machine": meta, **figures}


def run_line(result: dict, command: str) -> str:
    """The line under a standalone bench's title: when, which commit, the command and the machine."""
    meta = result["machine"]
    versions = meta.get("versions", {})
    return (f"{result['date']} (git {result['git']}), `{command}`, {meta.get('cpus')} cores, "
            f"torch {versions.get('torch')}, ray {versions.get('ray')}. ")


def write(result: dict, json_path: Path, md_path: Path, text: str) -> None:
    """Write a standalone bench's raw JSON and its Markdown, and print the Markdown."""
    json_path.write_text(json.dumps(result, indent=2))
    md_path.write_text(text)
    print(text)
