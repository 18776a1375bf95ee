"""The ingress's HTTP app in-process: the real guard, routes, error mapping and OpenAPI document
(deployments/api.py:build_api) over stand-in family handles that answer at once (or late, where a
test says so). What the families would do with a request is not under test here; what reaches them is."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from local_handles import LocalHandle
from PIL import Image

import loading
from deployments import media, pixels
from deployments.api import build_api, form_paths
from deployments.app_config import AppConfig
from deployments.errors import InvalidRequestError, to_error
from deployments.ingress import Ingress
from deployments.limits import RequestLimits
from deployments.params import ChatResult, SpeechResult, TranscribeResult
from deployments.protocol import TranscriptionForm, VoiceChatForm
from deployments.routes.common import check_form

CHAT = "/v1/chat/completions"
STT = "/v1/audio/transcriptions"
VOICE = "/v1/audio/chat"
MODELS = [("llm", "llm"), ("stt", "stt"), ("tts", "tts"), ("vlm", "vlm")]


class Family:
    """What a family deployment answers, and the params each call brought."""

    def __init__(self, answer_after_s: float = 0.0):
        self.calls: list[tuple[str, Any]] = []
        self.answer_after_s = answer_after_s

    async def chat(self, params):
        self.calls.append(("chat", params))
        await asyncio.sleep(self.answer_after_s)
        return ChatResult(text="hi", finish_reason="stop", prompt_tokens=3, completion_tokens=1)

    async def chat_stream(self, params):
        self.calls.append(("chat_stream", params))
        yield {"delta": "hi"}
        yield {"finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 1}}

    async def transcribe(self, params):
        self.calls.append(("transcribe", params))
        return TranscribeResult(text="hello", language="en", duration=1.0, segments=[])

    async def synthesize(self, params):
        self.calls.append(("synthesize", params))
        return SpeechResult(np.zeros(1600, np.float32), 16000, 3)

    async def synthesize_stream(self, params):
        self.calls.append(("synthesize_stream", params))
        yield SpeechResult(np.zeros(1600, np.float32), 16000, 3)


def make(**args) -> tuple[TestClient, dict[str, Family]]:
    families = {name: Family() for name in ("llm", "stt", "tts", "vlm")}
    config = AppConfig.model_validate({"models": [{"name": n, "source": n, "family": f} for n, f in MODELS],
                                       "local_models_dir": "/nonexistent", **args})
    app = build_api(Ingress({name: LocalHandle(family) for name, family in families.items()}, config))
    return TestClient(app, raise_server_exceptions=False), families


@pytest.fixture(scope="module")
def client():
    return make()


def wav() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(8000, np.float32), 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def multipart(fields: dict[str, str], boundary: str = "b0undary") -> bytes:
    out = b""
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n").encode() + wav() + f"\r\n--{boundary}--\r\n".encode()
    return out


# -- which body limit: the route's, not the Content-Type's ------------------------------------------


def test_only_the_form_routes_take_the_upload_limit_whatever_the_content_type():
    """A chat body labelled multipart/form-data was read whole under max_upload_bytes (25 MiB), not
    max_json_body_bytes, and answered 400 instead of 413."""
    client, families = make(limits={"max_json_body_bytes": 64 * 1024, "max_upload_bytes": 1024 * 1024})
    assert form_paths(client.app) == {STT, "/v1/audio/translations", VOICE, "/stt"}
    body = b'{"model": "llm", "messages": [{"role": "user", "content": "' + b"a" * 200_000 + b'"}]}'
    for content_type in ("multipart/form-data; boundary=x", "text/plain", "application/json"):
        for chunks in (False, True):  # Content-Length, and counted while read
            data = (body[i:i + 8192] for i in range(0, len(body), 8192)) if chunks else body
            refused = error(client.post(CHAT, content=data, headers={"content-type": content_type}), 413)
            assert "max_json_body_bytes=65,536" in refused["message"], (content_type, refused)
    # a form route takes its upload under max_upload_bytes
    answered = client.post(STT, files={"file": ("a.wav", wav() + b"\0" * 100_000)}, data={"model": "stt"})
    assert answered.status_code == 200, answered.text
    assert "max_upload_bytes" in error(client.post(STT, files={"file": ("a.wav", b"\0" * 2_000_000)},
                                                   data={"model": "stt"}), 413)["message"]
    assert [kind for kind, _ in families["llm"].calls] == []


def test_a_json_body_without_a_json_content_type_is_told_to_send_one(client):
    client, _ = client
    for headers in ({"content-type": "text/plain"}, {"content-type": ""}):
        refused = error(client.post(CHAT, content=b'{"model": "llm", "messages": []}', headers=headers), 400)
        assert "application/json" in refused["message"] and refused["code"] == "invalid_content_type"


# -- multipart text fields ---------------------------------------------------------------------------


def test_a_form_charset_that_can_make_lone_surrogates_is_refused_before_any_family_sees_it(client):
    """charset=unicode_escape (or utf-7) made Starlette decode '\\ud800' into a lone surrogate, which the
    STT and LLM replicas' tokenizers failed on: a 500."""
    client, families = client
    before = {name: len(family.calls) for name, family in families.items()}
    for path, field in ((STT, "prompt"), (VOICE, "system_prompt")):
        for charset in ("unicode_escape", "utf-7", "UTF-16"):
            fields = {field: "hi \\ud800 there", **({"model": "stt"} if path == STT else {})}
            refused = error(client.post(path, content=multipart(fields), headers={
                "content-type": f"multipart/form-data; boundary=b0undary; charset={charset}"}), 400)
            assert (refused["param"], refused["code"]) == ("content-type", "unsupported_charset"), refused
    assert {name: len(family.calls) for name, family in families.items()} == before
    for charset in ("utf-8", "UTF8", "us-ascii"):  # what clients send is still served
        response = client.post(STT, content=multipart({"model": "stt", "prompt": "hi"}),
                               headers={"content-type": f"multipart/form-data; boundary=b0undary; charset={charset}"})
        assert response.status_code == 200, response.text


