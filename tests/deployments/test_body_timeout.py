"""A request body that stops coming is a 408 after limits.body_timeout_s (plus 1 s per body_min_bytes_per_s
bytes received), and gives back its place of max_concurrent_requests.

Reproduced on a live `serve run` (serve.env): 260 connections that sent a chat's headers and 9 bytes of its
body held every place of max_concurrent_requests=256, and every other request, /health included, was a 503
`overloaded` for as long as they stayed (HAProxy waits an hour for a silent client). The ingress app here is
the real one (build_api: HTTP metrics, guard, routes) over stand-in family handles, driven with raw ASGI
messages so that a body can stall.
"""

from __future__ import annotations

import asyncio
import json
import time

from local_handles import LocalHandle

from deployments.api import build_api
from deployments.app_config import AppConfig
from deployments.ingress import Ingress
from deployments.params import ChatResult

CHAT = "/v1/chat/completions"


class LLM:
    async def chat(self, params):
        return ChatResult(text="hi", finish_reason="stop", prompt_tokens=3, completion_tokens=1)


def app(**limits):
    config = AppConfig.model_validate({"models": [{"name": "llm", "source": "llm", "family": "llm"}],
                                       "local_models_dir": "/nonexistent", "limits": limits})
    return build_api(Ingress({"llm": LocalHandle(LLM())}, config))


def chat_body(pad: int = 0) -> bytes:
    return json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi" + " " * pad}]}).encode()


async def post(asgi, parts: list[bytes], gap_s: float, declared: int, then_stall: bool = False) -> tuple[int, dict]:
    """POST `parts` one every `gap_s` (the last with more_body False unless `then_stall`: then the client
    sends nothing more and never hangs up); the answer's status and JSON."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": CHAT, "raw_path": CHAT.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(declared).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    pending = list(parts)
    answer: dict = {"body": b""}

    async def receive():
        if pending:
            await asyncio.sleep(gap_s)
            part = pending.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(pending) or then_stall}
        await asyncio.Event().wait()  # a client that neither sends nor leaves
        raise AssertionError("unreachable")

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    await asyncio.wait_for(asgi(scope, receive, send), 10)
    return answer["status"], json.loads(answer["body"])


def test_a_body_that_stops_coming_is_a_408_naming_the_limit_and_frees_its_place():
    async def main():
        asgi = app(max_concurrent_requests=1, body_timeout_s=0.5)
        body = chat_body()
        started = time.monotonic()
        stalled = asyncio.create_task(post(asgi, [body[:9]], 0, declared=len(body), then_stall=True))
        await asyncio.sleep(0.1)
        # while it waits for its body it holds the one place
        status, answer = await post(asgi, [body], 0, declared=len(body))
        assert (status, answer["error"]["code"]) == (503, "overloaded")
        status, answer = await stalled
        waited = time.monotonic() - started
        assert status == 408, answer
        error = answer["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "body_timeout"), error
        assert "body_timeout_s=0.5" in error["message"] and "body_min_bytes_per_s" in error["message"], error
        assert "9 bytes" in error["message"], error
        assert 0.4 < waited < 3, waited
        status, answer = await post(asgi, [body], 0, declared=len(body))  # the place is free again
        assert status == 200, answer

    asyncio.run(main())


def test_a_body_that_keeps_coming_at_the_minimum_rate_is_served_past_body_timeout_s():
    async def main():
        asgi = app(body_timeout_s=0.3, body_min_bytes_per_s=8192)
        body = chat_body(pad=16 * 4096)
        parts = [body[i:i + 4096] for i in range(0, len(body), 4096)]  # 4 KiB per 0.1 s: 40 KiB/s
        started = time.monotonic()
        status, answer = await post(asgi, parts, 0.1, declared=len(body))
        assert time.monotonic() - started > 0.6
        assert status == 200, answer
        assert answer["choices"][0]["message"]["content"] == "hi"

    asyncio.run(main())
