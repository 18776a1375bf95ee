"""Adapters and whole models loaded and unloaded at run time, through the admin routes, against a real app.

One app: two LLM replicas (tiny-llm, and slow-llm whose every step sleeps, so that a stream lasts a few
seconds), one VLM replica (tiny-llava), API keys and admin keys from files. The adapters are tiny LoRA
adapters built with loading's tiny recipes into LOCAL_MODELS_DIR; the whole model is a tiny LLM built
into a directory of its own. Everything goes through HTTP: the vLLM-style admin bodies with requests,
chat with the official openai client.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from serve_testutil import run_app

API_KEY = "user-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
ASK = [{"role": "user", "content": "Tell me a story about a cat."}]
STEP_S = 0.06  # slow-llm's delay per generated token: a 48-token stream lasts ~3 s


def admin(app, path: str, body: dict, key: str | None = ADMIN_KEY, timeout: float = 60) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(app.url + path, json=body, headers=headers, timeout=timeout)


def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=API_KEY, timeout=60, max_retries=0)


def health(app) -> dict:
    return requests.get(app.url + "/health", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).json()


def greedy(app, model: str, tokens: int = 12) -> str:
    reply = client(app).chat.completions.create(model=model, messages=ASK, max_tokens=tokens, temperature=0)
    return reply.choices[0].message.content


def listed(app) -> set[str]:
    return {card.id for card in client(app).models.list().data}


def with_adapter(app, name: str = "rt-lora", path: str = "rt-llm-lora") -> None:
    """The adapter loaded at run time (by an earlier test, or now when this one runs alone)."""
    if name not in listed(app):
        response = admin(app, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        assert response.status_code == 200, response.text


def replica_pids(app, model: str, count: int = 2, timeout: float = 60) -> dict[int, str]:
    """pid -> state of `model` on each replica /health reached (it asks one per call), until `count` answered."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < deadline:
        info = health(app)["models"].get(model, {})
        if info.get("replica"):
            seen[info["replica"]["pid"]] = info["state"]
    return seen


@pytest.fixture(scope="module")
def adapters(models_dir) -> dict[str, Path]:
    """LoRA adapters in LOCAL_MODELS_DIR: over tiny-llm (by its directory), over slow-llm (its adapter_config
    names the served model), over tiny-llava; and a tiny LLM of its own directory, outside it."""
    from loading.tiny import ensure_tiny

    llm, vlm = ensure_tiny("llm", models_dir / "tiny-llm"), ensure_tiny("vlm", models_dir / "tiny-llava")
    out = {"llm": ensure_tiny("llm-lora", models_dir / "rt-llm-lora", base=llm, seed=5),
           "vlm": ensure_tiny("vlm-lora", models_dir / "rt-vlm-lora", base=vlm, seed=5)}
    slow = models_dir / "rt-slow-lora"
    if not slow.exists():
        shutil.copytree(out["llm"], slow)
        config = slow / "adapter_config.json"
        config.write_text(config.read_text().replace(str(llm), "slow-llm"))
    out["slow"] = slow
    out["model"] = ensure_tiny("llm", models_dir.parent / "outside" / "extra-llm", seed=3)
    return out


@pytest.fixture(scope="module")
def app(serve_url, models_dir, adapters, tmp_path_factory):
    from ray import serve

    secrets = tmp_path_factory.mktemp("runtime-keys")
    (secrets / "keys").write_text(API_KEY + "\n")
    (secrets / "admin").write_text(ADMIN_KEY + "\n")
    args = {
        "device": "cpu", "request_timeout_s": 60, "local_models_dir": str(models_dir),
        "models": [
            {"name": "tiny-llm", "source": "tiny-llm", "build_tiny": "llm", "max_new_tokens": 64},
            {"name": "slow-llm", "source": "slow-llm", "build_tiny": "llm", "max_new_tokens": 64,
             "debug_step_delay_s": STEP_S},
            {"name": "tiny-llava", "source": "tiny-llava", "build_tiny": "vlm", "max_new_tokens": 16},
        ],
        # two LLM replicas on this one machine on purpose (a model registered at runtime reaches both):
        # CPU replicas are one per node unless max_replicas_per_node says otherwise
        "families": {"llm": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 2, "max_replicas": 2},
                             "max_replicas_per_node": 2},
                     "vlm": {"num_cpus": 0.25, "autoscaling": None}},
        "ingress": {"num_cpus": 0.25},
        "auth": {"api_keys_file": str(secrets / "keys"), "admin_keys_file": str(secrets / "admin")},
    }
    started = time.monotonic()
    app = run_app(serve_url, "runtime", args)
    app.wait_for(lambda h: h["status"] == "ok", timeout=120)
    # /health asks one replica per family: wait until both LLM replicas have said all is ready
    ready: set[int] = set()
    deadline = time.monotonic() + 120
    while len(ready) < 2:
        assert time.monotonic() < deadline, health(app)
        models = health(app)["models"]
        if all(models[name]["state"] == "ready" for name in ("tiny-llm", "slow-llm", "tiny-llava")):
            ready.add(models["tiny-llm"]["replica"]["pid"])
    print(f"\n[timing] runtime app ready in {time.monotonic() - started:.1f} s")
    yield app
    serve.delete("runtime")