def test_every_text_field_of_a_form_is_checked_for_lone_surrogates():
    limits = RequestLimits()
    form = TranscriptionForm.model_construct(model="stt", prompt="hi \ud800", language=None, chunking_strategy=None,
                                             timestamp_granularities=["segment"])
    with pytest.raises(InvalidRequestError) as refused:
        check_form(form, limits, "prompt")
    assert (refused.value.param, refused.value.code) == ("prompt", "invalid_unicode")
    voice = VoiceChatForm.model_construct(llm_model="llm\udfff", system_prompt="ok")
    with pytest.raises(InvalidRequestError) as refused:
        check_form(voice, limits, "system_prompt")
    assert refused.value.param == "llm_model"
    with pytest.raises(InvalidRequestError) as refused:  # and the bounded ones' length, as before
        check_form(VoiceChatForm.model_construct(system_prompt="a" * 40_000), limits, "system_prompt")
    assert refused.value.param == "system_prompt" and "max_form_field_chars" in refused.value.message


def test_a_text_field_past_its_limit_is_refused_by_name_as_it_streams_in():
    """Past Starlette's 1 MiB part bound a field got 'Part exceeded maximum size of 1024KB.', param null;
    the bound now follows max_form_field_chars (4 bytes a character)."""
    client, families = make(limits={"max_form_field_chars": 1000})
    for path, field in ((STT, "prompt"), (VOICE, "system_prompt")):
        extra = {"model": "stt"} if path == STT else {}
        refused = error(client.post(path, files={"file": ("a.wav", wav())}, data={field: "a" * 4001, **extra}), 400)
        assert refused["param"] == field and "max_form_field_chars=1,000" in refused["message"], refused
        # between the characters and the bytes: the route's own check, the same limit named
        refused = error(client.post(path, files={"file": ("a.wav", wav())}, data={field: "a" * 1001, **extra}), 400)
        assert refused["param"] == field and "max_form_field_chars=1000" in refused["message"], refused
    urlencoded = error(client.post(STT, data={"model": "stt", "prompt": "a" * 4001}), 400)  # no file: a plain form
    assert urlencoded["param"] == "prompt" and "max_form_field_chars=1,000" in urlencoded["message"], urlencoded
    two = error(client.post(STT, files=[("file", ("a.wav", wav())), ("file", ("b.wav", wav()))],
                            data={"model": "stt"}), 400)
    assert (two["param"], two["code"]) == ("file", "too_many_files")
    many = error(client.post(STT, files={"file": ("a.wav", wav())},
                             data={"model": "stt", "timestamp_granularities[]": ["segment"] * 20}), 400)
    assert (many["param"], many["code"]) == ("timestamp_granularities[]", "too_many_fields")
    assert "16" in many["message"]
    assert families["stt"].calls == []


