"""A chat into model inputs, and what a model's own template or processor refuses: a 400 on `messages`."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from deployments.chat_encoding import PromptRefused, encode_text_chat
from deployments.errors import to_error
from deployments.params import ChatParams


def test_a_chat_template_that_raises_is_the_clients_error(tiny_llm_dirs):
    """Gemma's template raises "System role not supported", Llama 2's and Mistral's "roles must
    alternate": those messages cannot be served by that model, which the client can fix."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dirs[0])
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    params = ChatParams(model="m", messages=[{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "hi"}])
    with pytest.raises(PromptRefused) as info:
        encode_text_chat(tokenizer, params)
    status, body, _ = to_error(info.value)
    assert status == 400 and body.error.param == "messages"
    assert "System role not supported" in body.error.message
    params.messages = params.messages[1:]
    assert encode_text_chat(tokenizer, params)["input_ids"].shape[0] == 1