# -- authorisation ---------------------------------------------------------------------------------------------

def test_admin_routes_need_an_admin_key_not_an_api_key(app, adapters):
    body = {"lora_name": "nope", "lora_path": str(adapters["llm"])}
    missing = admin(app, "/v1/load_lora_adapter", body, key=None)
    assert missing.status_code == 401, missing.text  # the API-key guard: no key at all
    user = admin(app, "/v1/load_lora_adapter", body, key=API_KEY)
    assert user.status_code == 403, user.text
    assert user.json()["error"]["code"] == "admin_key_required"
    wrong = admin(app, "/models/unload", {"model_id": "nope"}, key="wrong-key-0123456789abcdef")
    assert wrong.status_code == 401, wrong.text
    assert "nope" not in listed(app)


def test_without_an_admin_key_configured_the_admin_routes_are_off():
    """A real ingress app in-process (no family is called: the routes refuse first), user keys off."""
    from fastapi.testclient import TestClient

    from deployments.api import build_api
    from deployments.app_config import AppConfig
    from deployments.ingress import Ingress

    config = AppConfig.model_validate({"models": [{"name": "m", "source": "tiny-llm", "family": "llm"}]})
    http = TestClient(build_api(Ingress({}, config)))
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "a"}), ("/models/load", {"model_id": "/x"}),
                       ("/models/unload", {"model_id": "a"})):
        response = http.post(path, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert response.status_code == 403, response.text
        error = response.json()["error"]
        assert error["code"] == "admin_disabled" and "auth.admin_keys_env" in error["message"], error


# -- adapters ----------------------------------------------------------------------------------------------------

def test_an_adapter_loaded_at_run_time_is_listed_and_answers_unlike_its_base(app, adapters):
    base_answer = greedy(app, "tiny-llm")
    started = time.monotonic()
    # exactly vLLM's body: the base is found from the adapter's own base_model_name_or_path (tiny-llm's directory)
    response = admin(app, "/v1/load_lora_adapter", {"lora_name": "rt-lora", "lora_path": "rt-llm-lora"})
    loaded_s = time.monotonic() - started
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["base_model"], body["family"]) == ("loaded", "tiny-llm", "llm"), body
    assert body["message"] == "Success: LoRA adapter 'rt-lora' added successfully."
    assert "rt-lora" in listed(app)  # at once
    answers = {greedy(app, "rt-lora") for _ in range(6)}  # served by either replica: one greedy answer
    assert len(answers) == 1 and answers != {base_answer}, (answers, base_answer)
    print(f"\n[timing] load_lora_adapter answered in {loaded_s:.2f} s")


def test_every_replica_of_the_family_serves_it(app):
    """/health asks one replica at a time: both LLM replicas report the adapter ready (the one the load call
    did not reach applied the catalog on its next call), and chat answers the same on both."""
    with_adapter(app)
    seen = replica_pids(app, "rt-lora")
    assert len(seen) == 2 and set(seen.values()) == {"ready"}, seen


def test_a_replica_started_later_gets_the_adapter(app):
    """Kill one LLM replica: Serve starts another, which reads the runtime catalog when it starts."""
    import ray

    with_adapter(app)
    before = set(replica_pids(app, "rt-lora"))
    assert len(before) == 2, before
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::runtime#llm#")]
    assert len(replicas) == 2, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        models = health(app)["models"]
        info = models.get("rt-lora", {})
        pid = info.get("replica", {}).get("pid")
        if pid is not None and pid not in before and info["state"] == "ready":
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"no new replica reported rt-lora ready; last: {health(app)['models'].get('rt-lora')}")
    assert greedy(app, "rt-lora") == greedy(app, "rt-lora")