# -- schema against limits ---------------------------------------------------------------------------


def test_stop_sequences_are_bounded_by_the_configured_limit():
    """protocol.py's Field(max_length=4) refused a 5th stop whatever limits.max_stop_sequences said."""
    raised, _ = make(limits={"max_stop_sequences": 8})
    chat = {"model": "llm", "messages": [{"role": "user", "content": "hi"}]}
    for path, body in ((CHAT, chat), ("/v1/completions", {"model": "llm", "prompt": "hi"})):
        assert raised.post(path, json={**body, "stop": list("abcdefgh")}).status_code == 200
        refused = error(raised.post(path, json={**body, "stop": list("abcdefghi")}), 400)
        assert refused["param"] == "stop" and "max_stop_sequences=8" in refused["message"]
    default, _ = make()
    refused = error(default.post(CHAT, json={**chat, "stop": list("abcde")}), 400)
    assert refused["param"] == "stop" and "max_stop_sequences=4" in refused["message"]


def test_best_of_other_than_n_is_refused(client):
    client, _ = client
    body = {"model": "llm", "prompt": "hi", "n": 2}
    assert error(client.post("/v1/completions", json={**body, "best_of": 1}), 400)["param"] == "best_of"
    assert client.post("/v1/completions", json={**body, "best_of": 2}).status_code == 200


def test_a_served_model_of_another_family_is_named_as_such_not_as_missing(client):
    """An STT model sent to chat was 'The model 'stt' does not exist', though /v1/models lists it."""
    client, families = client
    for path, body, model, served in (
            (CHAT, {"messages": [{"role": "user", "content": "hi"}]}, "stt", "llm, vlm"),
            ("/v1/audio/speech", {"input": "hi"}, "llm", "tts")):
        refused = error(client.post(path, json={"model": model, **body}), 404)
        assert (refused["param"], refused["code"]) == ("model", "model_not_found")
        assert refused["message"] == (f"The model {model!r} is of the {model} family, which this route does not "
                                      f"serve. Models it serves: {served}."), refused
    missing = error(client.post(CHAT, json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]}), 404)
    assert missing["message"] == "The model 'nope' does not exist. Available models: llm, vlm."


def test_too_many_completion_choices_name_the_prompts_when_they_make_them(client):
    """Nine prompts (n=1) were refused as '9 choices asked for' on `n`, a field the client had left at 1."""
    client, families = client
    calls = len(families["llm"].calls)
    for body, param, words in (({"prompt": ["a"] * 9}, "prompt", "9 prompts times n=1"),
                               ({"prompt": ["a"] * 3, "n": 3}, "prompt", "3 prompts times n=3"),
                               ({"prompt": "a", "n": 9}, "n", "9 choices asked for;")):
        refused = error(client.post("/v1/completions", json={"model": "llm", **body}), 400)
        assert refused["param"] == param and words in refused["message"] and "max_choices=8" in refused["message"]
    assert len(families["llm"].calls) == calls


def test_a_wait_header_that_is_not_a_number_of_seconds_is_refused(client):
    """'nan' parsed as a float and reached the replica as wait_s=nan, where waiting for a loading model
    never ended (nan is neither past nor before a deadline) until request_timeout_s cut it."""
    client, families = client
    chat = {"model": "llm", "messages": [{"role": "user", "content": "hi"}]}
    for value in ("nan", "NaN", "-nan", "soon"):
        refused = error(client.post(CHAT, json=chat, headers={"x-wait-for-model": value}), 400)
        assert refused["param"] == "x-wait-for-model" and repr(value) in refused["message"], refused
    for value, wait_s in (("inf", 600.0), ("-1", 0.0), ("2.5", 2.5)):  # numbers: within 0..600 s
        assert client.post(CHAT, json=chat, headers={"x-wait-for-model": value}).status_code == 200
        assert families["llm"].calls[-1][1].wait_s == wait_s


# -- the OpenAPI document ----------------------------------------------------------------------------


