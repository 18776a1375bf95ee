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


# Llama 2's chat template (meta-llama/Llama-2-7b-chat-hf; its bos/eos tokens written out): one leading system
# message, then roles alternate.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '<s>[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' </s>' }}{% endif %}{% endfor %}")


def test_the_tools_fallback_joins_a_system_message_of_text_parts(tiny_llm_dirs):
    """A template without tools gets them in the system message. A system message sent as text parts
    (the openai SDK's typed content) got a second system message before it instead: Llama 2's template
    then refused the chat ('Conversation roles must alternate'), a 400 for what the string form serves."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dirs[0])
    tokenizer.chat_template = LLAMA2_TEMPLATE
    texts = []
    for system in ("Be brief.", [{"type": "text", "text": "Be brief."}]):
        params = ChatParams(model="m", messages=[{"role": "system", "content": system},
                                                 {"role": "user", "content": "hi"}],
                            tools=[{"name": "get_time", "parameters": {"type": "object"}}], tool_choice="auto")
        texts.append(tokenizer.decode(encode_text_chat(tokenizer, params)["input_ids"][0]))
    assert texts[0] == texts[1]
    assert "Be brief.\n\nYou may call these functions" in texts[1] and texts[1].count("<<SYS>>") == 1
