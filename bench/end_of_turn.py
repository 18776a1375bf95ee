"""semantic_vad's score on the demo's real chat model: how likely SmolLM2-135M-Instruct finds a user's
message closing after words a speaker said, the silence the session then waits at each eagerness, and
what one score costs, in-process.

    python -m bench.end_of_turn [--rounds 5]

Each utterance is scored alone (no reply before it), as a session's first turn is. Time is one forward of
the words in the chat template (deployments/end_of_turn.py) at 1 and 2 torch threads, median of the rounds.
Results in bench/SEMANTIC_VAD.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from deployments import semantic_vad
from deployments.end_of_turn import closing_probability, turn_prefix
from loading import ModelSpec, load_model

from .models import GGUF_SIZES, converted_gguf

ROOT = Path(__file__).resolve().parent / "runs" / "models"

# (what a speaker said, whether it is a finished message)
UTTERANCES = [
    ("What's the weather in Paris?", True), ("What's the weather in", False),
    ("Set a timer for five minutes.", True), ("Set a timer for", False),
    ("I want to book a table for two.", True), ("I want to book a table for", False),
    ("Can you tell me about the history of Rome?", True), ("Can you tell me about um", False),
    ("I'd like to order a pizza with pepperoni and mushrooms.", True),
    ("I'd like to order a pizza with pepperoni and", False),
    ("Turn off the lights.", True), ("Turn off the", False),
    ("My name is John.", True), ("My name is John and", False),
    ("Thanks, that's all.", True), ("so I was thinking that maybe we could", False),
    ("Yes.", True), ("Hello.", True), ("Tell me a joke", True), ("Could you", False),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    path = converted_gguf(GGUF_SIZES["smollm2-135m"], ROOT)
    loaded = load_model(ModelSpec(name="smollm2", source=str(path)))
    rows = []
    for text, finished in UTTERANCES:
        ids, closing = turn_prefix(loaded.processor, text)
        times = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            spent = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                probability = closing_probability(loaded, ids, closing)
                spent.append((time.perf_counter() - started) * 1000)
            times[threads] = statistics.median(spent)
        waits = [semantic_vad.wait_s(probability, e) for e in ("high", "medium", "low")]
        rows.append((text, finished, probability, waits, len(ids), times))
    print("| words | finished | log10 P(end) | wait high / medium / low (s) | tokens | ms, 1 thread | ms, 2 threads |")
    print("|---|---|---:|---|---:|---:|---:|")
    for text, finished, probability, waits, tokens, times in rows:
        print(f"| {text} | {'yes' if finished else 'no'} | {math.log10(probability):.2f} | "
              f"{' / '.join(f'{w:.2f}' for w in waits)} | {tokens} | {times[1]:.0f} | {times[2]:.0f} |")


if __name__ == "__main__":
    main()
