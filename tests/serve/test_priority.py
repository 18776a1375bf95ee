"""vLLM's `priority` request field through a live app: with `scheduling_policy: priority` the requests
waiting for a place in the LLM's batch are taken lowest value first, and the voice round trip's LLM
call takes `ingress.voice_priority`; under the default fcfs a priority other than 0 is a 400 that
names the option, and the app goes on answering."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from serve_testutil import demo_args, run_app, wav_bytes

STEP_S = 0.1  # the slow model's delay per generated token


@pytest.fixture(scope="module")
def app(serve_url, models_dir):
    from ray import serve

    args = demo_args()
    args["local_models_dir"] = str(models_dir)
    voice = [m for m in args["models"] if m.get("build_tiny") in ("stt", "tts")]
    args["models"] = [{"name": "slow-llm", "source": "slow-llm", "build_tiny": "llm", "max_new_tokens": 64,
                       "debug_step_delay_s": STEP_S}, *voice]
    # one place in the batch: every later request waits for it, in the order under test
    # (and one length band, batch_length_ratio 16: requests of 16-255 tokens all wait for the one batch)
    args["families"] = {"llm": {**args["families"]["llm"], "autoscaling": None, "max_batch_size": 1,
                                "scheduling_policy": "priority", "batch_length_ratio": 16},
                        **{family: {**args["families"][family], "autoscaling": None} for family in ("stt", "tts")}}
    args["ingress"] = {**args.get("ingress", {}), "voice_priority": -5}
    app = run_app(serve_url, "prioritized", args)
    app.wait_for(lambda h: h["status"] == "ok", timeout=120)
    yield app
    serve.delete("prioritized")


def test_waiting_requests_get_the_batch_place_by_priority_and_the_running_one_is_not_preempted(app):
    client = app.openai()
    finished: list[str] = []
    replies: dict[str, object] = {}

    def ask(name: str, priority: int, max_tokens: int) -> None:
        reply = client.chat.completions.create(
            model="slow-llm", messages=[{"role": "user", "content": f"{name}: hello"}], max_tokens=max_tokens,
            temperature=0, extra_body={"priority": priority})
        replies[name] = reply
        finished.append(name)

    def batching() -> dict:
        return app.get("/health").json()["models"]["slow-llm"]["replica"]["batching"]

    def wait_for(done, what: str) -> None:
        deadline = time.monotonic() + 20
        while not done(batching()):
            assert time.monotonic() < deadline, f"{what}: {batching()}"
            time.sleep(0.05)

    # `running` holds the only place for ~3 s; the others arrive meanwhile, the most urgent last. Each is sent
    # once the one before waits in the replica (not a fixed 150 ms later): equals take the place in arrival
    # order, and on a loaded machine a request can overtake one sent 150 ms before it
    prefilled = batching().get("requests", 0)
    running = threading.Thread(target=ask, args=("running", 10, 30))
    running.start()
    wait_for(lambda b: b.get("requests", 0) > prefilled, "running never got the place")
    waiting = []
    for count, (name, priority) in enumerate([("low", 5), ("normal", 0), ("also-normal", 0), ("urgent", -3)], 1):
        waiting.append(threading.Thread(target=ask, args=(name, priority, 3)))
        waiting[-1].start()
        wait_for(lambda b, count=count: b.get("waiting_for_place") == count, f"{name} never waited for the place")
    for thread in [running, *waiting]:
        thread.join(60)
    tokens = {name: reply.usage.completion_tokens for name, reply in replies.items()}
    assert finished == ["running", "urgent", "normal", "also-normal", "low"], (finished, tokens)
    assert tokens["running"] == 30  # it ran to its end: the urgent one waited for its place
    assert all(reply.choices[0].finish_reason in ("stop", "length") for reply in replies.values())
    health = app.get("/health").json()
    batching = health["models"]["slow-llm"]["replica"]["batching"]
    assert health["status"] == "ok" and batching["scheduling_policy"] == "priority", batching
    assert batching["waiting_for_place"] == 0 and batching["largest_batch"] == 1, batching


def test_priority_is_refused_by_name_where_the_family_serves_in_arrival_order(chat_app, app):
    fcfs = chat_app.openai()
    with pytest.raises(openai.BadRequestError) as info:
        fcfs.chat.completions.create(model="tiny-llm", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                     extra_body={"priority": 3})
    error = info.value.body
    assert error["param"] == "priority" and error["type"] == "invalid_request_error", error
    assert "priority=3" in error["message"] and "families.llm.scheduling_policy: priority" in error["message"]
    with pytest.raises(openai.BadRequestError, match="priority"):
        fcfs.completions.create(model="tiny-llm", prompt="hi", max_tokens=2, extra_body={"priority": -1})
    # priority 0 is every request's default there, and the family answers on
    assert fcfs.chat.completions.create(model="tiny-llm", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                        extra_body={"priority": 0}).choices
    # out of range: a 400 from the request model, also named
    with pytest.raises(openai.BadRequestError, match="priority"):
        app.openai().chat.completions.create(model="slow-llm", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=2, extra_body={"priority": 2**40})
    assert app.openai().completions.create(model="slow-llm", prompt="hi", max_tokens=2,
                                           extra_body={"priority": -7}).choices


def test_the_voice_round_trip_takes_voice_priority_ahead_of_waiting_chats(app):
    """A caller's reply (ingress.voice_priority -5) gets the batch place before a chat that waited longer."""
    client = app.openai()
    finished: list[str] = []

    def chat(name: str, max_tokens: int) -> None:
        client.chat.completions.create(model="slow-llm", messages=[{"role": "user", "content": name}],
                                       max_tokens=max_tokens, temperature=0)
        finished.append(name)

    def voice() -> None:
        response = app.post("/v1/audio/chat", files={"file": ("q.wav", wav_bytes(1.0))},
                            data={"llm_model": "slow-llm", "max_tokens": "3"})
        assert response.status_code == 200, response.text
        finished.append("voice")

    threads = [threading.Thread(target=chat, args=("running", 40))]  # ~4 s: room for the transcription
    threads[0].start()
    time.sleep(0.6)
    threads.append(threading.Thread(target=chat, args=("waiting chat", 10)))
    threads[-1].start()
    time.sleep(0.3)
    threads.append(threading.Thread(target=voice))  # transcribed, then its LLM call waits for the place too
    threads[-1].start()
    for thread in threads:
        thread.join(60)
    assert finished == ["running", "voice", "waiting chat"], finished
