"""Continuous batching vs whole-request batches, in-process (no Ray, no HTTP): what the scheduler
alone buys.

    python -m bench.continuous [--model DIR] [--clients 1,16] [--requests 48] [--max-tokens 32]

Closed loop: each client sends a chat, waits for its reply, sends the next. `static` is the path
the replicas used before (deployments/batching.py + generation.generate_batch: requests that
arrive while a batch runs wait for the next one); `continuous` is deployments/decode_loop.py.
Both run on one inference thread, greedy, with the prompts' lengths varying as real chats do.
Writes bench/CONTINUOUS.md.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from deployments.decode_loop import DecodeLoop
from deployments.generation import generate_batch
from deployments.llm import LLMServer
from deployments.params import ChatParams
from loading import ModelSpec, load_model

HERE = Path(__file__).resolve().parent
PROMPTS = ["Hi", "What is the capital of France?", "Write a haiku about the sea and the wind in winter.",
           "Explain in one sentence why the sky is blue.", "List three colours.",
           "Tell me a short story about a robot who learns to paint, in two sentences."]


def params(i: int, max_tokens: int, sink=None) -> ChatParams:
    return ChatParams(model="m", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                      max_new_tokens=max_tokens, temperature=0, sink=sink)


class Static:
    """Whole-request batches: a worker takes whatever waits (up to max_batch) and runs one generate."""

    def __init__(self, spec, loaded, max_batch: int):
        self.spec, self.loaded, self.max_batch = spec, loaded, max_batch
        self.waiting: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def _work(self):
        while True:
            batch = [self.waiting.get()]
            while not self.waiting.empty() and len(batch) < self.max_batch:
                batch.append(self.waiting.get())
            results = generate_batch(self.spec, self.loaded, [p for p, _ in batch])
            for (_, done), result in zip(batch, results, strict=True):
                done(result)

    def submit(self, p, done):
        self.waiting.put((p, done))


class Continuous:
    def __init__(self, spec, loaded, max_batch: int):
        self.spec, self.loaded = spec, loaded
        self.loop = DecodeLoop(max_batch, {"model_calls": 0, "requests": 0, "largest_batch": 0})
        self.wake = threading.Event()
        threading.Thread(target=self._work, daemon=True).start()

    def _work(self):
        while True:
            self.wake.wait()
            self.wake.clear()
            self.loop.run()

    def submit(self, p, done):
        self.loop.submit(self.spec, self.loaded, p, done)
        self.wake.set()


def measure(engine, loaded, clients: int, requests: int, max_tokens: int) -> dict:
    latencies, first_tokens, tokens = [], [], []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            got_first: list[float] = []
            started = time.perf_counter()
            p = params(i, max_tokens, sink=lambda _t, first=got_first: first or first.append(time.perf_counter()))
            p.inputs = LLMServer.encode(None, loaded, p)
            finished = threading.Event()
            box: list = []
            engine.submit(p, lambda r, box=box, finished=finished: (box.append(r), finished.set()))
            finished.wait()
            end = time.perf_counter()
            latencies.append(end - started)
            first_tokens.append((got_first[0] if got_first else end) - started)
            tokens.append(box[0].completion_tokens)

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    return {"req_s": requests / wall, "tokens_s": sum(tokens) / wall, "p50_s": statistics.median(latencies),
            "p50_first_token_s": statistics.median(first_tokens)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a model directory (default: the tiny LLM, built)")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", type=Path, default=HERE / "CONTINUOUS.md")
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        from loading.tiny import build_tiny

        model = build_tiny("llm", Path(tempfile.mkdtemp()) / "tiny-llm")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    spec = ModelSpec(name="m", source=str(model), max_new_tokens=args.max_tokens)
    loaded = load_model(spec)
    rows = []
    for clients in [int(c) for c in args.clients.split(",")]:
        for name, make in (("static", Static), ("continuous", Continuous)):
            engine = make(spec, loaded, 16)
            measure(engine, loaded, clients, min(4, args.requests), args.max_tokens)  # warm up
            runs = [measure(engine, loaded, clients, args.requests, args.max_tokens) for _ in range(args.rounds)]
            row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append((clients, name, row))
            print(clients, name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    lines = ["# Continuous batching vs whole-request batches (in-process)\n",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, model `{model.name}`, {args.requests} greedy chats "
             f"of up to {args.max_tokens} tokens per level, median of {args.rounds} rounds, "
             f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f} at the end "
             "(a shared machine: compare rows of one run, not runs).\n",
             "| clients | engine | req/s | tokens/s | p50 latency (s) | p50 first token (s) |",
             "|---:|---|---:|---:|---:|---:|"]
    for clients, name, row in rows:
        lines.append(f"| {clients} | {name} | {row['req_s']:.2f} | {row['tokens_s']:.1f} | {row['p50_s']:.3f} | "
                     f"{row['p50_first_token_s']:.3f} |")
    args.results.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
