"""Section 1: what serving adds to a request, per route.

The same request is timed in-process (bench.inprocess: the replica's own functions on the loaded
model) and over HTTP through `serve run`, one request at a time, in alternating blocks so that
machine drift hits both sides alike. Added ms = HTTP p50 - in-process p50 (and the same for p99).

The chat does the same model work on both sides: every request asks its own question (request numbers
from a running count per side, the server's (workloads.request_numbers) and the InProcess object's, both
from workloads.OVERHEAD_NUMBERS, never reused across blocks or runs), and the in-process side computes it with the
replica's decode loop and prefix cache setting, so each side's prefix cache holds the chat template's
shared system turn and nothing of the question.
"""

from __future__ import annotations

from collections.abc import Iterator

from . import workloads
from .inprocess import InProcess, time_calls
from .load import percentile, sequential


def routes(inproc: InProcess, audio: bytes, numbers: Iterator[int]) -> dict[str, tuple]:
    """route -> (in-process callable, HTTP request factory); `numbers`: the HTTP chats' request numbers
    (the server's running count, workloads.request_numbers)."""
    return {
        "chat (max_tokens=1)": (inproc.chat(1), lambda i: workloads.chat("tiny-llm", 1, request=next(numbers))),
        "transcription (1 s)": (inproc.transcribe(audio), lambda i: workloads.transcription("tiny-whisper", audio)),
        "speech (short)": (inproc.synthesize(), lambda i: workloads.speech("tiny-vits")),
    }


def measure(url: str, inproc: InProcess, n: int, blocks: int = 5) -> dict[str, dict]:
    """n requests per route and side (a third of that for the slow transcription)."""
    audio = workloads.wav_bytes()
    out = {}
    numbers = workloads.request_numbers(url, workloads.OVERHEAD_NUMBERS)
    for route, (local, make) in routes(inproc, audio, numbers).items():
        per_block = max(1, (n // 3 if route.startswith("transcription") else n) // blocks)
        local_s, http_s, errors = [], [], []
        for _ in range(blocks):
            local_s += time_calls(local, per_block)
            samples = sequential(url, make, per_block)
            http_s += [s.latency_s for s in samples if s.ok]
            errors += [s.error for s in samples if not s.ok]
        lp50, lp99 = percentile(local_s, 0.5) * 1000, percentile(local_s, 0.99) * 1000
        hp50 = percentile(http_s, 0.5) * 1000 if http_s else None
        hp99 = percentile(http_s, 0.99) * 1000 if http_s else None
        out[route] = {
            "n": len(local_s), "errors": len(errors), "first_error": errors[0][:300] if errors else "",
            "inprocess_p50_ms": lp50, "inprocess_p99_ms": lp99, "http_p50_ms": hp50, "http_p99_ms": hp99,
            "added_p50_ms": hp50 - lp50 if hp50 is not None else None,
            "added_p99_ms": hp99 - lp99 if hp99 is not None else None,
        }
    return out
