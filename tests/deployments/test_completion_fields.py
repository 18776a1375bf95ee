"""/v1/completions' fields as OpenAI defines them, through the real HTTP app (deployments/api.py) over a real
in-process LLM replica on the tiny Llama (no Ray): a max_tokens the client left out, and a prompt too long
for the model, refused on the field it came in."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from local_handles import LocalHandle

from deployments.api import build_api
from deployments.app_config import AppConfig
from deployments.ingress import Ingress
from deployments.llm import LLMServer
from deployments.options import ChatOptions
from loading import ModelSpec

MODEL_LIMIT = 8  # the model's max_new_tokens: below OpenAI's default max_tokens of a completion (16)


@pytest.fixture(scope="module")
def client(tiny_llm_dirs, tmp_path_factory):
    source = str(tiny_llm_dirs[0])
    server = LLMServer([ModelSpec(name="tiny", source=source, family="llm", max_new_tokens=MODEL_LIMIT)],
                       ChatOptions())
    config = AppConfig.model_validate({
        "models": [{"name": "tiny", "source": source, "family": "llm", "max_new_tokens": MODEL_LIMIT}],
        "local_models_dir": str(tmp_path_factory.mktemp("models"))})
    app = build_api(Ingress({"llm": LocalHandle(server)}, config))
    # one event loop for the module's requests (the replica's decode loop runs on it), closed at the end
    with TestClient(app, raise_server_exceptions=False, headers={"x-wait-for-model": "60"}) as client:
        yield client


def test_a_max_tokens_left_out_is_openais_default_within_the_models_limit(client):
    """OpenAI's default (16) was applied as if the client had sent it: every completion without max_tokens
    to a model whose max_new_tokens is below 16 was a 400 'max_tokens=16 exceeds the limit'."""
    for body in ({}, {"max_tokens": None}):
        response = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon", "temperature": 0,
                                                        **body})
        assert response.status_code == 200, response.text
        assert 1 <= response.json()["usage"]["completion_tokens"] <= MODEL_LIMIT
    asked = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon", "max_tokens": 16})
    assert asked.status_code == 400 and asked.json()["error"]["param"] == "max_tokens"  # asked for: still refused


@pytest.mark.parametrize("body", [
    {"prompt": "hello " * 3000},  # refused from its characters, before it is tokenized
    {"prompt": list(range(5, 500)) * 2},  # token ids past the context
    {"prompt": list(range(5, 510)), "max_tokens": MODEL_LIMIT},  # fits alone, not with its completion
], ids=["text", "ids", "ids-and-completion"])
def test_a_prompt_too_long_is_refused_on_prompt_not_messages(client, body):
    """A completion has no `messages`: its context_length_exceeded named that field and told the client to
    shorten the messages."""
    response = client.post("/v1/completions", json={"model": "tiny", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt"), error
    assert "messages" not in error["message"] and "prompt" in error["message"], error
    chat = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [
        {"role": "user", "content": "hello " * 3000}]})
    assert chat.json()["error"]["param"] == "messages"  # a chat's is still its messages
