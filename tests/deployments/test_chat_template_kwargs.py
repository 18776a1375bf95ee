"""`chat_template_kwargs` (vLLM's field; Qwen3's `enable_thinking`): variables for the model's chat template.

It was dropped without a word (unknown fields are ignored), so a Qwen3 user turning thinking off got it on.
A real LLMServer on the tiny Llama whose template reads `enable_thinking` as Qwen3's does, behind the real HTTP
app (build_api), driven by the `openai` client."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient
from local_handles import LocalHandle

from deployments.api import build_api
from deployments.app_config import AppConfig
from deployments.chat_encoding import template_variables
from deployments.ingress import Ingress
from deployments.llm import LLMServer
from deployments.options import ChatOptions
from loading import ModelSpec
from loading.tiny import build_tiny

# Qwen3's switch, in the tiny template's ChatML: an empty think block when thinking is off
THINKING_SWITCH = ("{%- if add_generation_prompt and enable_thinking is defined and enable_thinking is false -%}"
                   "{{ '<think>\n\n</think>\n\n' }}{%- endif -%}")


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> openai.OpenAI:
    source = build_tiny("llm", tmp_path_factory.mktemp("llm") / "tiny-qwen3ish")
    template = source / "chat_template.jinja"
    template.write_text(template.read_text() + THINKING_SWITCH)
    server = LLMServer([ModelSpec(name="llm", source=str(source), max_new_tokens=4)], ChatOptions())
    config = AppConfig.model_validate({"models": [{"name": "llm", "source": str(source), "family": "llm"}],
                                       "local_models_dir": "/nonexistent", "limits": {"max_template_kwargs_chars": 64}})
    http = TestClient(build_api(Ingress({"llm": LocalHandle(server)}, config)), raise_server_exceptions=False)
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)


def chat(client: openai.OpenAI, **extra):
    return client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          temperature=0, **extra)


def tokenize(client: openai.OpenAI, **extra) -> int:
    response = client._client.post("http://testserver/tokenize", json={
        "model": "llm", "messages": [{"role": "user", "content": "hi"}], **extra})
    assert response.status_code == 200, response.text
    return response.json()["count"]


def test_a_template_variable_reaches_the_template_and_counts_in_the_prompt(client):
    plain = chat(client).usage.prompt_tokens
    off = chat(client, extra_body={"chat_template_kwargs": {"enable_thinking": False}}).usage.prompt_tokens
    on = chat(client, extra_body={"chat_template_kwargs": {"enable_thinking": True}}).usage.prompt_tokens
    assert off > plain == on  # the empty think block is in the prompt only when thinking is off
    # /tokenize counts what the chat renders, with the same variables
    assert tokenize(client, chat_template_kwargs={"enable_thinking": False}) == off
    assert tokenize(client) == plain


@pytest.mark.parametrize("kwargs, words", [
    ({"enable_thinkng": False}, "'enable_thinkng', which this model's chat template does not take"),
    ({"messages": []}, "'messages'"),  # the request's own fields decide these
    ({"add_generation_prompt": False}, "'add_generation_prompt'"),
    ({"eos_token": "</s>"}, "'eos_token'"),  # the tokenizer's special tokens stay the tokenizer's
])
def test_a_key_the_template_does_not_take_from_a_request_is_a_400_naming_what_it_takes(client, kwargs, words):
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, extra_body={"chat_template_kwargs": kwargs})
    error = refused.value.body
    assert error["param"] == "chat_template_kwargs" and words in error["message"]
    assert "it takes: enable_thinking" in error["message"]


def test_template_kwargs_past_the_limit_are_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, extra_body={"chat_template_kwargs": {"enable_thinking": "x" * 100}})
    error = refused.value.body
    assert error["param"] == "chat_template_kwargs" and "max_template_kwargs_chars=64" in error["message"]


def test_template_variables_are_what_the_template_reads_from_its_context():
    assert template_variables(THINKING_SWITCH) == {"add_generation_prompt", "enable_thinking"}
    assert template_variables("{% for x in range(3) %}{{ x }}{% endfor %}") == frozenset()  # Jinja's own
    assert template_variables({"default": "{{ a }}", "tool_use": "{{ b }}"}) == {"a", "b"}
    assert template_variables("{% broken") == frozenset() and template_variables(None) == frozenset()


def test_a_template_with_transformers_own_generation_tag_is_read_too():
    """Templates that mark the assistant's turns for training use transformers' `{% generation %}` tag, which a
    plain Jinja environment cannot parse: every key would have been refused."""
    template = ("{%- for m in messages -%}{%- if m.role == 'assistant' -%}{% generation %}{{ m.content }}"
                "{% endgeneration %}{%- else -%}{{ m.content }}{%- endif -%}{%- endfor -%}{{ persona }}")
    assert template_variables(template) == {"messages", "persona"}