def test_unloading_lets_a_running_stream_finish_and_refuses_new_requests_at_once(app):
    started = time.monotonic()
    response = admin(app, "/v1/load_lora_adapter", {"lora_name": "rt-slow", "lora_path": "rt-slow-lora"})
    print(f"\n[timing] a second load_lora_adapter answered in {time.monotonic() - started:.2f} s")
    assert response.status_code == 200, response.text
    assert response.json()["base_model"] == "slow-llm"  # its adapter_config names the served model
    text, finish, first = [], [], threading.Event()

    def stream():
        chunks = client(app).chat.completions.create(model="rt-slow", messages=ASK, max_tokens=48, temperature=0,
                                                     stream=True)
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
                first.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                finish.append(chunk.choices[0].finish_reason)

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(30), "the stream never started"
    started = time.monotonic()
    unloaded = admin(app, "/v1/unload_lora_adapter", {"lora_name": "rt-slow"})
    print(f"\n[timing] unload_lora_adapter answered in {time.monotonic() - started:.2f} s, "
          f"in_flight on the replica asked: {unloaded.json().get('in_flight')}")
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["message"] == "Success: LoRA adapter 'rt-slow' removed successfully."
    assert reader.is_alive(), "the stream ended before the unload: make slow-llm slower"
    with pytest.raises(openai.NotFoundError, match="rt-slow"):
        greedy(app, "rt-slow")
    assert time.monotonic() - started < 5
    assert "rt-slow" not in listed(app)
    reader.join(60)
    assert finish == ["length"] and len("".join(text)) > 0, (finish, text)
    print(f"\n[timing] the stream went on {time.monotonic() - started:.2f} s after the unload began")
    again = admin(app, "/v1/unload_lora_adapter", {"lora_name": "rt-slow"})
    assert again.status_code == 404, again.text
    # its base keeps serving; a re-added adapter of the same name is a new one
    assert greedy(app, "slow-llm", tokens=2)
    response = admin(app, "/v1/load_lora_adapter", {"lora_name": "rt-slow", "lora_path": "rt-slow-lora"})
    assert response.status_code == 200, response.text
    assert greedy(app, "rt-slow", tokens=2)
    assert admin(app, "/v1/unload_lora_adapter", {"lora_name": "rt-slow"}).status_code == 200


def test_a_vlm_adapter_goes_on_the_vlm_base(app):
    response = admin(app, "/v1/load_lora_adapter", {"lora_name": "rt-vlm", "lora_path": "rt-vlm-lora"})
    assert response.status_code == 200, response.text
    assert (response.json()["base_model"], response.json()["family"]) == ("tiny-llava", "vlm")
    assert greedy(app, "rt-vlm", tokens=4) is not None


