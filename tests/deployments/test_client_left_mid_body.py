"""A client that hangs up before its body ends (its Content-Length promised more) is not served: no model
call, no answer, and the HTTP metrics count it 499 (client closed request), not as an answer.

Reproduced on a live `serve run`: a complete chat for SmolLM2 (max_tokens 100) sent with a Content-Length 10
bytes longer, then the socket closed: the guard took the disconnect for the body's end and ran the request
on what had come; no one upstream saw the disconnect, so its generation ran to the end for no one (/health:
3 requests, cancelled 0; the same chats with an honest Content-Length: cancelled 3). The real ingress app
(build_api: HTTP metrics, guard, routes) over a stand-in LLM handle, driven with raw ASGI messages.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from local_handles import LocalHandle

from deployments.api import build_api
from deployments.app_config import AppConfig
from deployments.ingress import Ingress
from deployments.metrics import IngressMetrics
from deployments.params import ChatResult

CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi"}]}).encode()


class LLM:
    def __init__(self):
        self.calls = 0

    async def chat(self, params):
        self.calls += 1
        return ChatResult(text="hi", finish_reason="stop", prompt_tokens=3, completion_tokens=1)


@pytest.fixture
def answered(monkeypatch) -> list[int]:
    statuses: list[int] = []
    monkeypatch.setattr(IngressMetrics, "answered", lambda self, route, method, status, *rest: statuses.append(status))
    return statuses


def post(parts: list[tuple[bytes, bool]] | None, declared: int, hang_up: bool, path: str = CHAT,
         content_type: bytes = b"application/json") -> tuple[LLM, list[dict]]:
    """POST `parts` ((body, more_body) each), then the client's disconnect if `hang_up`; what was sent back."""
    llm = LLM()
    config = AppConfig.model_validate({"models": [{"name": "llm", "source": "llm", "family": "llm"}],
                                       "local_models_dir": "/nonexistent"})
    asgi = build_api(Ingress({"llm": LocalHandle(llm)}, config))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", content_type), (b"content-length", str(declared).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    messages = [{"type": "http.request", "body": body, "more_body": more} for body, more in parts or []]
    sent: list[dict] = []

    async def receive():
        if messages:
            return messages.pop(0)
        if hang_up:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(asgi(scope, receive, send), 10))
    return llm, sent


@pytest.mark.parametrize("parts", [
    [(BODY, True)],  # all of a valid chat, then the hang-up where 10 more bytes were promised
    [(BODY[:10], True), (BODY[10:], True)],
    [(BODY[:20], True)],  # a part of it
    [],
])
def test_a_client_that_hangs_up_before_its_body_ends_is_neither_served_nor_answered(parts, answered):
    llm, sent = post(parts, len(BODY) + 10, hang_up=True)
    assert llm.calls == 0
    assert sent == []
    assert answered == [499]


def test_a_whole_body_is_served(answered):
    llm, sent = post([(BODY, False)], len(BODY), hang_up=False)
    assert llm.calls == 1
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert answered == [200]


def test_a_client_that_hangs_up_mid_upload_is_counted_499_not_400(answered):
    """A multipart upload cut off by its client: FastAPI's form parser answers the broken body with a 400 (to
    no one), which the metrics counted as the client's bad request; a disconnect seen before the answer
    starts makes it the client's hang-up, as for a JSON body."""
    head = (b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n" + b"RIFF" + bytes(4000))
    llm, _ = post([(head, True)], len(head) + 100_000, hang_up=True, path="/v1/audio/transcriptions",
                  content_type=b"multipart/form-data; boundary=b0undary")
    assert answered == [499]
