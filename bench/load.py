"""Load clients: closed loop (N clients, each sending its next request once its last one is answered)
or open loop (requests arriving at a fixed mean rate, Poisson, whatever the server's speed).

Every request is timed; chat streams also time their first content token. Nothing here retries.

A closed loop measures a server at the load it lets itself take: a server that answers faster is sent
more. Two servers compared at N clients can sit at different points of their throughput/latency curves
(the faster one's requests queue more). The open loop sends both the same requests per second, as
vLLM's `benchmark_serving --request-rate` does: latency at equal offered load. Its latencies count from
each request's scheduled arrival, and it reports the rate it actually sent at and how late requests
went out (run_open_loop).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Request:
    """One HTTP request: JSON body or multipart form (fields + files)."""

    path: str
    json: dict | None = None
    form: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None  # field -> (filename, data, content type)
    stream: bool = False
    method: str = "POST"

    def body(self) -> dict[str, Any]:
        if self.method == "GET":
            return {}
        if self.json is not None:
            return {"json": self.json}
        data = aiohttp.FormData()
        for key, value in (self.form or {}).items():
            data.add_field(key, value)
        for key, (name, blob, ctype) in (self.files or {}).items():
            data.add_field(key, blob, filename=name, content_type=ctype)
        return {"data": data}


@dataclass
class Sample:
    latency_s: float
    ok: bool
    tokens: int = 0
    ttft_s: float | None = None
    error: str = ""


@dataclass
class Stats:
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    rps: float
    tokens_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    first_error: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(samples: list[Sample], concurrency: int, wall_s: float) -> Stats:
    good = [s for s in samples if s.ok]
    lat = [s.latency_s * 1000 for s in good]
    ttft = [s.ttft_s * 1000 for s in good if s.ttft_s is not None]
    errors = [s for s in samples if not s.ok]
    return Stats(
        concurrency=concurrency, requests=len(samples), errors=len(errors), wall_s=wall_s,
        rps=len(good) / wall_s if wall_s else 0.0,
        tokens_per_s=sum(s.tokens for s in good) / wall_s if wall_s else 0.0,
        p50_ms=percentile(lat, 0.5), p99_ms=percentile(lat, 0.99),
        mean_ms=statistics.fmean(lat) if lat else None,
        ttft_p50_ms=percentile(ttft, 0.5), ttft_p99_ms=percentile(ttft, 0.99),
        first_error=errors[0].error[:300] if errors else "",
    )


async def _one(session: aiohttp.ClientSession, base: str, req: Request, timeout_s: float) -> Sample:
    started = time.perf_counter()
    try:
        async with session.request(req.method, base + req.path, timeout=aiohttp.ClientTimeout(total=timeout_s),
                                **req.body()) as resp:
            if resp.status != 200:
                text = await resp.text()
                return Sample(time.perf_counter() - started, False, error=f"HTTP {resp.status}: {text[:200]}")
            if not req.stream:
                raw = await resp.read()
                tokens = 0
                if resp.content_type == "application/json":
                    usage = (json.loads(raw) or {}).get("usage") or {}
                    tokens = int(usage.get("completion_tokens") or 0)
                return Sample(time.perf_counter() - started, True, tokens)
            return await _read_stream(resp, started)
    except Exception as exc:  # a benchmark records failures; it never retries them
        return Sample(time.perf_counter() - started, False, error=f"{type(exc).__name__}: {exc}")


async def _read_stream(resp: aiohttp.ClientResponse, started: float) -> Sample:
    """OpenAI SSE: TTFT = the first chunk with non-empty delta content; tokens = usage or content chunks.

    A stream can fail after its 200: the server then sends an error event (`data: {"error": ...}`, ours
    before its `[DONE]`, transformers serve instead of its finish_reason) and the request failed. A stream
    that ends with neither `[DONE]` nor a finish_reason (the connection closed mid-answer) failed too.
    `transformers serve` ends its streams with the finish_reason (and usage) chunk, no `[DONE]`: that is a
    complete stream."""
    ttft, chunks, usage_tokens, complete, error = None, 0, None, False, ""  # complete: [DONE] or a finish_reason
    async for line in resp.content:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            complete = True
            break
        event = json.loads(data)
        if event.get("error") is not None:
            problem = event["error"]
            message = problem.get("message") if isinstance(problem, dict) else problem
            error = error or f"stream error event: {str(message)[:200]}"
            continue
        if event.get("usage"):
            usage_tokens = event["usage"].get("completion_tokens")
        for choice in event.get("choices") or []:
            if choice.get("finish_reason"):
                complete = True
            if (choice.get("delta") or {}).get("content"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - started
    latency = time.perf_counter() - started
    if not error and not complete:
        error = "stream ended without [DONE] or a finish_reason"
    if error:
        return Sample(latency, False, error=error)
    return Sample(latency, True, usage_tokens if usage_tokens is not None else chunks, ttft)


async def _run(base: str, make: Callable[[int], Request], concurrency: int, total: int, timeout_s: float,
               max_wall_s: float) -> Stats:
    samples: list[Sample] = []
    counter = iter(range(total))
    deadline = time.perf_counter() + max_wall_s
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                samples.append(await _one(session, base, make(i), timeout_s))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return summarize(samples, concurrency, wall)


async def _run_open(base: str, make: Callable[[int], Request], rate: float, total: int, timeout_s: float,
                    seed: int) -> Stats:
    import random

    gaps = random.Random(seed)  # the same arrival times for every server measured with this seed
    samples: list[Sample] = []
    lags: list[float] = []  # per request: how long after its scheduled arrival it went out
    sent: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)  # open loop: a request never waits for a free connection
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int, due: float) -> None:
            # Timed from its scheduled arrival, not from when this task got the event loop: a request the
            # client sent late (its loop busy) counts that wait too (no coordinated omission).
            now = time.perf_counter()
            sent.append(now)
            lag = max(0.0, now - due)
            lags.append(lag)
            sample = await _one(session, base, make(i), timeout_s)
            sample.latency_s += lag
            if sample.ttft_s is not None:
                sample.ttft_s += lag
            samples.append(sample)

        tasks = []
        started = time.perf_counter()
        due = started
        for i in range(total):
            due += gaps.expovariate(rate)
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.ensure_future(one(i, due)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    stats = summarize(samples, 0, wall)
    sent_over = max(sent) - started if sent else 0.0
    stats.extra = {
        "rate_rps": rate,  # asked for
        "scheduled_over_s": round(due - started, 3),  # when the last arrival was due
        "sent_over_s": round(sent_over, 3),  # when the last request actually went out
        "offered_rps": round(total / sent_over, 3) if sent_over else None,  # what the server was actually sent
        "lag_p50_ms": round(percentile(lags, 0.5) * 1000, 1) if lags else None,
        "lag_max_ms": round(max(lags) * 1000, 1) if lags else None,
    }
    return stats


def run_open_loop(base: str, make: Callable[[int], Request], rate: float, total: int, timeout_s: float = 120.0,
                  seed: int = 0) -> Stats:
    """Send `total` requests at `rate` per second on average (exponential gaps: Poisson arrivals), each at
    its time whether or not the earlier ones were answered. `rps` is what was answered per second of the
    whole run. Latency and TTFT count from each request's scheduled arrival, so a request this client sent
    late (its event loop busy: it shares the machine with the server) counts the wait as a user would.
    `extra`: rate_rps (asked for), offered_rps and sent_over_s (what was actually sent, over how long:
    below rate_rps when the client fell behind), scheduled_over_s, and lag_p50_ms / lag_max_ms (how late
    requests went out against their schedule)."""
    return asyncio.run(_run_open(base.rstrip("/"), make, rate, total, timeout_s, seed))


def run_load(base: str, make: Callable[[int], Request], concurrency: int, total: int,
             timeout_s: float = 120.0, max_wall_s: float = 120.0) -> Stats:
    """Send `total` requests from `concurrency` clients (stops early past max_wall_s)."""
    return asyncio.run(_run(base.rstrip("/"), make, concurrency, total, timeout_s, max_wall_s))


def sequential(base: str, make: Callable[[int], Request], n: int, timeout_s: float = 60.0,
               warmup: int = 1) -> list[Sample]:
    """n requests one after another on one kept-alive connection (after `warmup` untimed ones)."""

    async def go() -> list[Sample]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            out = [await _one(session, base.rstrip("/"), make(i), timeout_s) for i in range(n + warmup)]
            return out[warmup:]

    return asyncio.run(go())