def test_an_adapter_for_another_base_is_a_400_naming_both(app):
    response = admin(app, "/v1/load_lora_adapter",
                     {"lora_name": "rt-wrong", "lora_path": "rt-llm-lora", "base_model": "tiny-llava"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "base_model" and error["code"] == "adapter_base_mismatch", error
    assert "tiny-llm" in error["message"] and "tiny-llava" in error["message"], error
    assert "rt-wrong" not in listed(app)


def test_names_already_served_are_refused(app):
    with_adapter(app)
    for name in ("tiny-llm", "rt-lora"):
        response = admin(app, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "rt-llm-lora"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "lora_name"
    configured = admin(app, "/v1/unload_lora_adapter", {"lora_name": "tiny-llm"})
    assert configured.status_code == 400 and "serve_config.yaml" in configured.text, configured.text


@pytest.mark.parametrize("path", ["/nonexistent/rt-lora", "someone/not-cached-lora"])
def test_an_adapter_that_is_nowhere_is_a_fast_404_naming_where_it_looked(app, path):
    started = time.monotonic()
    response = admin(app, "/v1/load_lora_adapter", {"lora_name": "rt-missing", "lora_path": path})
    elapsed = time.monotonic() - started
    assert response.status_code == 404, response.text
    message = response.json()["error"]["message"]
    assert "Looked at" in message and path.split("/")[-1] in message, message
    if "/" in path and not path.startswith("/"):  # a Hub id: the cache was searched, the Hub not touched
        assert "HF cache" in message and "admin.allow_downloads" in message, message
    assert elapsed < 5, elapsed


# -- whole models ------------------------------------------------------------------------------------------------

def test_a_whole_model_loads_in_the_background_serves_and_goes(app, adapters):
    started = time.monotonic()
    response = admin(app, "/models/load", {"model_id": str(adapters["model"]), "debug_load_delay_s": 3})
    print(f"\n[timing] /models/load answered in {time.monotonic() - started:.2f} s")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["id"], body["kind"], body["family"], body["status"]) == ("extra-llm", "model", "llm", "loading"), body
    phases = set()
    deadline = time.monotonic() + 60
    while (info := health(app)["models"].get("extra-llm", {})).get("state") != "ready":
        assert time.monotonic() < deadline, info
        phases.add(info.get("phase"))
        time.sleep(0.2)
    assert "simulated delay" in phases, phases
    print(f"\n[timing] the added model was ready {time.monotonic() - started:.2f} s after /models/load")
    assert "extra-llm" in listed(app)
    reply = client(app).chat.completions.create(model="extra-llm", messages=ASK, max_tokens=6, temperature=0,
                                                extra_headers={"x-wait-for-model": "60"})
    assert reply.choices[0].message.content
    removed = admin(app, "/models/unload", {"model_id": "extra-llm"})
    assert removed.status_code == 200 and removed.json()["status"] == "unloaded", removed.text
    with pytest.raises(openai.NotFoundError):
        greedy(app, "extra-llm")
    assert "extra-llm" not in listed(app)


def test_a_model_that_is_nowhere_is_a_404_and_downloads_stay_off(app):
    started = time.monotonic()
    response = admin(app, "/models/load", {"model_id": "someone/not-cached-model"})
    assert response.status_code == 404, response.text
    assert "admin.allow_downloads" in response.json()["error"]["message"]
    assert time.monotonic() - started < 5
    adapter = admin(app, "/models/load", {"model_id": "rt-llm-lora"})
    assert adapter.status_code == 400 and "/v1/load_lora_adapter" in adapter.text, adapter.text


def test_a_model_or_adapter_whose_files_cannot_be_read_is_a_400_naming_the_file(app, adapters, tmp_path):
    """A config.json that is not JSON, a model_type transformers does not know, an adapter_config.json
    that is a list: each was a 500 (or a 503 as if our model were down), not the admin's bad input. A model
    of another family than the body's `family` is that field's fault, not model_id's."""
    bad_json = Path(shutil.copytree(adapters["model"], tmp_path / "bad-json"))
    (bad_json / "config.json").write_text("{'model_type': 'llama'}")
    unknown = Path(shutil.copytree(adapters["model"], tmp_path / "unknown-type"))
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "nosucharch"}))
    listed_lora = Path(shutil.copytree(adapters["llm"], tmp_path / "list-lora"))
    (listed_lora / "adapter_config.json").write_text("[1, 2]")
    for path, body, param, words in (
            ("/models/load", {"model_id": str(bad_json)}, "model_id", "config.json cannot be read"),
            ("/models/load", {"model_id": str(unknown)}, "model_id", "'nosucharch'"),
            ("/models/load", {"model_id": str(adapters["model"]), "family": "vlm"}, "family",
             "configured as family 'vlm' but its config is a LLM"),
            ("/v1/load_lora_adapter", {"lora_name": "listed", "lora_path": str(listed_lora)}, "lora_path",
             "is not a JSON object")):
        response = admin(app, path, body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and words in error["message"], error
    assert "listed" not in listed(app)


# -- last: restarts the ingress ----------------------------------------------------------------------------------

def test_a_restarted_ingress_forgets_its_additions_on_the_family_replicas_too(app):
    """The catalog actor goes with the only ingress replica that made it, and the new ingress knows no addition
    (404, not listed), as the README says. The family replicas kept them for good: still attached, in memory and
    in /health as 'ready' (reproduced: three adapters on the LLM replica 20 s after the restart, until the next
    admin change). They now drop them once the restarted ingress has read its new catalog."""
    import ray

    with_adapter(app)
    assert replica_pids(app, "rt-lora"), "the adapter is on no LLM replica"
    ingress = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith("SERVE_REPLICA::runtime#ingress#")]
    assert len(ingress) == 1, ingress
    ray.kill(ray.get_actor(ingress[0]["name"], namespace=ingress[0]["namespace"]), no_restart=True)
    deadline = time.monotonic() + 90
    while True:  # Serve starts another ingress replica
        assert time.monotonic() < deadline, "the ingress did not come back"
        with contextlib.suppress(requests.RequestException):
            if requests.get(app.url + "/health", timeout=5).status_code == 200:
                break
        time.sleep(0.5)
    assert "rt-lora" not in listed(app)
    with pytest.raises(openai.NotFoundError):
        greedy(app, "rt-lora")
    runtime = {"rt-lora", "rt-vlm"}
    clean: set[int] = set()  # LLM replicas seen without any addition
    deadline = time.monotonic() + 30
    while len(clean) < 2:
        models = health(app)["models"]
        held = runtime & set(models)
        assert time.monotonic() < deadline, f"the family replicas still hold {sorted(held)} after the restart"
        if not held:
            clean.add(models["tiny-llm"]["replica"]["pid"])
        greedy(app, "tiny-llm", tokens=1)
        time.sleep(0.2)
