"""Continuous batching vs whole-request batches, in-process (no Ray, no HTTP): what the scheduler
alone buys.

    python -m bench.continuous [--model DIR | --model-size 0.5b] [--clients 1,16] [--requests 48]
                               [--max-tokens 32] [--engines static,continuous,transformers-cb]
    python -m bench.continuous --model-size 0.5b --device cuda --clients 1,16,64 --max-batch 64 \
        --engines static,continuous,transformers-cb --results $OUT/gpu.md     # the GPU run (bench/GPU.md)

Closed loop: each client sends a chat, waits for its reply, sends the next. `static` is the path
the replicas used before (deployments/batching.py + generation.generate_batch: requests that
arrive while a batch runs wait for the next one); `continuous` is deployments/decode_loop.py;
`transformers-cb` is transformers' own continuous batching (`init_continuous_batching`, what
`transformers serve --continuous-batching` runs) on a second copy of the weights. Greedy, with the
prompts' lengths varying as real chats do. Writes bench/CONTINUOUS.md.

Nothing here imports Ray or the HTTP stack, so it runs where only torch and transformers are
installed (the lent GPU machines: bench/GPU.md).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import queue
import statistics
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from deployments.chat_encoding import encode_text_chat
from deployments.decode_loop import DecodeLoop
from deployments.generation import generate_batch
from deployments.params import ChatParams, ChatResult
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


class TransformersCB:
    """transformers' continuous batching manager on its own copy of the model (it switches the model's
    attention to its paged kernels), streamed so that the first token is timed as ours is."""

    def __init__(self, spec, loaded, max_batch: int):
        from transformers import AutoModelForCausalLM, GenerationConfig

        report = loaded.report
        model = AutoModelForCausalLM.from_pretrained(report.resolved_path, dtype=loaded.model.dtype)
        model.to(loaded.model.device).eval()
        tokenizer = loaded.tokenizer
        # its own batch and cache sizes, as `transformers serve` leaves them (max_batch is ours, not its)
        config = GenerationConfig(do_sample=False, max_new_tokens=spec.max_new_tokens,
                                  eos_token_id=loaded.model.generation_config.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
        self.manager = model.init_continuous_batching(generation_config=config)
        self.manager.start()
        self.ids = itertools.count()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def submit(self, p, done):
        """As `transformers serve` does: a result handler on an event loop, called per streamed token."""
        ids = p.inputs["input_ids"][0].tolist()
        request = f"r{next(self.ids)}"
        made = [0]

        def on_result(output):
            if output.generated_tokens and not made[0]:
                p.sink("")
            made[0] = len(output.generated_tokens)
            if output.is_finished():
                done(ChatResult("", len(ids), made[0], "stop"))

        async def register():
            self.manager.register_result_handler(request, on_result)

        asyncio.run_coroutine_threadsafe(register(), self.loop).result()
        self.manager.add_request(ids, request_id=request, max_new_tokens=p.max_new_tokens, streaming=True)

    def close(self):
        self.manager.stop(block=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        # its KV cache (on a GPU sized from free memory) goes back before the next engine measures
        self.manager = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


ENGINES = {"static": Static, "continuous": Continuous, "transformers-cb": TransformersCB}


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
            p.inputs = encode_text_chat(loaded.tokenizer, p)
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
    parser.add_argument("--model-size", default=None, help="build one of bench/models.py's sizes (e.g. 0.5b)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16,
                        help="rows per batch of ours (static, continuous); transformers-cb keeps its own defaults")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engines", default="static,continuous",
                        help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--results", type=Path, default=HERE / "CONTINUOUS.md")
    args = parser.parse_args(argv)
    engines = args.engines.split(",")
    unknown = [name for name in engines if name not in ENGINES]
    if unknown:
        parser.error(f"unknown engine {unknown[0]!r}; choose from {', '.join(ENGINES)}")
    model = args.model
    if model is None and args.model_size:
        from .models import build_sized_llm

        model = build_sized_llm(args.model_size, HERE / "runs" / "models" / f"llm-{args.model_size}")
    if model is None:
        from loading.tiny import build_tiny

        model = build_tiny("llm", Path(tempfile.mkdtemp()) / "tiny-llm")
    spec = ModelSpec(name="m", source=str(model), max_new_tokens=args.max_tokens, device=args.device)
    loaded = load_model(spec)
    report = loaded.report
    on_gpu = report.device.startswith("cuda")
    if not on_gpu:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    where = torch.cuda.get_device_name(0) if on_gpu else f"{len(os.sched_getaffinity(0))} CPU cores"
    print(f"loaded {model.name} on {report.device} ({where}): {report.strategy}, {report.dtype}, "
          f"{report.load_seconds:.1f} s; attempts: {[(a.strategy, a.outcome, a.reason) for a in report.attempts]}",
          flush=True)
    rows = []
    for clients in [int(c) for c in args.clients.split(",")]:
        for name in engines:
            engine = ENGINES[name](spec, loaded, args.max_batch)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            measure(engine, loaded, clients, min(4, args.requests), args.max_tokens)  # warm up
            runs = [measure(engine, loaded, clients, args.requests, args.max_tokens) for _ in range(args.rounds)]
            if hasattr(engine, "close"):
                engine.close()
            row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            if on_gpu:
                row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append((clients, name, row))
            print(clients, name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    lines = ["# Continuous batching vs whole-request batches (in-process)\n",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, model `{model.name}` on {report.device} ({where}), "
             f"loaded as {report.strategy} ({report.dtype}) in {report.load_seconds:.1f} s; "
             f"{args.requests} greedy chats of up to {args.max_tokens} tokens per level, {args.max_batch} rows per "
             f"batch, median of {args.rounds} rounds, load average {os.getloadavg()[0]:.1f} at the end "
             "(a shared machine: compare rows of one run, "
             "not runs).\n",
             "| clients | engine | req/s | tokens/s | p50 latency (s) | p50 first token (s) |"
             + (" peak GPU memory (GiB) |" if on_gpu else ""),
             "|---:|---|---:|---:|---:|---:|" + ("---:|" if on_gpu else "")]
    for clients, name, row in rows:
        lines.append(f"| {clients} | {name} | {row['req_s']:.2f} | {row['tokens_s']:.1f} | {row['p50_s']:.3f} | "
                     f"{row['p50_first_token_s']:.3f} |" + (f" {row['peak_gpu_gib']:.2f} |" if on_gpu else ""))
    args.results.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
