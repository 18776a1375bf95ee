"""Adapters added at run time with two ingress replicas, when the one that made the runtime catalog's actor
restarts (the actor goes with it): README says another ingress replica writes back what it knows.

It did not: the surviving replica found the replacement actor (made by the restarted one, empty) on a later
read, took its empty catalog as the truth, and the adapter was gone for good (reproduced: every request for it
a 404 from 3 s after the restart on). One LLM replica, tiny-llm; everything through HTTP.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import requests

from serve_testutil import run_app

ADMIN_KEY = "admin-key-0123456789abcdef"
ASK = [{"role": "user", "content": "Tell me a story about a cat."}]


def answer(app, model: str) -> tuple[int, str]:
    with contextlib.suppress(requests.RequestException):
        response = requests.post(app.url + "/v1/chat/completions", timeout=60, json={
            "model": model, "messages": ASK, "max_tokens": 8, "temperature": 0})
        body = response.json()
        return response.status_code, body["choices"][0]["message"]["content"] if response.ok else str(body)
    return 0, "no answer (an ingress replica going away)"


@pytest.fixture(scope="module")
def app(serve_url, models_dir, tmp_path_factory):
    from ray import serve

    from loading.tiny import ensure_tiny

    ensure_tiny("llm-lora", models_dir / "ri-lora", base=ensure_tiny("llm", models_dir / "tiny-llm"), seed=5)
    secrets = tmp_path_factory.mktemp("ri-keys")
    (secrets / "admin").write_text(ADMIN_KEY + "\n")
    args = {
        "device": "cpu", "request_timeout_s": 60, "local_models_dir": str(models_dir),
        "models": [{"name": "tiny-llm", "source": "tiny-llm", "build_tiny": "llm", "max_new_tokens": 16}],
        "families": {"llm": {"num_cpus": 0.25, "autoscaling": None}},
        "ingress": {"num_cpus": 0.25, "num_replicas": 2},
        "auth": {"admin_keys_file": str(secrets / "admin")},
        "admin": {"catalog_poll_s": 0.2},
    }
    app = run_app(serve_url, "ringress", args)
    app.wait_for(lambda h: h["status"] == "ok", timeout=120)
    yield app
    serve.delete("ringress")


def _answered_everywhere(app, model: str, within_s: float = 10) -> tuple[int, str]:
    """The answer for `model` once 10 requests in a row (spread over both ingress replicas) gave it."""
    deadline, streak, last = time.monotonic() + within_s, 0, (0, "")
    while streak < 10:
        got = answer(app, model)
        streak, last = (streak + 1, got) if got[0] == 200 and got == last else (int(got[0] == 200), got)
        assert time.monotonic() < deadline, f"{model} is not answered by both ingress replicas: {got}"
    return last


def test_an_adapter_added_through_one_ingress_replica_is_served_by_the_other(app):
    """The other replica read the catalog only before a family call, and a request for a model it did not know
    was refused before any: with only such requests it never read it (a 404 for the adapter 30 s after it was
    added, every 0.2 s poll notwithstanding)."""
    added = requests.post(app.url + "/v1/load_lora_adapter", timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                          json={"lora_name": "ri-first", "lora_path": "ri-lora"})
    assert added.status_code == 200, added.text
    _answered_everywhere(app, "ri-first")


def test_an_adapter_outlives_the_ingress_replica_that_made_the_catalog(app):
    import ray

    added = requests.post(app.url + "/v1/load_lora_adapter", timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                          json={"lora_name": "ri-lora", "lora_path": "ri-lora"})
    assert added.status_code == 200, added.text
    expected = _answered_everywhere(app, "ri-lora")

    # the ingress replica that made the catalog's actor (its owner), killed: the actor goes with it
    actors = [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]
    catalog = next(a for a in actors if a["Name"] == "modelfleet-runtime-catalog-ringress")
    owner = next(a for a in actors if a["Name"].startswith("SERVE_REPLICA::ringress#ingress#")
                 and a["Address"]["Port"] == catalog["OwnerAddress"]["Port"])
    named = {a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)}
    catalog_actor = ray.get_actor(catalog["Name"], namespace=named[catalog["Name"]])
    # traffic all along, as in production: the surviving replica reads the catalog (every 0.2 s) while there is
    # none, and finds the one the restarted replica makes on a later read
    busy = threading.Event()
    traffic = threading.Thread(target=lambda: [answer(app, "tiny-llm") for _ in iter(busy.is_set, True)], daemon=True)
    traffic.start()
    ray.kill(ray.get_actor(owner["Name"], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 20
    while True:  # the actor goes once Ray sees its owner gone
        try:
            ray.get(catalog_actor.snapshot.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the catalog's actor outlived the ingress replica that made it"
        time.sleep(0.2)
    deadline = time.monotonic() + 90
    while _running_ingress_replicas() < 2 or answer(app, "tiny-llm")[0] != 200:
        assert time.monotonic() < deadline, "the ingress replicas did not both come back"
        time.sleep(0.5)
    # both ingress replicas up (the restarted one made a new actor): every request for the adapter is answered
    time.sleep(2.0)
    answers = [answer(app, "ri-lora") for _ in range(20)]
    busy.set()
    traffic.join(60)
    assert all(got == expected for got in answers), [got for got in answers if got != expected][:3]


def _running_ingress_replicas() -> int:
    from ray import serve

    status = serve.status().applications.get("ringress")
    states = status.deployments["ingress"].replica_states if status else {}
    return sum(count for state, count in states.items() if str(getattr(state, "value", state)) == "RUNNING")


def test_the_surviving_ingress_gives_what_it_knows_to_the_actor_the_restarted_one_made(serve_url, monkeypatch):
    """The race above, step by step with real actors (on a live app the restarted replica is often back before
    the survivor's first read misses the actor, and then it did give its additions back). The survivor reads
    while there is no actor, then finds the one the restarted replica made: it took that empty catalog as the
    truth and forgot every addition. The restarted replica, which knows nothing, must not pass that empty
    catalog on to the family replicas (they would drop the additions, then attach them again) either."""
    import asyncio

    import ray

    from deployments import runtime_catalog
    from loading import Family, ModelSpec

    monkeypatch.setattr(runtime_catalog, "app_name", lambda: "ri-unit")
    survivor = runtime_catalog.IngressCatalog(0.0, True, lambda snapshot: None)
    restarted = runtime_catalog.IngressCatalog(0.0, True, lambda snapshot: None)
    kept = runtime_catalog.RuntimeRecord("adapter", ModelSpec(name="kept", source="/lora", family=Family.LLM,
                                                              base_model="tiny-llm"))

    def names(catalog) -> list[str]:
        return [record.spec.name for record in catalog.snapshot.records]

    async def scenario() -> None:
        await survivor.put(kept)  # makes the actor, as the first admin call does
        first = survivor._actor
        ray.kill(first)  # with the ingress replica that made it
        with contextlib.suppress(ray.exceptions.RayActorError):
            while True:
                await first.snapshot.remote()
                await asyncio.sleep(0.1)
        await survivor._refresh()  # no actor now
        assert names(survivor) == ["kept"]
        restarted.prepare()  # the restarted ingress replica makes a new, empty one
        await restarted._refresh()
        assert restarted.token == "", "an empty new catalog went to the family replicas"
        await survivor._refresh()  # finds it
        assert names(survivor) == ["kept"], "the surviving ingress replica forgot the additions"
        await restarted._refresh()
        assert names(restarted) == ["kept"] and restarted.token == survivor.token

    try:
        asyncio.run(scenario())
    finally:
        with contextlib.suppress(Exception):
            ray.kill(runtime_catalog.find_actor("ri-unit"))
