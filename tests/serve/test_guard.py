"""API keys, the ingress's own bound on requests in flight, request cancellation, /openapi.json.

One app: the demo models plus a deliberately slow copy of the tiny LLM (`debug_step_delay_s`),
API keys from a file, and room for only a few requests at once.
"""

from __future__ import annotations

import functools
import io
import threading
import time

import httpx
import openai
import pytest
import requests
import soundfile as sf

from serve_testutil import demo_args, run_app, wav_bytes

KEYS = ["key-one-0123456789abcdef", "key-two-0123456789abcdef"]
STEP_S = 0.1  # the slow model's delay per generated token
SLOW_TOKENS = 40


@pytest.fixture(scope="module")
def app(serve_url, models_dir, tmp_path_factory):
    from ray import serve

    key_file = tmp_path_factory.mktemp("auth") / "keys"
    key_file.write_text(f"# one key per line\n{KEYS[0]}\n\n{KEYS[1]}\n")
    args = demo_args()
    args["local_models_dir"] = str(models_dir)
    args["models"].append({"name": "slow-llm", "source": "slow-llm", "build_tiny": "llm", "max_new_tokens": 64,
                           "debug_step_delay_s": STEP_S})
    args["auth"] = {"api_keys_file": str(key_file), "required": True}
    args["limits"] = {"max_concurrent_requests": 6}
    for options in args["families"].values():
        options["autoscaling"] = None
    app = run_app(serve_url, "guarded", args)
    auth = {"Authorization": f"Bearer {KEYS[1]}"}
    deadline = time.monotonic() + 120
    while (health := requests.get(app.url + "/health", headers=auth, timeout=10).json())["status"] != "ok":
        assert time.monotonic() < deadline, f"the guarded app never became healthy: {health}"
        time.sleep(0.5)
    yield app
    serve.delete("guarded")


def client(app, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=key, timeout=60, max_retries=0)