def test_openapi_documents_the_errors_the_server_sends_not_fastapis_422(client):
    client, _ = client
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
            if method == "post":
                assert {"400", "413"} <= set(operation["responses"]), (method, path)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert client.get("/openapi.json").json() == spec  # served again, the same


# -- X-Wait-For-Model against request_timeout_s ------------------------------------------------------


def test_a_call_that_may_wait_for_its_model_gets_that_wait_on_top_of_request_timeout_s():
    """X-Wait-For-Model (up to 600 s) was cut at request_timeout_s with a 503 of code null."""
    client, families = make(request_timeout_s=0.3)
    families["llm"].answer_after_s = 0.6
    chat = {"model": "llm", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post(CHAT, json=chat, headers={"x-wait-for-model": "2"}).status_code == 200
    started = time.monotonic()
    refused = error(client.post(CHAT, json=chat), 503)
    assert time.monotonic() - started < 0.6 + 0.5
    assert refused["code"] == "timeout" and "request_timeout_s=0.3" in refused["message"], refused


# -- images past Pillow's own bound --------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_max_image_pixels_above_pillows_bound_takes_effect_in_the_ingress_and_the_replica(monkeypatch):
    """A max_image_pixels above Pillow's MAX_IMAGE_PIXELS could not take effect: an image within the limit
    got a 413 saying 'more than <Pillow's> pixels; at most max_image_pixels=<more>'. Pillow's bound is
    made small here to keep the images small (it is restored afterwards)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    client, families = make(limits={"max_image_pixels": 50_000})

    def ask(data: bytes):
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        return client.post(CHAT, json={"model": "vlm", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": uri}}]}]})

    within = png(200, 200)  # 40,000 pixels: within the limit, past twice Pillow's bound (an error there)
    assert ask(within).status_code == 200
    assert families["vlm"].calls[-1][1].images == [within]
    refused = error(ask(png(300, 300)), 413)
    # the ingress reads headers in a decoder process, whose Pillow bound is not this test's patched one
    assert refused["message"] == "the image is 300x300 = 90,000 pixels; at most max_image_pixels=50,000 are accepted"
    # what that process runs, under the patched bound: it follows max_image_pixels, past Pillow's
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert pixels.bounded_header_size(within, 50_000) == (200, 200)
    with pytest.raises(Image.DecompressionBombWarning):
        pixels.bounded_header_size(png(300, 300), 50_000)
    # the replica, a process with Pillow's default bound and no limits, decodes what the ingress let through
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert media.image_size(within) == (200, 200)
    assert media.decode_image(within).size == (200, 200)
    assert Image.MAX_IMAGE_PIXELS == 40_000


# -- metric labels and /health (found by the observability review) ---------------------------------------
def _answered(monkeypatch) -> list[tuple]:
    """Every (route, method, status, family, model) the ingress's request metric is given."""
    from deployments.metrics import IngressMetrics

    seen: list[tuple] = []
    answered = IngressMetrics.answered

    def record(self, route, method, status, family, model, seconds):
        seen.append((route, method, status, family, model))
        return answered(self, route, method, status, family, model, seconds)

    monkeypatch.setattr(IngressMetrics, "answered", record)
    return seen


def test_metric_labels_are_bounded_and_canonical(monkeypatch):
    seen = _answered(monkeypatch)
    client, families = make(models=[{"name": n, "source": n, "family": f, "aliases": [f"{n}-alias"]}
                                    for n, f in MODELS])
    for method in ("BREW", "X-ANYTHING"):  # any method a client makes up is one label value, not a series each
        client.request(method, "/v1/models")
    client.get("/v1/models")  # a listing names no model
    client.post(STT, files={"file": ("a.wav", wav(), "audio/wav")}, data={"model": "stt-alias"})
    assert [s[1] for s in seen[:2]] == ["other", "other"]
    assert seen[2][3:] == ("", ""), seen[2]
    assert seen[3][3:] == ("stt", "stt") and families["stt"].calls[-1][1].model == "stt"  # the alias resolved


def test_a_model_added_at_run_time_is_shown_unavailable_when_its_family_is_down():
    from deployments.runtime_catalog import RuntimeRecord, Snapshot

    families = {name: Family() for name in ("llm", "stt", "tts", "vlm")}
    config = AppConfig.model_validate({"models": [{"name": n, "source": n, "family": f} for n, f in MODELS],
                                       "local_models_dir": "/nonexistent", "status_timeout_s": 1})
    ingress = Ingress({name: LocalHandle(family) for name, family in families.items()}, config)
    added = config.models[0].model_copy(update={"name": "added", "aliases": []})
    ingress.runtime._apply(Snapshot("e:1", (RuntimeRecord("model", added),)))

    async def down():
        raise RuntimeError("replica died")

    families["llm"].status = down
    client = TestClient(build_api(ingress), raise_server_exceptions=False)
    health = client.get("/health").json()
    assert health["models"]["added"]["state"] == "unavailable" and health["models"]["llm"]["state"] == "unavailable"
    listed = {card["id"]: card["state"] for card in client.get("/v1/models").json()["data"]}
    assert listed["added"] == "unavailable"


def test_an_unloaded_models_state_gauge_goes_to_zero(monkeypatch):
    from deployments.metrics import MODEL_STATES, FamilyMetrics

    metrics, current = FamilyMetrics("llm"), {}
    monkeypatch.setattr(metrics.state, "set", lambda value, tags=None: current.__setitem__(
        (tags["model"], tags["state"]), value))
    ready = {"state": "ready", "load_seconds": 1.0, "load_count": 1, "fallbacks": []}
    metrics.models([{"name": "a", **ready}, {"name": "b", **ready}])
    metrics.models([{"name": "a", **ready}])  # b unloaded at run time
    assert current[("a", "ready")] == 1 and all(current[("b", state)] == 0 for state in MODEL_STATES)


def _with_added(added_at: float = 1_900_000_000.7) -> tuple[TestClient, Ingress, dict[str, Family]]:
    """An app whose llm family serves 'added', a model added at run time at `added_at`."""
    from deployments.runtime_catalog import RuntimeRecord, Snapshot

    families = {name: Family() for name in ("llm", "stt", "tts", "vlm")}
    config = AppConfig.model_validate({"models": [{"name": n, "source": n, "family": f} for n, f in MODELS],
                                       "local_models_dir": "/nonexistent", "status_timeout_s": 1})
    ingress = Ingress({name: LocalHandle(family) for name, family in families.items()}, config)
    added = config.models[0].model_copy(update={"name": "added", "aliases": []})
    ingress.runtime._apply(Snapshot("e:1", (RuntimeRecord("model", added, added_at=added_at),)))
    return TestClient(build_api(ingress), raise_server_exceptions=False), ingress, families


def test_a_model_added_at_run_time_is_listed_as_created_when_it_was_added():
    """created was the ingress's start for every model; RuntimeRecord.added_at was never read (found by review)."""
    from deployments.routes.models import CREATED

    client, _, _ = _with_added()
    cards = {card["id"]: card["created"] for card in client.get("/v1/models").json()["data"]}
    assert cards["added"] == 1_900_000_000 and cards["llm"] == CREATED
    assert client.get("/v1/models/added").json()["created"] == 1_900_000_000


def test_a_model_unloaded_while_its_card_waits_for_status_is_still_answered():
    """GET /v1/models/{id} re-read the catalog after awaiting the families' status: a model unloaded meanwhile
    was a KeyError, a 500 (found by review). The card is of the model as it was when asked."""
    from deployments.runtime_catalog import Snapshot

    client, ingress, families = _with_added()

    async def unloaded_meanwhile(token, method, *args):  # with additions, calls come through `call`
        ingress.runtime._apply(Snapshot("e:2", ()))
        return [{"name": "llm", "state": "ready"}]

    families["llm"].call = unloaded_meanwhile
    response = client.get("/v1/models/added")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "added" and "added" not in ingress.catalog
    assert error(client.get("/v1/models/added"), 404)["param"] == "model"  # asked again: gone


# -- Realtime refusals choose the subprotocol a browser offered (found by review) ----------------------------
REALTIME_KEY = "user-key-0123456789abcdef"


def _offering(key: str) -> list[str]:
    """What a browser offers: it cannot set Authorization, so the key travels as a subprotocol."""
    return ["realtime", f"openai-insecure-api-key.{key}", "openai-beta.realtime-v1"]


def test_a_realtime_refusal_for_its_key_chooses_the_realtime_subprotocol(monkeypatch):
    """The guard accepted a wrong key's socket choosing no subprotocol: a browser that offered some fails such a
    handshake, so it never saw the error event that says why."""
    monkeypatch.setenv("MODELFLEET_API_KEYS", REALTIME_KEY)
    client, _ = make()
    with client.websocket_connect("/v1/realtime?model=llm", subprotocols=_offering("wrong-key-0123456789abcdef")) as ws:
        assert ws.receive_json()["error"]["code"] == "invalid_api_key"
        assert ws.accepted_subprotocol == "realtime"  # never the key's
    with client.websocket_connect("/v1/realtime?model=llm") as ws:  # offered none (the openai client): none chosen
        event = ws.receive_json()
        assert event["error"]["code"] == "invalid_api_key" and ws.accepted_subprotocol is None
    # OpenAI's error event, as its client types it: the event's own id is a string (it was null here)
    from openai.types.beta.realtime.error_event import ErrorEvent
    from openai.types.realtime.realtime_error_event import RealtimeErrorEvent

    for shape in (ErrorEvent, RealtimeErrorEvent):
        assert shape.model_validate(event).event_id.startswith("event_")


def test_a_realtime_refusal_past_the_session_limit_chooses_the_realtime_subprotocol(monkeypatch):
    monkeypatch.setenv("MODELFLEET_API_KEYS", REALTIME_KEY)
    client, _ = make(limits={"max_realtime_sessions": 1})
    with client.websocket_connect("/v1/realtime?model=llm", subprotocols=_offering(REALTIME_KEY)) as first:
        assert first.receive_json()["type"] == "session.created" and first.accepted_subprotocol == "realtime"
        with client.websocket_connect("/v1/realtime?model=llm", subprotocols=_offering(REALTIME_KEY)) as second:
            assert second.receive_json()["error"]["code"] == "overloaded"
            assert second.accepted_subprotocol == "realtime"


def test_an_unknown_form_field_is_named_whatever_its_name_looks_like(client):
    """The official client sends list parameters as `include[]`: the 400 named no field, since a name that
    is not a lowercase identifier was taken for one of pydantic's type labels."""
    test_client, _ = client
    body = multipart({"model": "stt", "include[]": "logprobs"})
    response = test_client.post(STT, content=body, headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert error(response, 400)["param"] == "include[]" and "include[]" in error(response, 400)["message"]


def test_speech_takes_openais_custom_voice_object_and_defaults_to_mp3(client):
    """openai >= 2 sends `voice` as {"id": ...} for a custom voice: it was a 400 ('Input should be a valid
    string') even for a single-speaker model, which ignores voices. And OpenAI's default format is mp3: ours
    answered wav to a client that named none (and wrote it to speech.mp3)."""
    test_client, families = client
    response = test_client.post("/v1/audio/speech", json={"model": "tts", "input": "Hi.", "voice": {"id": "voice_1"}})
    assert response.status_code == 200, response.text
    assert [p.voice for name, p in families["tts"].calls if name.startswith("synthesize")][-1] == "voice_1"
    assert response.headers["content-type"] == "audio/mpeg"
    assert sf.info(io.BytesIO(response.content)).format == "MP3"


class RefusingOne(Family):
    """Refuses the prompt "bad" at once; any other runs until cancelled (a long generation)."""

    def __init__(self):
        super().__init__()
        self.cancelled: list[str] = []

    async def _answer(self, params):
        if params.prompt == "bad":
            raise InvalidRequestError("refused", param="prompt")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.append(params.prompt)
            raise
        return ChatResult(text="hi", finish_reason="stop", prompt_tokens=3, completion_tokens=1)

    async def chat(self, params):
        return await self._answer(params)

    async def chat_stream(self, params):
        yield {"delta": (await self._answer(params)).text}


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_prompt_among_several_cancels_the_others(stream):
    """asyncio.gather left the other prompts x n generating after the 400 (59 decode steps in the review's
    run), outside max_concurrent_requests; a client could queue 7 generations per cheap refusal. Called on
    the route itself: a TestClient cancels a request's leftover tasks when it ends, uvicorn does not."""
    from deployments.protocol import CompletionRequest
    from deployments.routes.completions import create_completion

    family = RefusingOne()
    config = AppConfig.model_validate({"models": [{"name": n, "source": n, "family": f} for n, f in MODELS],
                                       "local_models_dir": "/nonexistent"})
    ingress = Ingress({name: LocalHandle(family if name == "llm" else Family()) for name, _ in MODELS}, config)
    body = CompletionRequest.model_validate({"model": "llm", "prompt": ["good", "bad", "fine"], "n": 2,
                                             "stream": stream})

    async def scenario() -> list[str]:
        with pytest.raises(InvalidRequestError):
            await create_completion(body, ingress, 0.0)
        return sorted(family.cancelled)  # before asyncio.run's own clean-up cancels what is left

    assert asyncio.run(scenario()) == ["fine", "fine", "good", "good"]


def test_a_request_its_client_left_before_any_answer_is_counted_499_not_500(monkeypatch):
    """Serve cancels the ingress's task when the client hangs up; the metric recorded its default 500, so
    every client timeout and playground Stop counted as a server error."""
    seen = _answered(monkeypatch)
    family = Family(answer_after_s=30)
    config = AppConfig.model_validate({"models": [{"name": n, "source": n, "family": f} for n, f in MODELS],
                                       "local_models_dir": "/nonexistent"})
    app = build_api(Ingress({name: LocalHandle(family if name == "llm" else Family()) for name, _ in MODELS}, config))
    body = b'{"model": "llm", "messages": [{"role": "user", "content": "hi"}]}'

    async def scenario() -> None:
        sent = []

        async def receive():
            if sent:
                await asyncio.sleep(60)
            sent.append(1)
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            pass

        scope = {"type": "http", "method": "POST", "path": CHAT, "raw_path": CHAT.encode(), "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                 "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("test", 1),
                 "root_path": "", "app": app}
        task = asyncio.ensure_future(app(scope, receive, send))
        while not family.calls:
            await asyncio.sleep(0.01)
        task.cancel()  # as Serve does when the client disconnects
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert [(route, status) for route, _, status, _, _ in seen] == [(CHAT, 499)]


def test_a_stream_in_a_format_that_cannot_be_streamed_is_refused_before_the_upload_is_decoded(client, monkeypatch):
    """stream=true with response_format srt/vtt/verbose_json was refused only after the whole upload was decoded
    (a 24 MiB WAV: 1.8 s against 0.4 s for the word-timestamps refusal next to it), on one of the ingress's
    limits.media_workers decoders; a file that could not be decoded was refused on `file` instead."""
    client, families = client
    decoded = []

    async def decode_audio(data, model=None):
        decoded.append(len(data))
        return np.zeros(16000, np.float32), 16000

    monkeypatch.setattr(client.app.state.ingress, "decode_audio", decode_audio)
    calls = len(families["stt"].calls)
    for fmt in ("srt", "vtt", "verbose_json"):
        refused = error(client.post(STT, files={"file": ("a.wav", b"not audio")},
                                    data={"model": "stt", "stream": "true", "response_format": fmt}), 400)
        assert refused["param"] == "stream" and repr(fmt) in refused["message"], refused
    assert decoded == [] and len(families["stt"].calls) == calls


@pytest.mark.parametrize(("refusal", "status"), [
    (lambda: InvalidRequestError("max_tokens=999 exceeds the limit of model 'llm'", param="max_tokens"), 400),
    (lambda: loading.ModelLoadingInProgress("llm", "reading weights", 0.5, 7), 503),
])
def test_a_streamed_voice_round_trip_the_llm_refuses_is_an_http_error_not_a_200(refusal, status):
    """/v1/audio/chat with stream=true sent its 200 and the transcript event before the LLM was asked, so the LLM's
    refusals came as an in-band error event of a 200: on a live serve run max_tokens=100000 (SmolLM2's limit is
    128) and a system_prompt past tiny-llm's context, which the same request unstreamed answers with a 400, and a
    chat model still loading, whose 503 lost its Retry-After. As a streamed chat completion does, the reply's
    first text is awaited before the headers."""
    client, families = make()

    async def chat_stream(params):
        families["llm"].calls.append(("chat_stream", params))
        raise refusal()
        yield  # an async generator, as the family's

    families["llm"].chat_stream = chat_stream
    response = client.post(VOICE, files={"file": ("q.wav", wav(), "audio/wav")},
                           data={"stream": "true", "max_tokens": "16"})  # under the limit: the LLM refuses
    refused = error(response, status)
    assert refused["message"] == to_error(refusal())[1].error.message
    if status == 503:
        assert response.headers["retry-after"] == "7" and refused["code"] == "model_loading"
    else:
        assert refused["param"] == "max_tokens"
    # and a reply the LLM does give still streams, the transcript first
    families["llm"].chat_stream = Family().chat_stream
    events = [json.loads(line[6:]) for line in client.post(
        VOICE, files={"file": ("q.wav", wav(), "audio/wav")}, data={"stream": "true"}).text.splitlines()
        if line.startswith("data: ")]
    assert [e["type"] for e in events][:2] == ["transcript", "reply.delta"] and events[-1]["type"] == "done"


@pytest.mark.parametrize("stream", ["false", "true"])
def test_a_voice_prompt_too_long_for_the_llm_names_a_field_of_the_form(stream):
    """/v1/audio/chat's prompt too long for the LLM's context was refused on param `messages` ('Please reduce the
    length of the messages'), a field the form does not have: on a live serve run, a 3000-word system_prompt to
    tiny-llm (511 tokens). It names the system_prompt where one was sent, else the file whose transcript it is."""
    from deployments.errors import context_length_exceeded

    client, families = make()

    async def chat_stream(params):
        raise context_length_exceeded("maximum context length", 511, 1158, param=params.prompt_param)
        yield  # an async generator, as the family's

    families["llm"].chat_stream = chat_stream
    for form, param in (({"system_prompt": "word " * 3000}, "system_prompt"), ({}, "file")):
        refused = error(client.post(VOICE, files={"file": ("q.wav", wav(), "audio/wav")},
                                    data={"stream": stream, **form}), 400)
        assert (refused["param"], refused["code"]) == (param, "context_length_exceeded"), refused
        assert f"reduce the length of the {param}" in refused["message"], refused


@pytest.mark.parametrize("stream", ["false", "true"])
def test_a_max_tokens_over_the_models_limit_is_refused_before_the_upload_or_image_is_read(stream):
    """/v1/audio/chat decoded and transcribed the upload before the LLM refused its max_tokens (0.87 s of a
    23 MB upload on a live serve run), and a VLM chat decoded its images first: the limit is the model's
    config, known to the ingress, so it is refused first (an undecodable upload or image shows the order)."""
    client, families = make()
    response = client.post(VOICE, files={"file": ("q.wav", b"not audio", "audio/wav")},
                           data={"max_tokens": "100000", "stream": stream})
    refused = error(response, 400)
    assert refused["param"] == "max_tokens" and "max_tokens=100000 exceeds the limit of model 'llm'" \
        in refused["message"], refused
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
    response = client.post("/v1/chat/completions", json={
        "model": "vlm", "max_completion_tokens": 100000, "stream": stream == "true",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}]})
    refused = error(response, 400)
    assert refused["param"] == "max_completion_tokens" and "exceeds the limit of model 'vlm'" in refused["message"]
    assert not any(family.calls for family in families.values())


