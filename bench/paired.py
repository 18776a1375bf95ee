"""Two servers up at once, measured in alternation: the machine's drift in speed cancels out.

    python -m bench.paired                           # ours vs transformers serve --continuous-batching
    python -m bench.paired --peer lock --clients 1   # vs the hand-written lock server, one client
    python -m bench.paired --against ../checkout     # ours vs ours at another checkout: an A/B of a change
    python -m bench.paired --against . --against-set families.llm.stream_interval_ms=50   # A/B of a setting
    python -m bench.paired --model-size smollm2-135m --requests 64
    python -m bench.paired --rate 60                 # open loop: both servers sent 60 chats/s (Poisson)

`python -m bench` measures each server alone, minutes apart. On the 2-core VM, identical code measured
twice, minutes apart, moved by 1.7x in CPU per stream and 1.5x in stream time to first token
(bench/PAIRED.md), so a ratio of two figures taken minutes apart carries that drift. Here both
servers run from start to end; each round measures one and then the other, the order alternating from
round to round, and reports the ratio within the round; the summary is the median of the rounds.

A round, per server: `--clients` closed-loop clients (or, with `--rate`, arrivals at that mean rate, the
same arrival times for both servers) stream `--requests` chats (time to first content token, req/s),
then send as many plain ones (req/s, latency). The idle server's CPU while the other is
measured is recorded too (processes of its session, from /proc): ours at rest keeps Ray's processes
running, a cost the peer's slot carries.

Writes bench/runs/paired-<stamp>.json and bench/runs/paired-<stamp>.md (bench/PAIRED.md is the curated
record).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
from pathlib import Path

import yaml

from . import models, report, servers, workloads
from .load import run_load, run_open_loop

HERE = Path(__file__).resolve().parent
log = logging.getLogger("bench.paired")
PEERS = ("tf-cb", "tf", "lock")


def measure(server: servers.Server, idle: servers.Server, model: str, clients: int, requests: int,
            max_tokens: int, rate: float | None = None, seed: int = 0) -> dict:
    """`rate`: requests arrive at this mean rate (open loop, arrival times from `seed`) instead of coming
    from `clients` closed-loop clients."""
    before = {s.name: servers.session_cpu_s(s.process.pid) for s in (server, idle)}

    def load(stream: bool) -> dict:
        # numbered from the server's running count: no phase or round resends a question it has answered
        make = workloads.numbered_chat(server.url, model, max_tokens, stream)
        if rate is not None:
            return run_open_loop(server.url, make, rate, requests, seed=seed).as_dict()
        return run_load(server.url, make, clients, requests, max_wall_s=600).as_dict()

    streamed, plain = load(True), load(False)
    wall = streamed["wall_s"] + plain["wall_s"]
    after = {s.name: servers.session_cpu_s(s.process.pid) for s in (server, idle)}
    return {"stream": streamed, "plain": plain,
            "cores_busy": round((after[server.name] - before[server.name]) / wall, 2),
            "other_at_rest_cores": round((after[idle.name] - before[idle.name]) / wall, 3)}


FIGURES = {  # name -> (figure of a measurement, better when higher)
    "stream TTFT p50 (ms)": (lambda m: m["stream"]["ttft_p50_ms"], False),
    "stream req/s": (lambda m: m["stream"]["rps"], True),
    "req/s": (lambda m: m["plain"]["rps"], True),
    "latency p50 (ms)": (lambda m: m["plain"]["p50_ms"], False),
}


def summarize(rounds: list[dict], a: str, b: str) -> dict:
    out = {}
    for name, (figure, _) in FIGURES.items():
        ratios = [figure(r[a]) / figure(r[b]) for r in rounds if figure(r[a]) and figure(r[b])]
        out[name] = {"ratios": [round(x, 3) for x in ratios],
                     "median_ratio": round(statistics.median(ratios), 3) if ratios else None,
                     **{n: _median([figure(r[n]) for r in rounds]) for n in (a, b)}}
    out["errors"] = sum(r[n]["stream"]["errors"] + r[n]["plain"]["errors"] for r in rounds for n in (a, b))
    return out


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def with_settings(config: dict, settings: list[str]) -> dict:
    """`families.llm.stream_interval_ms=50` -> config's app args["families"]["llm"]["stream_interval_ms"] = 50."""
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise SystemExit(f"--set {setting!r}: expected KEY=VALUE, e.g. families.llm.stream_interval_ms=50")
        *path, last = key.split(".")
        node = config["applications"][0]["args"]
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return config


