"""What clients and operators see while models load, fail, or cannot be placed.

A real app whose models load slowly (debug_load_delay_s), fail permanently (a Hub id that is
nowhere), load lazily, or ask for a GPU the cluster does not have.
"""

from __future__ import annotations

import time

import pytest

from serve_testutil import run_app, wav_bytes

SLOW_S = 15.0
STUCK_S = 3600.0  # never ready while this module runs: the loading state is there whenever a test looks


@pytest.fixture(scope="module")
def states_app(serve_url, models_dir):
    from ray import serve

    args = {
        "device": "cpu",
        "request_timeout_s": 30,
        "local_models_dir": str(models_dir),
        "models": [
            {"name": "slow-llm", "source": "tiny-llm", "build_tiny": "llm", "debug_load_delay_s": SLOW_S},
            {"name": "stuck-llm", "source": "tiny-llm", "build_tiny": "llm", "debug_load_delay_s": STUCK_S},
            {"name": "broken-llm", "source": "acme/no-such-model", "family": "llm"},
            {"name": "lazy-tts", "source": "tiny-vits", "build_tiny": "tts", "loading": "lazy"},
            # loads for a minute on first use: a request waiting for it is in flight in the replica
            {"name": "doomed-stt", "source": "tiny-whisper", "build_tiny": "stt", "loading": "lazy",
             "debug_load_delay_s": 60},
        ],
        "families": {"llm": {"autoscaling": None}, "tts": {"autoscaling": None}, "stt": {"autoscaling": None}},
    }
    started = time.monotonic()
    app = run_app(serve_url, "states", args)
    # the first /health that answers, taken as soon as the app is up
    app.first_health = app.get("/health").json()
    print(f"states app answering /health after {time.monotonic() - started:.1f} s")
    yield app
    serve.delete("states")


def chat(app, model, headers=None):
    return app.post("/v1/chat/completions", headers=headers or {},
                    json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})


def stuck_in_delay(health: dict) -> bool:
    return health["models"]["stuck-llm"].get("phase") == "simulated delay"


def test_health_answers_while_models_load_and_shows_each_state(states_app):
    # the server is up before the models are loaded (no wall time: stuck-llm cannot be loaded by now)
    first = states_app.first_health["models"]
    assert first["stuck-llm"]["state"] in ("not_loaded", "loading"), first["stuck-llm"]
    health = states_app.wait_for(lambda h: h["models"]["broken-llm"]["state"] == "failed" and stuck_in_delay(h),
                                 timeout=90)
    models = health["models"]
    assert health["status"] == "degraded"
    assert models["stuck-llm"]["state"] == "loading" and 0 <= models["stuck-llm"]["progress"] < 1
    assert models["lazy-tts"]["state"] == "not_loaded"
    error = models["broken-llm"]["error"]
    assert "acme/no-such-model" in error and "modelfleet fetch" in error


@pytest.mark.parametrize("wait_header", [None, "1"])
def test_request_for_a_loading_model_gets_503_with_retry_after_and_phase(states_app, wait_header):
    """Always exercised: stuck-llm is loading for the whole module. A short wait that runs out is the same 503."""
    states_app.wait_for(stuck_in_delay, timeout=90)
    started = time.monotonic()
    response = chat(states_app, "stuck-llm", headers={"x-wait-for-model": wait_header} if wait_header else None)
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "model_loading" and "stuck-llm" in error["message"] and "simulated delay" in error["message"]
    if wait_header:
        assert time.monotonic() - started >= 1.0  # it did wait before giving up


@pytest.mark.parametrize(("method", "path", "body"), [
    ("post", "/tokenize", {"model": "stuck-llm", "prompt": "hi"}),
    ("post", "/detokenize", {"model": "stuck-llm", "tokens": [1, 2]}),
    ("get", "/tokenizer_info?model=stuck-llm", None),
], ids=["tokenize", "detokenize", "tokenizer_info"])
def test_the_tokenizer_routes_of_a_loading_model_get_503_with_retry_after(states_app, method, path, body):
    """The tokenizer lives in the family replica with the model: until it is loaded, a chat's answer."""
    states_app.wait_for(stuck_in_delay, timeout=90)
    response = getattr(states_app, method)(path, **({"json": body} if body else {}))
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "model_loading", response.text