def test_tokenize_refuses_the_tools_a_chat_refuses():
    """/tokenize counted a chat whose tools /v1/chat/completions refuses (two functions of one name, parameters
    that are no object schema): a 200 count of a request that gets a 400."""
    from deployments.params import TokenizeResult

    class Counting(Family):
        async def tokenize(self, params, with_strs):
            self.calls.append(("tokenize", params))
            return TokenizeResult([1, 2, 3], 512)

    families = {name: Counting() for name in ("llm", "stt", "tts", "vlm")}
    config = AppConfig.model_validate({"models": [{"name": n, "source": n, "family": f} for n, f in MODELS],
                                       "local_models_dir": "/nonexistent"})
    client = TestClient(build_api(Ingress({n: LocalHandle(f) for n, f in families.items()}, config)),
                        raise_server_exceptions=False)
    ask = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    listed = {"type": "function", "function": {"name": "g", "parameters": {"type": "array"}}}
    for tools, param in (([tool, tool], "tools"), ([tool, listed], "tools.1.function.parameters")):
        for path in (CHAT, "/tokenize"):
            response = client.post(path, json={"model": "llm", "messages": ask, "tools": tools})
            assert response.status_code == 400 and response.json()["error"]["param"] == param, (path, response.text)
    assert client.post("/tokenize", json={"model": "llm", "messages": ask, "tools": [tool]}).json()["count"] == 3
    assert [kind for kind, _ in families["llm"].calls] == ["tokenize"]
