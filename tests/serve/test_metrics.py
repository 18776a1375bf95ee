"""Metrics reach Prometheus through Ray Serve's metrics: real requests, then the session cluster's
metrics agent scraped as Prometheus would scrape it, and the counters checked to have moved by
exactly what was asked of them."""

from __future__ import annotations

import io
import time
import wave

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

APP = "modelfleet"  # conftest's demo app: its samples are told apart by the `application` label


def scrape(url: str) -> list:
    text = requests.get(url, timeout=10).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(samples: list, name: str, **labels: str) -> float:
    """The sum of `name` over every series of this app whose labels include `labels`."""
    return sum(s.value for s in samples if s.name == name and s.labels.get("application") == APP
               and all(s.labels.get(k) == v for k, v in labels.items()))


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return out.getvalue()


@pytest.fixture(scope="module")
def app(demo_app):
    return demo_app


def wait_until(metrics_url: str, check, timeout: float = 90) -> list:
    """Scrape until `check(samples)` holds (Ray's agents export every few seconds); return the samples."""
    deadline = time.monotonic() + timeout
    samples: list = []
    while time.monotonic() < deadline:
        samples = scrape(metrics_url)
        if check(samples):
            return samples
        time.sleep(2)
    return samples


def test_counters_move_by_what_was_asked(app, metrics_url):
    client = app.openai()
    before = scrape(metrics_url)
    chat = "ray_modelfleet_http_requests_total"

    usages = []
    for _ in range(2):
        reply = client.chat.completions.create(model="tiny-llm", max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "hello"}])
        usages.append(reply.usage)
    stream = client.chat.completions.create(model="tiny-llm", max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "hi there"}])
    usages += [chunk.usage for chunk in stream if chunk.usage is not None]
    missing = app.post("/v1/chat/completions", json={"model": "no-such-model", "messages": [
        {"role": "user", "content": "x"}]})
    assert missing.status_code == 404
    text = app.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav_bytes(2.0), "audio/wav")},
                    data={"model": "tiny-whisper"})
    assert text.status_code == 200, text.text
    speech = app.post("/v1/audio/speech", json={"model": "tiny-vits", "input": "Hello there.",
                                                "response_format": "wav"})
    assert speech.status_code == 200, speech.text
    with wave.open(io.BytesIO(speech.content)) as w:  # a streamed WAV: its header's frame count is a placeholder
        spoken_s = len(w.readframes(1 << 30)) / (w.getsampwidth() * w.getnchannels() * w.getframerate())

    prompt = sum(u.prompt_tokens for u in usages)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    assert usages[1].prompt_tokens_details.cached_tokens > 0  # the same prompt again: its blocks were stored
    completion = sum(u.completion_tokens for u in usages)
    assert len(usages) == 3 and completion > 0

    def delta(samples, name, **labels):
        return total(samples, name, **labels) - total(before, name, **labels)

    llm = {"family": "llm", "model": "tiny-llm"}
    stt = {"family": "stt", "model": "tiny-whisper"}
    tts = {"family": "tts", "model": "tiny-vits"}
    expected = {
        ("ray_modelfleet_prompt_tokens_total", "llm"): prompt,
        ("ray_modelfleet_prompt_tokens_cached_total", "llm"): cached,
        ("ray_modelfleet_completion_tokens_total", "llm"): completion,
        ("ray_modelfleet_time_to_first_token_seconds_count", "llm"): 3,
        ("ray_modelfleet_audio_transcribed_seconds_total", "stt"): 2.0,
    }
    families = {"llm": llm, "stt": stt, "tts": tts}

    def settled(samples):
        return (all(delta(samples, name, **families[f]) >= value for (name, f), value in expected.items())
                and delta(samples, "ray_modelfleet_audio_synthesized_seconds_total", **tts) > 0
                and delta(samples, chat, route="/v1/audio/speech", status="200") >= 1)

    after = wait_until(metrics_url, settled)
    time.sleep(6)  # one more export period: nothing may move past the exact amounts
    after = scrape(metrics_url)
    for (name, family), value in expected.items():
        assert delta(after, name, **families[family]) == pytest.approx(value, abs=1e-6), name
    assert delta(after, "ray_modelfleet_audio_synthesized_seconds_total", **tts) == pytest.approx(spoken_s, abs=0.02)

    # requests by route and status code, with the family and model of each
    assert delta(after, chat, route="/v1/chat/completions", status="200", method="POST", **llm) == 3
    assert delta(after, chat, route="/v1/chat/completions", status="404", model="") == 1
    assert delta(after, chat, route="/v1/audio/transcriptions", status="200", **stt) == 1
    assert delta(after, chat, route="/v1/audio/speech", status="200", **tts) == 1
    assert delta(after, "ray_modelfleet_http_request_duration_seconds_count", route="/v1/chat/completions",
                 **llm) == 3

    # batches, rates and real-time factors were observed; the replica's queue is empty again
    assert delta(after, "ray_modelfleet_batch_size_count", **llm) > 0
    assert delta(after, "ray_modelfleet_generation_tokens_per_second_count", **llm) >= 1
    assert delta(after, "ray_modelfleet_audio_real_time_factor_count", **stt) == 1
    assert delta(after, "ray_modelfleet_audio_real_time_factor_count", **tts) >= 1
    assert total(after, "ray_modelfleet_queue_depth", family="llm") == 0
    assert total(after, "ray_modelfleet_running_requests", family="llm") == 0


def test_model_state_load_time_and_fallbacks(app, metrics_url):
    models = ("tiny-llm", "tiny-whisper", "tiny-vits")

    def loaded(samples):  # a replica sets its models' gauges at each health check (every 10 s), then Ray exports
        return (total(samples, "ray_modelfleet_model_state", model="tiny-llm", state="ready") == 1
                and all(total(samples, "ray_modelfleet_model_state", model=m, state="ready") >= 1 for m in models))

    samples = wait_until(metrics_url, loaded)
    for model in models:  # one series per replica of the family
        assert total(samples, "ray_modelfleet_model_state", model=model, state="ready") >= 1, model
        assert total(samples, "ray_modelfleet_model_state", model=model, state="failed") == 0, model
        assert total(samples, "ray_modelfleet_model_load_seconds", model=model) > 0, model
    # on a machine without a GPU, the quantized strategies are passed over before the CPU one loads:
    # each shows as a fallback with its outcome, and every series names a strategy
    health = app.get("/health").json()
    info = health["models"]["tiny-llm"]
    fallbacks = info.get("fallbacks") or []
    counted = [s for s in samples if s.name == "ray_modelfleet_model_load_fallbacks_total"
               and s.labels.get("application") == APP and s.labels.get("model") == "tiny-llm"]
    assert sum(s.value for s in counted) == len(fallbacks)
    assert {s.labels["strategy"] for s in counted} == {f["strategy"] for f in fallbacks}
