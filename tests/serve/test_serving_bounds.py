"""The configured bounds, end to end: overload (max_ongoing_requests / max_queued_requests),
`generation_timeout_s`, and `max_loaded_models`.

One real app with three small families:
- vlm: one replica that takes 1 request at a time and queues 1, serving a model that loads for an
  hour; a request that waits for it (x-wait-for-model) holds the replica's only slot meanwhile.
- llm: the same tiny Llama twice, once with a generation_timeout_s far shorter than its max_tokens.
- tts: max_loaded_models=1 over a background voice and two lazy ones; and one voice with a tiny
  generation_timeout_s.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import soundfile as sf

from serve_testutil import run_app

CUT_S = 0.05  # generation_timeout_s of cut-llm
LONG_REPLY = 480  # tokens: the tiny Llama's context is 512; at >= 1 ms a token this takes 10x CUT_S
WAIT_S = 3  # x-wait-for-model of the requests that overload stuck-vlm
LONG_TEXT = ("the quick brown fox jumps over the lazy dog. " * 40)[:1500]


@pytest.fixture(scope="module")
def bounds_app(serve_url, models_dir):
    from ray import serve

    pinned = {"autoscaling": None, "num_cpus": 0.25}
    args = {
        "device": "cpu",
        "request_timeout_s": 60,
        "local_models_dir": str(models_dir),
        "models": [
            {"name": "stuck-vlm", "source": "tiny-llava", "build_tiny": "vlm", "debug_load_delay_s": 3600},
            {"name": "cut-llm", "source": "tiny-llm", "build_tiny": "llm", "max_new_tokens": 512,
             "generation_timeout_s": CUT_S},
            {"name": "uncut-llm", "source": "tiny-llm", "build_tiny": "llm", "max_new_tokens": 512},
            {"name": "tts-bg", "source": "tiny-vits", "build_tiny": "tts"},
            {"name": "cut-tts", "source": "tiny-vits", "build_tiny": "tts", "generation_timeout_s": 0.01},
            {"name": "lazy-a", "source": "tiny-vits", "build_tiny": "tts", "loading": "lazy"},
            {"name": "lazy-b", "source": "tiny-vits", "build_tiny": "tts", "loading": "lazy"},
        ],
        "families": {
            "vlm": {**pinned, "max_ongoing_requests": 1, "max_queued_requests": 1},
            "llm": pinned,
            "tts": {**pinned, "max_loaded_models": 1},
        },
    }
    app = run_app(serve_url, "bounds", args)

    def settled(health):
        models = health["models"]
        return (models["stuck-vlm"].get("phase") == "simulated delay"
                and all(models[n]["state"] == "ready" for n in ("cut-llm", "uncut-llm", "tts-bg", "cut-tts")))

    app.wait_for(settled, timeout=120)
    yield app
    serve.delete("bounds")


def states(app) -> dict[str, str]:
    return {name: info["state"] for name, info in app.get("/health").json()["models"].items()}


def assert_openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers.get("content-type") == "application/json", (response.headers, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


# -- overload ------------------------------------------------------------------------------------------
def is_model_loading(response) -> bool:
    try:
        return response.json()["error"]["code"] == "model_loading"
    except (ValueError, KeyError, TypeError):
        return False


@pytest.fixture(scope="module")
def overload(bounds_app):
    """8 requests at once for a replica that takes 1 and queues 1: (refused, waited) (response, seconds)."""

    def ask(_):
        started = time.monotonic()
        response = bounds_app.post("/v1/chat/completions", headers={"x-wait-for-model": str(WAIT_S)}, json={
            "model": "stuck-vlm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        return response, time.monotonic() - started

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    for response, seconds in results:
        print(f"{seconds:5.2f} s {response.status_code} {response.headers.get('content-type')} {response.text[:120]!r}")
    waited = [(r, s) for r, s in results if is_model_loading(r)]
    refused = [(r, s) for r, s in results if not is_model_loading(r)]
    return refused, waited


def test_overload_is_a_503_at_once_and_the_replica_serves_again(bounds_app, overload):
    refused, waited = overload
    assert 2 <= len(waited) <= 3 and len(refused) >= 5, (len(waited), len(refused))
    for response, seconds in waited:  # the one taken and the one queued waited for the model, then 503
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        assert seconds >= WAIT_S
    for response, seconds in refused:
        assert response.status_code == 503, response.text
        assert seconds < WAIT_S, "an overloaded request is refused at once, not after waiting its turn"
    # nothing is left stuck: the replica takes a request again
    response = bounds_app.post("/v1/chat/completions", json={
        "model": "stuck-vlm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert is_model_loading(response), response.text


def test_overload_503_is_in_openai_shape_with_retry_after(overload):
    refused, _ = overload
    assert refused, "nothing was refused: the family was not overloaded"
    for response, _ in refused:
        error = assert_openai_error(response, 503)
        assert error["code"] == "overloaded" and "overloaded" in error["message"], error
        assert int(response.headers["retry-after"]) >= 1, response.headers


# -- generation_timeout_s ----------------------------------------------------------------------------------
def chat(app, model: str, max_tokens: int):
    started = time.monotonic()
    response = app.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "Tell me a long story"}],
        "max_tokens": max_tokens, "temperature": 0})
    return response, time.monotonic() - started


@pytest.fixture(scope="module")
def cut_reply(bounds_app):
    """LONG_REPLY tokens asked of a model bounded to CUT_S per generate call."""
    response, seconds = chat(bounds_app, "cut-llm", LONG_REPLY)
    print(f"cut-llm answered in {seconds:.2f} s: {response.text[:300]}")
    return response, seconds


def test_generation_timeout_s_bounds_a_generate_call(bounds_app, cut_reply):
    response, seconds = cut_reply
    assert response.status_code == 200, response.text
    cut = response.json()
    tokens = cut["usage"]["completion_tokens"]
    assert 1 <= tokens < LONG_REPLY
    assert seconds < 30, "ended far past generation_timeout_s"  # a hang guard only
    # It stopped for the time bound, not on an end token: the same greedy generation without the
    # bound goes past that point, and the bounded text is its beginning.
    uncut_response, _ = chat(bounds_app, "uncut-llm", tokens + 8)
    uncut = uncut_response.json()
    assert uncut["usage"]["completion_tokens"] == tokens + 8 and uncut["choices"][0]["finish_reason"] == "length"
    # (the cut may end inside a multi-byte character, decoded as U+FFFD, that the longer reply completes)
    cut_text = cut["choices"][0]["message"]["content"].rstrip("\ufffd")
    assert uncut["choices"][0]["message"]["content"].startswith(cut_text)


def test_a_generation_cut_by_the_time_bound_says_so(cut_reply):
    response, _ = cut_reply
    if response.status_code == 200:
        assert response.json()["choices"][0]["finish_reason"] == "length"
    else:  # or a clear error that names the bound
        error = assert_openai_error(response, response.status_code)
        assert "generation_timeout_s" in error["message"], error


def test_generation_timeout_s_bounds_a_synthesize_call(bounds_app):
    response = bounds_app.post("/v1/audio/speech", json={"model": "cut-tts", "input": LONG_TEXT, "response_format": "wav"})
    if response.status_code != 200:  # a clear error is a bound
        assert_openai_error(response, response.status_code)
        return
    full = bounds_app.post("/v1/audio/speech", json={"model": "tts-bg", "input": LONG_TEXT, "response_format": "wav"})
    assert full.status_code == 200, full.text
    cut_s, full_s = (sf.info(io.BytesIO(r.content)).duration for r in (response, full))
    assert cut_s < full_s, f"the bounded voice spoke all {full_s:.1f} s (synthesis is seeded: same audio)"


# -- max_loaded_models ---------------------------------------------------------------------------------
def speak(app, model: str) -> None:
    response = app.post("/v1/audio/speech", headers={"x-wait-for-model": "120"},
                        json={"model": model, "input": "hello there"}, timeout=150)
    assert response.status_code == 200, response.text


def test_lazy_models_beyond_max_loaded_models_are_unloaded_least_recently_used_first(bounds_app):
    before = states(bounds_app)
    assert before["lazy-a"] == before["lazy-b"] == "not_loaded"
    speak(bounds_app, "lazy-a")
    assert states(bounds_app)["lazy-a"] == "ready"
    speak(bounds_app, "lazy-b")  # max_loaded_models=1: a, the least recently used, goes
    now = states(bounds_app)
    assert (now["lazy-a"], now["lazy-b"]) == ("not_loaded", "ready"), now
    speak(bounds_app, "lazy-a")  # loads again; now b is the least recently used
    now = states(bounds_app)
    assert (now["lazy-a"], now["lazy-b"]) == ("ready", "not_loaded"), now
    speak(bounds_app, "tts-bg")  # a background model counts, but is never the one unloaded
    now = states(bounds_app)
    assert (now["tts-bg"], now["lazy-a"], now["lazy-b"]) == ("ready", "not_loaded", "not_loaded"), now
    speak(bounds_app, "lazy-b")
    now = states(bounds_app)
    assert (now["tts-bg"], now["lazy-a"], now["lazy-b"]) == ("ready", "not_loaded", "ready"), now
    assert bounds_app.get("/health").json()["status"] != "degraded"