def test_a_client_may_ask_to_wait_for_the_model(states_app):
    response = chat(states_app, "slow-llm", headers={"x-wait-for-model": "60"})
    assert response.status_code == 200, response.text
    health = states_app.get("/health").json()["models"]["slow-llm"]
    assert health["state"] == "ready" and health["load_seconds"] >= SLOW_S


def test_a_permanent_failure_is_sticky_visible_and_never_restart_loops(states_app):
    pid = states_app.get("/health").json()["models"]["broken-llm"]["replica"]["pid"]
    for _ in range(3):
        response = chat(states_app, "broken-llm")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_load_failed"
        assert "retry-after" not in response.headers
    time.sleep(2)
    info = states_app.get("/health").json()["models"]["broken-llm"]
    assert info["state"] == "failed" and info["replica"]["pid"] == pid  # same replica: no restart loop
    # and the healthy model in the same replica keeps serving
    assert chat(states_app, "slow-llm", headers={"x-wait-for-model": "60"}).status_code == 200


def test_a_lazy_model_loads_on_first_use(states_app):
    assert states_app.get("/health").json()["models"]["lazy-tts"]["state"] == "not_loaded"
    response = states_app.post("/v1/audio/speech", headers={"x-wait-for-model": "60"},
                               json={"model": "lazy-tts", "input": "hello", "response_format": "wav"})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    assert states_app.get("/health").json()["models"]["lazy-tts"]["state"] == "ready"


def test_a_replica_that_dies_mid_request_is_a_503_and_is_replaced(states_app):
    from concurrent.futures import ThreadPoolExecutor

    import ray

    old_pid = states_app.get("/health").json()["models"]["doomed-stt"]["replica"]["pid"]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(states_app.post, "/v1/audio/transcriptions", headers={"x-wait-for-model": "120"},
                              files={"file": ("a.wav", wav_bytes(1.0))}, data={"model": "doomed-stt"}, timeout=60)
        deadline = time.monotonic() + 60
        while states_app.get("/health").json()["models"]["doomed-stt"]["state"] != "loading":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["name"].startswith("SERVE_REPLICA::states#stt#"))
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        response = pending.result()
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "replica_died"
    started = time.monotonic()
    health = states_app.wait_for(
        lambda h: h["models"]["doomed-stt"].get("replica", {}).get("pid") not in (None, old_pid), timeout=60)
    print(f"replacement replica answering after {time.monotonic() - started:.1f} s")
    assert health["models"]["doomed-stt"]["state"] == "not_loaded"


@pytest.fixture(scope="module")
def gpu_app(serve_url, models_dir):
    """Asks for a GPU per replica on a cluster that has none: Ray would leave it pending silently."""
    from ray import serve

    args = {"device": "gpu", "request_timeout_s": 3, "status_timeout_s": 2, "local_models_dir": str(models_dir),
            "models": [{"name": "gpu-llm", "source": "tiny-llm", "build_tiny": "llm"}],
            "families": {"llm": {"autoscaling": None}}}
    app = run_app(serve_url, "gpu", args, blocking=False)
    yield app
    serve.delete("gpu", _blocking=False)


def test_a_replica_pending_for_a_gpu_is_reported_not_silent(gpu_app):
    health = gpu_app.get("/health").json()
    assert health["status"] == "degraded"
    assert any("GPU" in note for note in health["notes"]), health
    assert health["models"]["gpu-llm"]["state"] == "unavailable"
    started = time.monotonic()
    response = chat(gpu_app, "gpu-llm")  # request_timeout_s=3; the client would give up after 60 s
    assert time.monotonic() - started < 40, "must not hang"
    assert response.status_code == 503
    assert "GPU" in response.json()["error"]["message"]