def with_key(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def every_route(app) -> list[tuple[str, str]]:
    spec = requests.get(app.url + "/openapi.json", headers=with_key(KEYS[0]), timeout=10).json()
    return [(method.upper(), path.replace("{model}", "tiny-llm")) for path, methods in spec["paths"].items()
            for method in methods]


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef", "", KEYS[0] + "x"])
def test_every_route_but_health_refuses_a_missing_or_wrong_key(app, key):
    routes = every_route(app) + [("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/nope")]
    assert len(routes) >= 12
    for method, path in routes:
        response = requests.request(method, app.url + path, headers=with_key(key), json={}, timeout=30)
        if path == "/health":
            assert response.status_code == 200
            continue
        assert response.status_code == 401, (method, path, response.text)
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key"), error
        assert response.headers["www-authenticate"] == "Bearer"


def test_health_shows_details_only_to_a_caller_with_a_key(app):
    public = requests.get(app.url + "/health", timeout=30).json()
    private = requests.get(app.url + "/health", headers=with_key(KEYS[0]), timeout=30).json()
    assert public["status"] == private["status"] == "ok"
    assert set(public) == {"status", "models"}
    assert all(set(info) <= {"name", "family", "state", "phase", "progress", "demo"} for info in public["models"].values())
    assert "ingress" in private and all("replica" in info for info in private["models"].values())
    assert "/" not in str(public)  # no paths, no errors, no pids
    head = requests.head(app.url + "/health", timeout=30)  # an uptime monitor's probe: was a 405
    assert (head.status_code, head.content) == (200, b""), head.headers


def test_the_openai_client_works_with_either_key_and_fails_clearly_without(app):
    for key in KEYS:
        reply = client(app, key).chat.completions.create(
            model="tiny-llm", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")
    speech = client(app, KEYS[0]).audio.speech.create(model="tiny-vits", voice="alloy", input="hello")
    assert sf.info(io.BytesIO(speech.content)).format == "MP3"  # OpenAI's default format
    text = client(app, KEYS[1]).audio.transcriptions.create(model="tiny-whisper", file=("a.wav", wav_bytes(1.0)))
    assert isinstance(text.text, str)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client(app, "not-a-key-0123456789abcdef").models.list()


def test_the_small_client_sends_a_key_and_names_a_url_without_a_scheme(app, monkeypatch):
    """deployments/client.py had no way to send a key (every call 401 against the GPU and cluster configs),
    and MODELFLEET_URL without a scheme escaped as a raw requests exception instead of ModelServerError."""
    from deployments import client as small_client

    monkeypatch.delenv("MODELFLEET_API_KEY", raising=False)
    with pytest.raises(small_client.ModelServerError) as refused:
        small_client.generate_remote_reply("hi", base_url=app.url, timeout=60)
    assert refused.value.status == 401
    # the tiny model: the keys are what is tested, not SmolLM2's reply to "hi" (up to its max_new_tokens,
    # which once took past 60 s on a loaded CI machine)
    ask = functools.partial(small_client.generate_remote_reply, "hi", model="tiny-llm", base_url=app.url, timeout=60)
    assert isinstance(ask(api_key=KEYS[0]), str)
    monkeypatch.setenv("MODELFLEET_API_KEY", KEYS[1])
    assert isinstance(ask(), str)
    with pytest.raises(small_client.ModelServerError, match="MODELFLEET_URL"):
        small_client.generate_remote_reply("hi", base_url=app.url.removeprefix("http://"), timeout=60)


def test_past_max_concurrent_requests_the_ingress_answers_503_with_retry_after(app):
    """Slow requests hold the ingress's 6 places; the next ones get 503 at once, the held ones finish."""
    results: list[int] = []

    # greedy: each runs its 20 tokens (~2 s). Sampled at temperature 1, a row ends early at the tiny Llama's end
    # token (p ~5e-4 a token: ~1% of rows within 20), freeing its place before the sixth arrives: no 503 to see
    def slow():
        results.append(requests.post(app.url + "/v1/chat/completions", headers=with_key(KEYS[0]), timeout=60, json={
            "model": "slow-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
            "temperature": 0}).status_code)

    threads = [threading.Thread(target=slow) for _ in range(6)]
    for thread in threads:
        thread.start()
    # once all six are in (each generates for ~2 s), the next request is refused; on a loaded machine the
    # six may take longer than a fixed sleep to arrive (CI: a 200 after 1.5 s), so ask until they have
    deadline = time.monotonic() + 30
    while True:
        time.sleep(0.1)
        refused = requests.get(app.url + "/v1/models", headers=with_key(KEYS[0]), timeout=30)
        if refused.status_code != 200 or time.monotonic() > deadline or not any(t.is_alive() for t in threads):
            break
    for thread in threads:
        thread.join()
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "overloaded" and "max_concurrent_requests=6" in refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert results == [200] * 6


def slow_stats(app) -> dict:
    health = requests.get(app.url + "/health", headers=with_key(KEYS[0]), timeout=30).json()
    return health["models"]["slow-llm"]["replica"]["batching"]


def wait_for_cancel(app, before: dict) -> dict:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stats = slow_stats(app)
        if stats.get("cancelled_tokens", 0) > before.get("cancelled_tokens", 0):
            return stats
        time.sleep(0.2)
    raise AssertionError(f"the cancelled request's row was never dropped: {slow_stats(app)}")


def test_a_client_that_disconnects_stops_its_generation_at_the_next_step(app):
    body = {"model": "slow-llm", "messages": [{"role": "user", "content": "Tell me a long story"}],
            "max_tokens": SLOW_TOKENS, "temperature": 0}
    before = slow_stats(app)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s of a ~4 s generation
        httpx.post(app.url + "/v1/chat/completions", json=body, headers=with_key(KEYS[0]), timeout=1.0)
    after = wait_for_cancel(app, before)
    made = after["cancelled_tokens"] - before.get("cancelled_tokens", 0)
    assert 0 < made < SLOW_TOKENS - 10, f"{made} of {SLOW_TOKENS} tokens were made for a client that left after 1 s"


def test_a_stream_closed_early_stops_its_generation(app):
    body = {"model": "slow-llm", "messages": [{"role": "user", "content": "Tell me a long story"}],
            "max_tokens": SLOW_TOKENS, "temperature": 0, "stream": True}
    before = slow_stats(app)
    with httpx.stream("POST", app.url + "/v1/chat/completions", json=body, headers=with_key(KEYS[0]),
                      timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the first chunk arrived; then the client hangs up
    after = wait_for_cancel(app, before)
    assert after["cancelled_tokens"] - before.get("cancelled_tokens", 0) < SLOW_TOKENS - 10


def test_openapi_documents_every_route_its_body_and_its_errors(app):
    spec = requests.get(app.url + "/openapi.json", headers=with_key(KEYS[0]), timeout=10).json()
    paths = spec["paths"]
    for path in ("/v1/chat/completions", "/v1/audio/transcriptions", "/v1/audio/speech", "/v1/audio/chat",
                 "/v1/models", "/v1/models/{model}", "/health", "/generate", "/stt", "/tts"):
        assert path in paths, sorted(paths)
    chat = paths["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert {"400", "401", "404", "413", "503"} <= set(chat["responses"])
    assert chat["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    schemas = spec["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["description"] == "The conversation so far."
    upload = paths["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload
    # the errors documented are those sent: a validation error is a 400 in OpenAI's shape, never FastAPI's 422
    assert all("422" not in operation["responses"] for operations in paths.values() for operation in operations.values())
    assert "HTTPValidationError" not in schemas


def test_a_replica_with_a_fraction_of_a_cpu_computes_on_every_core_of_the_node(app):
    """Ray sets OMP_NUM_THREADS=1 for num_cpus < 1; the family's torch_threads default undoes that
    (for models big enough to split their work)."""
    import os

    health = requests.get(app.url + "/health", headers=with_key(KEYS[0]), timeout=30).json()
    threads = {info["family"]: info["replica"]["torch_threads"] for info in health["models"].values()}
    assert threads == {family: len(os.sched_getaffinity(0)) for family in ("llm", "vlm", "stt", "tts")}
    # ... for a model big enough to split its work (the real 135M-parameter chat model); a tiny one
    # computes on one thread (single_thread_below_params)
    loaded = {name: info["torch_threads"] for name, info in health["models"].items() if "torch_threads" in info}
    assert loaded.pop("smollm2-135m-instruct") == len(os.sched_getaffinity(0))
    assert loaded and set(loaded.values()) == {1}, loaded


def test_the_replicas_of_a_cpu_node_compute_in_turns_on_one_shared_lock(app):
    """Every CPU replica takes the node's turn (deployments/cpu_turns.py) around its multi-threaded
    forwards: the same lock file for all families; the real chat model (two threads) takes turns,
    the tiny one-thread Whisper none."""
    reply = client(app, KEYS[0]).chat.completions.create(model="smollm2-135m-instruct", max_tokens=4, temperature=0,
                                                         messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    heard = requests.post(app.url + "/v1/audio/transcriptions", headers=with_key(KEYS[0]), timeout=60,
                          files={"file": ("a.wav", wav_bytes(1.0), "audio/wav")}, data={"model": "tiny-whisper"})
    assert heard.status_code == 200, heard.text
    health = requests.get(app.url + "/health", headers=with_key(KEYS[0]), timeout=30).json()
    turns = {info["family"]: info["replica"]["cpu_turns"] for info in health["models"].values()}
    assert set(turns) == {"llm", "vlm", "stt", "tts"}
    assert len({t["path"] for t in turns.values()}) == 1, turns
    assert turns["llm"]["turns"] >= 4, turns  # the prefill and the steps
    assert turns["llm"]["computed_s"] > 0 and "deferrals" in turns["llm"], turns  # shared by time (the default)
    assert turns["stt"]["turns"] == 0, turns  # one thread: it computes at once
