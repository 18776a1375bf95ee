"""modelfleet's metrics, exported through Ray Serve's metrics (`ray.serve.metrics`), so that they
reach Prometheus the way every Ray Serve app's do: each Ray node's metrics agent serves them, with
Ray's `ray_` prefix and the `application`, `deployment` and `replica` labels Serve adds.

The names below are the whole list; README "Metrics" documents them. Labels are bounded sets
only: a model label is always a configured model's canonical name (never a string from a request),
a route label a route's template. Recording one costs ~5-10 µs.
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve import metrics as serve_metrics

PREFIX = "modelfleet_"
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
TOKENS_PER_S_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]
# compute seconds per audio second: below 1 is faster than real time
RTF_BUCKETS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5]
MODEL_STATES = ("not_loaded", "loading", "ready", "failed")

_defined: dict[str, Any] = {}  # one Ray metric object per name and process (Ray keys them by name)


def _metric(kind: type, name: str, description: str, tags: tuple[str, ...], **extra: Any) -> Any:
    full = PREFIX + name
    if full not in _defined:
        _defined[full] = kind(full, description=description, tag_keys=tags, **extra)
    return _defined[full]


def _counter(name: str, description: str, *tags: str) -> Any:
    """Exported as `ray_modelfleet_<name>_total` (Ray adds the suffix)."""
    return _metric(serve_metrics.Counter, name, description, tags)


def _gauge(name: str, description: str, *tags: str) -> Any:
    return _metric(serve_metrics.Gauge, name, description, tags)


def _histogram(name: str, description: str, buckets: list, *tags: str) -> Any:
    return _metric(serve_metrics.Histogram, name, description, tags, boundaries=buckets)


class IngressMetrics:
    """What the HTTP door sees: every request by route, status code, family and model."""

    def __init__(self) -> None:
        self.requests = _counter("http_requests", "HTTP requests answered, by route template, method, "
                                 "status code, model family and model", "route", "method", "status", "family", "model")
        self.duration = _histogram("http_request_duration_seconds", "Time from request to the end of the response "
                                   "(whole stream included)", LATENCY_BUCKETS_S, "route", "family", "model")
        self.in_flight = _gauge("http_requests_in_flight", "HTTP requests this ingress replica is working on")

    def answered(self, route: str, method: str, status: int, family: str, model: str, seconds: float) -> None:
        self.requests.inc(1, tags={"route": route, "method": method, "status": str(status), "family": family,
                                   "model": model})
        self.duration.observe(seconds, tags={"route": route, "family": family, "model": model})


class FamilyMetrics:
    """What a family replica does: its queue, batches, tokens, audio and model loads."""

    def __init__(self, family: str):
        self.family = family
        self._queued = self._running = 0
        self._loads_seen: dict[str, int] = {}  # model -> the load count whose fallbacks were counted
        self._reported: set[str] = set()  # the models the last status had
        self.queue_depth = _gauge("queue_depth", "Requests in the replica waiting for a model call (memory budget, "
                                  "a batch slot, prefill) ", "family")
        self.running = _gauge("running_requests", "Requests in the replica whose output is being made", "family")
        self.batch_size = _histogram("batch_size", "Requests per model call (LLM/VLM: rows per decode step)",
                                     BATCH_BUCKETS, "family", "model")
        self.ttft = _histogram("time_to_first_token_seconds", "From the request's arrival at the replica to its "
                               "first generated token", LATENCY_BUCKETS_S, "family", "model")
        self.tokens_per_s = _histogram("generation_tokens_per_second", "Completion tokens per second of one request, "
                                       "from its first token to its last", TOKENS_PER_S_BUCKETS, "family", "model")
        self.prompt_tokens = _counter("prompt_tokens", "Prompt tokens processed", "family", "model")
        self.cached_tokens = _counter("prompt_tokens_cached", "Of the prompt tokens, those the prefix cache supplied "
                                      "(keys and values not computed again)", "family", "model")
        self.completion_tokens = _counter("completion_tokens", "Completion tokens generated", "family", "model")
        self.audio_in = _counter("audio_transcribed_seconds", "Seconds of audio transcribed or translated",
                                 "family", "model")
        self.audio_out = _counter("audio_synthesized_seconds", "Seconds of audio synthesized", "family", "model")
        self.rtf = _histogram("audio_real_time_factor", "Compute seconds per second of audio, per model call "
                              "(< 1: faster than real time)", RTF_BUCKETS, "family", "model")
        self.load_seconds = _gauge("model_load_seconds", "How long the model's last load took", "family", "model")
        self.state = _gauge("model_state", "1 for the model's current state (not_loaded, loading, ready, failed), "
                            "0 for the others", "family", "model", "state")
        self.fallbacks = _counter("model_load_fallbacks", "Loading strategies that did not load the model "
                                  "(outcome failed or skipped) before the one that did", "family", "model",
                                  "strategy", "outcome")
        self.queue_depth.set(0, tags={"family": family})
        self.running.set(0, tags={"family": family})

    def _tags(self, model: str) -> dict[str, str]:
        return {"family": self.family, "model": model}

    # -- the replica's queue: a request is queued until its output starts, then running -------------
    def queued(self, delta: int) -> None:
        self._queued += delta
        self.queue_depth.set(self._queued, tags={"family": self.family})

    def started(self, delta: int) -> None:
        self._running += delta
        self.running.set(self._running, tags={"family": self.family})

    def batch(self, model: str, size: int) -> None:
        self.batch_size.observe(size, tags=self._tags(model))

    def generated(self, model: str, arrived: float, first_token: float | None, prompt_tokens: int,
                  completion_tokens: int, cached_tokens: int = 0) -> None:
        """One finished chat/completion request (`arrived`, `first_token`: time.monotonic() stamps)."""
        tags = self._tags(model)
        self.prompt_tokens.inc(prompt_tokens, tags=tags)
        if cached_tokens:
            self.cached_tokens.inc(cached_tokens, tags=tags)
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens, tags=tags)
        if first_token is not None:
            self.ttft.observe(first_token - arrived, tags=tags)
            spent = time.monotonic() - first_token
            if completion_tokens > 1 and spent > 0:
                self.tokens_per_s.observe((completion_tokens - 1) / spent, tags=tags)

    def audio(self, model: str, synthesized: bool, audio_seconds: float, compute_seconds: float) -> None:
        tags = self._tags(model)
        (self.audio_out if synthesized else self.audio_in).inc(audio_seconds, tags=tags)
        if audio_seconds > 0:
            self.rtf.observe(compute_seconds / audio_seconds, tags=tags)

    def models(self, status: list[dict]) -> None:
        """Model state, load time and fallbacks, from the pool's status (called on every health check). A
        model gone from the pool (unloaded at run time) gets 0 for every state: a Ray gauge cannot drop a
        series, and its last state would otherwise read on as current."""
        names = {info["name"] for info in status}
        for gone in self._reported - names:
            for state in MODEL_STATES:
                self.state.set(0, tags={**self._tags(gone), "state": state})
        self._reported = names
        for info in status:
            tags = self._tags(info["name"])
            for state in MODEL_STATES:
                self.state.set(1 if info.get("state") == state else 0, tags={**tags, "state": state})
            if info.get("load_seconds") is not None:
                self.load_seconds.set(info["load_seconds"], tags=tags)
            loads = info.get("load_count", 0)
            if info.get("state") == "ready" and self._loads_seen.get(info["name"]) != loads:
                self._loads_seen[info["name"]] = loads
                for attempt in info.get("fallbacks") or []:
                    self.fallbacks.inc(1, tags={**tags, "strategy": attempt["strategy"],
                                                "outcome": attempt["outcome"]})