def markdown(result: dict) -> str:
    a, b = result["names"]
    s = result["setting"]
    lines = [f"# {a} against {b}, measured in alternation ({s['rounds']} rounds)", "",
             (f"open loop: chats arriving at {s['rate']}/s on average (Poisson, the same arrival times for both "
              f"servers within a round)" if s.get("rate") else f"{s['clients']} clients") +
             f", {s['requests']} chats per figure, max_tokens {s['max_tokens']}, "
             f"model {s['model_size']}; {result['meta'].get('cpu')}, {result['meta'].get('cpus')} CPUs; "
             f"git {result['meta'].get('git_commit')}.", "",
             f"| round (first measured) | {a} TTFT p50 | {b} TTFT p50 | TTFT ratio | {a} req/s | {b} req/s | "
             f"req/s ratio | {a} stream req/s | {b} stream req/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(result["rounds"]):
        ta, tb = r[a]["stream"]["ttft_p50_ms"], r[b]["stream"]["ttft_p50_ms"]
        pa, pb = r[a]["plain"]["rps"], r[b]["plain"]["rps"]
        lines.append(f"| {i + 1} ({r['first']}) | {_f(ta)} | {_f(tb)} | {_f(ta and tb and ta / tb, 2)} | {_f(pa)} | "
                     f"{_f(pb)} | {_f(pa and pb and pa / pb, 2)} | {_f(r[a]['stream']['rps'])} | "
                     f"{_f(r[b]['stream']['rps'])} |")
    summary = result["summary"]
    lines += ["", f"| figure | {a} (median) | {b} (median) | median of the rounds' ratios |", "|---|---:|---:|---:|"]
    for name in FIGURES:
        row = summary[name]
        lines.append(f"| {name} | {_f(row[a])} | {_f(row[b])} | {row['median_ratio']} |")
    # a server at rest is the other of the pair while that one is measured
    rest = {a: round(statistics.median(r[b]["other_at_rest_cores"] for r in result["rounds"]), 3),
            b: round(statistics.median(r[a]["other_at_rest_cores"] for r in result["rounds"]), 3)}
    busy = {n: round(statistics.median(r[n]["cores_busy"] for r in result["rounds"]), 2) for n in (a, b)}
    lines += ["", f"Errors: {summary['errors']}. Cores each used while measured (median): {a} {busy[a]}, "
              f"{b} {busy[b]}; at rest while the other was measured: {a} {rest[a]}, {b} {rest[b]}.", ""]
    if s.get("rate"):  # how far the client fell behind its schedule (latencies count that wait)
        def phases(name: str, key: str) -> list[float]:  # every round's stream and plain phase that has it
            return [x for r in result["rounds"] for k in ("stream", "plain")
                    if (x := r[name][k]["extra"].get(key)) is not None]

        sent = {n: _median(phases(n, "offered_rps")) for n in (a, b)}
        lag = {n: max(phases(n, "lag_max_ms"), default=None) for n in (a, b)}
        lines += [f"Open loop, asked {s['rate']}/s: actually sent (median of the phases) {a} {_f(sent[a])}/s, "
                  f"{b} {_f(sent[b])}/s; latest a request went out after its scheduled arrival: {a} "
                  f"{_f(lag[a], 0)} ms, {b} {_f(lag[b], 0)} ms (latencies and TTFT count from the scheduled "
                  "arrival).", ""]
    return "\n".join(lines)


def with_env(label: str, settings: list[str]) -> str:
    """A proxy mode of servers.PROXY_MODES: serve.env's default one plus `settings` (KEY=VALUE)."""
    if not settings:
        return "default"
    return servers.mode_with(f"paired-{label}", dict(item.split("=", 1) for item in settings))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.splitlines()[0])
    p.add_argument("--peer", default="tf-cb", choices=PEERS,
                   help="tf-cb: transformers serve --continuous-batching; tf: without it; lock: the lock server")
    p.add_argument("--against", type=Path, default=None,
                   help="another checkout of this project: ours there instead of a peer (same virtualenv)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of our app for this run, a dotted path under serve_config.yaml's app args "
                   "(families.llm.stream_interval_ms=50); repeatable")
    p.add_argument("--against-set", action="append", default=[], metavar="KEY=VALUE",
                   help="the same, for --against's server")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment setting over serve.env for our `serve run` (RAY_worker_niceness=15); "
                   "repeatable")
    p.add_argument("--against-env", action="append", default=[], metavar="KEY=VALUE",
                   help="the same, for --against's server")
    p.add_argument("--model-size", default="tiny", choices=sorted(models.SIZES))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rate", type=float, default=None,
                   help="open loop: chats arrive at this many per second (Poisson) instead of from --clients "
                   "closed-loop clients, so both servers take the same load (bench/load.py says why)")
    p.add_argument("--requests", type=int, default=320, help="chats per figure per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=32)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run = servers.start_run("paired", args.model_size)
    stamp, run_dir, root, dirs, llm_dir, device = run.stamp, run.dir, run.models_root, run.dirs, run.llm_dir, run.device
    ours_name = "ours" + "".join(f" {s}" for s in args.set + args.env)
    peer_names = {"tf-cb": "transformers serve --continuous-batching", "tf": "transformers serve",
                  "lock": "lock server"}
    other_name = (f"ours at {args.against.resolve().name}" + "".join(f" {s}" for s in args.against_set +
                                                                         args.against_env)
                  if args.against else peer_names[args.peer])
    result: dict = {"meta": report.machine_meta(), "names": [ours_name, other_name], "rounds": [],
                    "setting": {**{k: v for k, v in vars(args).items() if k != "against"},
                                "against": str(args.against) if args.against else None}}
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(servers.serve_run(
            with_settings(servers.bench_serve_config(8300, root, llm_dir, device=device), args.set), run_dir, "ours",
            mode=with_env("ours", args.env)))
        ours.name = ours_name
        if args.against:
            repo = args.against.resolve()
            config = servers.bench_serve_config(8302, root, llm_dir, device=device, repo=repo)
            other = stack.enter_context(servers.serve_run(with_settings(config, args.against_set), run_dir, "against",
                                                          mode=with_env("against", args.against_env), repo=repo))
            other_model = "tiny-llm"
        elif args.peer == "lock":
            other = stack.enter_context(servers.lock_server("llm", dirs["llm"], 8311, run_dir))
            other_model = "tiny-llm"
        else:
            other = stack.enter_context(servers.transformers_serve(dirs["llm"], 8321, run_dir, args.peer == "tf-cb"))
            other_model = str(dirs["llm"])
        other.name = other_name
        targets = {ours_name: (ours, "tiny-llm"), other_name: (other, other_model)}
        for server, model in targets.values():  # warm-up: first-request costs stay out of the figures
            for stream in (False, True):
                run_load(server.url, workloads.numbered_chat(server.url, model, args.max_tokens, stream), 2, 6)
        for i in range(args.rounds):
            order = [ours_name, other_name] if i % 2 == 0 else [other_name, ours_name]
            entry: dict = {"first": order[0]}
            for name in order:
                server, model = targets[name]
                idle = targets[order[1] if name == order[0] else order[0]][0]
                entry[name] = measure(server, idle, model, args.clients, args.requests, args.max_tokens, args.rate,
                                      seed=i)
                for kind in ("stream", "plain"):
                    if entry[name][kind]["errors"]:
                        log.warning("%s, %s: %d errors, the first: %s", name, kind, entry[name][kind]["errors"],
                                    entry[name][kind]["first_error"])
            log.info("round %d: TTFT p50 %s %.1f ms, %s %.1f ms; req/s %.1f, %.1f", i + 1, ours_name,
                     entry[ours_name]["stream"]["ttft_p50_ms"] or -1, other_name,
                     entry[other_name]["stream"]["ttft_p50_ms"] or -1, entry[ours_name]["plain"]["rps"],
                     entry[other_name]["plain"]["rps"])
            result["rounds"].append(entry)
    result["summary"] = summarize(result["rounds"], ours_name, other_name)
    out = HERE / "runs" / f"paired-{stamp}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    md = out.with_suffix(".md")
    md.write_text(markdown(result))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
