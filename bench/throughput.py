"""Section 2 and 4: LLM throughput against concurrency, for ours and for each peer.

Closed loop: `c` clients each send the fixed chat request (same max_tokens, greedy; each request its
own question, numbered from the server's running count, workloads.request_numbers, so that no level,
warm-up or sweep resends a question the server has answered) as soon as their previous one is answered,
until `requests_per_client * c` have been sent (at least `min_requests`). Non-streamed runs give
requests/s, generated tokens/s and latency; streamed runs give the time to first token.
"""

from __future__ import annotations

from . import workloads
from .load import run_load


def llm_sweep(url: str, model: str, concurrencies: list[int], max_tokens: int, requests_per_client: int,
              min_requests: int, stream: bool = False, max_wall_s: float = 90.0) -> list[dict]:
    rows = []
    make = workloads.numbered_chat(url, model, max_tokens, stream)
    run_load(url, make, 2, 6, max_wall_s=60)  # warm-up: first-request costs stay out of the figures
    for c in concurrencies:
        total = max(min_requests, requests_per_client * c)
        rows.append(run_load(url, make, c, total, max_wall_s=max_wall_s).as_dict())
    return rows


def family_sweep(url: str, make, concurrencies: list[int], requests_per_client: int, min_requests: int,
                 max_wall_s: float = 60.0) -> list[dict]:
    """The same closed loop for STT or TTS requests."""
    run_load(url, make, 2, 6, max_wall_s=60)
    return [run_load(url, make, c, max(min_requests, requests_per_client * c), max_wall_s=max_wall_s).as_dict()
            for c in concurrencies]
