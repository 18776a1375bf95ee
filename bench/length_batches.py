"""Requests of mixed lengths through the decode loop, in-process: batch_length_ratio 2 (batches whose
prompt + max_tokens stay within 2x of each other) against one batch of every length (the behaviour before
82d224d). Prints batches, forwards, wall time and the peak padded KV cache (rows x columns, summed over the
batches) for each round. Results: bench/CONTINUOUS.md, "Requests of mixed lengths".

    python -m bench.length_batches --rounds 3
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from deployments.decode_loop import DecodeLoop, Group
from deployments.llm import LLMServer
from deployments.params import ChatParams
from loading import ModelSpec, load_model
from loading.tiny import build_tiny


def run(spec: ModelSpec, loaded, lengths: list[int], new_tokens: int, ratio: float) -> dict:
    loop = DecodeLoop(max_rows=64, stats={"model_calls": 0, "requests": 0, "largest_batch": 0}, length_ratio=ratio)
    for n in lengths:
        params = ChatParams(model=spec.name, messages=[], prompt=[(7 * i) % 400 + 3 for i in range(n)],
                            max_new_tokens=new_tokens, temperature=0, logit_bias={2: -100, 0: -100})  # no end token
        params.inputs = LLMServer.encode(None, loaded, params)
        loop.submit(spec, loaded, params, lambda outcome: None)
    peak = {"cells": 0, "batches": 0}
    step = loop._step

    def watched(group: Group) -> None:
        step(group)
        running = [g for g in loop.groups.values() if g.mask is not None and g.rows]
        peak["cells"] = max(peak["cells"], sum(len(g.rows) * g.mask.shape[1] for g in running))
        peak["batches"] = max(peak["batches"], len(running))

    loop._step = watched  # type: ignore[method-assign]
    started = time.perf_counter()
    loop.run()
    return {"wall_ms": (time.perf_counter() - started) * 1000, "forwards": loop.stats["model_calls"],
            "batches": peak["batches"], "peak_cells": peak["cells"],
            "own_tokens": sum(n + 1 + new_tokens for n in lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = build_tiny("llm", Path(tempfile.mkdtemp()) / "tiny-llm")
    spec = ModelSpec(name="tiny-llm", source=str(source), max_new_tokens=64)
    loaded = load_model(spec)
    rng = random.Random(0)
    lengths = [rng.choice([12, 24, 48, 96, 192, 384]) for _ in range(args.requests)]
    for round_ in range(args.rounds):
        for ratio in (2.0, float("inf")):
            r = run(spec, loaded, lengths, args.new_tokens, ratio)
            print(f"round {round_} ratio {ratio:g}: {r['batches']} batches, {r['forwards']} forwards, "
                  f"{r['wall_ms']:.0f} ms, peak cache cells {r['peak_cells']} (rows' own tokens {r['own_tokens']})")


if __name__ == "__main__":
    main()
