"""Chat and completions as OpenAI-compatible clients send them: text parts on templates that concatenate
strings, n choices without a temperature, an empty completion prompt, null options, the limit's own field
name, and one `created` per stream. In-process, on the tiny Llama."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
from transformers import GenerationConfig

from deployments.chat_encoding import PromptRefused, encode_prompt, encode_text_chat
from deployments.chat_server import resolve_max_new_tokens
from deployments.errors import InvalidRequestError, to_error
from deployments.generation import generate_batch, sampling_settings
from deployments.params import ChatParams
from deployments.protocol import ChatCompletionRequest, CompletionRequest
from deployments.routes.chat import fan_out
from deployments.routes.completions import completion_events

# SmolLM2's and Qwen2.5's way: the content concatenated to a string (a list there raised TypeError, a 500)
CONCATENATING = ("{% for m in messages %}<|im_start|>{{ m['role'] + '\\n' + m['content'] }}<|im_end|>\\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}")


@pytest.fixture(scope="module")
def models(tiny_llm_models):
    return tiny_llm_models(12)


@pytest.fixture
def concatenating(models):
    tokenizer = copy.copy(models["tiny"][1].tokenizer)
    tokenizer.chat_template = CONCATENATING
    return tokenizer


def chat(content, **fields) -> ChatParams:
    return ChatParams(model="tiny", messages=[{"role": "user", "content": content}], max_new_tokens=12, **fields)


def test_text_parts_are_content_on_a_template_that_concatenates_strings(concatenating):
    """LangChain, LiteLLM and the openai SDK's typed parts send content as a list of text parts: on the demo's
    SmolLM2 that was a 500 (TypeError in its template)."""
    as_string = encode_text_chat(concatenating, chat("Hello\nthere"))["input_ids"].tolist()
    as_parts = encode_text_chat(concatenating, chat([{"type": "text", "text": "Hello"},
                                                     {"type": "text", "text": "there"}]))["input_ids"].tolist()
    assert as_parts == as_string  # parts joined by newlines, as vLLM joins them
    assert encode_text_chat(concatenating, chat([]))["input_ids"].shape[-1] > 0
    concatenating.chat_template = "{{ messages[0]['content'] + 1 }}"  # a template that fails on any content
    with pytest.raises(PromptRefused) as info:
        encode_text_chat(concatenating, chat("hi"))
    assert to_error(info.value)[0] == 400 and to_error(info.value)[1].error.param == "messages"


def test_an_omitted_temperature_samples_unless_the_model_says_otherwise(models):
    """Left to transformers, a generation_config without do_sample decoded greedily: n=3 without a temperature
    gave three copies. As vLLM: the config's own settings, else OpenAI's temperature 1."""
    spec, loaded = models["tiny"]
    assert sampling_settings(loaded, chat("x")) == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    assert sampling_settings(loaded, chat("x", temperature=0))["temperature"] == 0.0
    saved = loaded.model.generation_config
    try:
        loaded.model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=20)
        assert sampling_settings(loaded, chat("x")) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
        # top_k has no OpenAI field: the model's applies with the request's temperature too (it was dropped)
        assert sampling_settings(loaded, chat("x", temperature=0.3)) == {"temperature": 0.3, "top_p": 0.9,
                                                                         "top_k": 20}
    finally:
        loaded.model.generation_config = saved
    choices = fan_out(chat("Write a poem"), 3)
    for params in choices:
        params.inputs = encode_text_chat(loaded.tokenizer, params)
    texts = [result.text for result in generate_batch(spec, loaded, choices)]
    assert len(set(texts)) == 3, texts


def test_an_empty_completion_prompt_continues_from_the_start_token(models):
    """`prompt: ""` reached the model as zero tokens: a 500 ("cannot reshape tensor of 0 elements")."""
    tokenizer = models["tiny"][1].tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for prompt in ("", []):
        params = ChatParams(model="tiny", messages=[], prompt=prompt, max_new_tokens=4)
        assert encode_prompt(tokenizer, params)["input_ids"].tolist() == [[start]]
    spec, loaded = models["tiny"]
    params = ChatParams(model="tiny", messages=[], prompt="", max_new_tokens=4, temperature=0)
    params.inputs = encode_prompt(loaded.tokenizer, params)
    assert generate_batch(spec, loaded, [params])[0].completion_tokens >= 1


def test_top_p_0_is_greedy(models):
    """OpenAI's top_p takes 0 to 1; 0 was refused (400). The nucleus is then the top token alone: greedy, on
    both the decode loop and generate() (whose TopP warper refuses 0)."""
    loaded = models["tiny"][1]
    assert sampling_settings(loaded, chat("x", top_p=0))["temperature"] == 0.0
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 "top_p": 0, "temperature": 1})
    assert body.top_p == 0 and CompletionRequest.model_validate({"model": "m", "prompt": "x", "top_p": 0}).top_p == 0
    spec = models["tiny"][0]

    def reply(**fields) -> str:
        params = chat("Tell me", **fields)
        params.inputs = encode_text_chat(loaded.tokenizer, params)
        return generate_batch(spec, loaded, [params])[0].text

    assert reply(temperature=1, top_p=0) == reply(temperature=0)


def test_null_options_are_their_defaults():
    """OpenAI types n, stream and echo as "or null"; a client that sends an unset option as null got a 400."""
    chat_body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": None, "stream": None})
    assert (chat_body.n, chat_body.stream) == (1, False)
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "n": None, "stream": None,
                                                   "echo": None})
    assert (completion.n, completion.stream, completion.echo) == (1, False, False)


def test_a_refused_limit_names_the_field_the_client_sent(models):
    """max_completion_tokens past the model's limit was refused as `max_tokens`, a field never sent."""
    spec = models["tiny"][0]
    with pytest.raises(InvalidRequestError) as info:
        resolve_max_new_tokens(spec, 1000, 5, None, "max_completion_tokens")
    assert info.value.param == "max_completion_tokens" and "max_completion_tokens=1000" in str(info.value)
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_completion_tokens": 1000})
    assert body.requested_max_tokens() == 1000


def test_a_completion_stream_has_one_created(monkeypatch):
    """Each text_completion chunk took the clock's second when it was sent: one stream, several `created`."""
    clock = iter(range(1_000_000, 2_000_000, 7))
    monkeypatch.setattr("time.time", lambda: float(next(clock)))

    async def items():
        for i in range(5):
            yield 0, {"delta": f"w{i}"}
        yield 0, {"finish_reason": "length", "usage": {"prompt_tokens": 1, "completion_tokens": 5}}

    async def collect() -> list[dict]:
        sent = "".join([event async for event in completion_events("m", items(), True, 1)])
        return [json.loads(line.removeprefix("data: ")) for line in sent.split("\n\n") if line.startswith("data: {")]

    chunks = asyncio.run(collect())
    assert len(chunks) >= 6 and len({chunk["created"] for chunk in chunks}) == 1
    assert len({chunk["id"] for chunk in chunks}) == 1



@pytest.mark.parametrize("where", ["tool description", "past tool call", "message name"])
def test_text_outside_message_contents_is_counted_before_tokenizing(models, monkeypatch, where):
    """The characters-before-tokenizing refusal counted message contents only: 12 MB in a tool's description or
    a past tool call's arguments was rendered and tokenized (19 s, +2.2 GB in the review's run) before the
    same context_length_exceeded a 12 MB message gets at once."""
    from deployments.llm import LLMServer
    from deployments.options import ChatOptions

    spec = models["tiny"][0]
    server = LLMServer([spec], ChatOptions())
    tokenized = []
    monkeypatch.setattr(LLMServer, "encode", lambda self, *args: tokenized.append(args) or 1 / 0)
    text = "lorem ipsum " * 200_000
    messages = [{"role": "user", "content": "hi"}]
    tools = None
    if where == "tool description":
        tools = [{"name": "f", "description": text, "parameters": {"type": "object"}}]
    elif where == "past tool call":
        messages += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": text}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    else:
        messages[0]["name"] = text
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(server.chat(ChatParams(model="tiny", messages=messages, tools=tools, max_new_tokens=2,
                                           wait_s=60)))
    assert info.value.code == "context_length_exceeded" and not tokenized


def test_logprob_bytes_join_to_the_text_on_a_sentencepiece_tokenizer():
    """Llama-2, Mistral, Phi-3 pieces are '▁world': decode([token]) alone dropped the word's space, so the
    entries' bytes no longer joined to the reply (OpenAI: they do). The reply's first word has no space where
    the decoder strips it; a stream's later chunk knows its position."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from deployments.row_logits import as_openai

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    raw.train_from_iterator(["Hello world again and again, hello world"] * 50,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ids = tokenizer("Hello world again", add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids)
    entries = [(token, -1.0, [(token, -1.0)]) for token in ids]
    whole = as_openai(tokenizer, entries)
    assert bytes(b for entry in whole for b in entry["bytes"]).decode() == text == "Hello world again"
    streamed = as_openai(tokenizer, entries[:1]) + as_openai(tokenizer, entries[1:], start=1)
    assert streamed == whole and whole[1]["top_logprobs"][0]["token"] == " world"


def test_legacy_logprobs_name_part_of_a_character_by_its_bytes_and_count_offsets_in_characters():
    """Byte-level fragments of '你' were all '\ufffd': several alternatives collapsed into one top_logprobs key,
    and text_offset counted a character per fragment (19 past the end of SmolLM2's 61-character reply)."""
    from deployments.routes.completions import TextOffsets, legacy_logprobs

    def entry(data: bytes, alternatives: list[bytes]) -> dict:
        return {"token": data.decode("utf-8", errors="replace"), "logprob": -1.0, "bytes": list(data),
                "top_logprobs": [{"token": a.decode("utf-8", errors="replace"), "logprob": -2.0, "bytes": list(a)}
                                 for a in alternatives]}

    you = "你".encode()  # 3 bytes
    before = TextOffsets()
    before.take(b"Hello")  # a stream's earlier chunk
    out = legacy_logprobs([entry(b"A", [b"A"]), entry(you[:2], [you[:2], b"\xe5\xa5", b"\xe4\xb8"]),
                           entry(you[2:], [you[2:]]), entry(b"!", [b"!"])], before)
    assert out.tokens == ["A", "bytes:\\xe4\\xbd", "bytes:\\xa0", "!"]
    assert len(out.top_logprobs[1]) == 3
    assert out.text_offset == [5, 6, 6, 7]  # "A你!" after 5 characters


def test_a_streamed_completions_text_offsets_follow_the_tokens_not_the_chunks():
    """A stop string holds back its length - 1 characters, so a token's text can end in a later chunk than its
    logprob entry: offsets counted from the chunks' text ran short (13 where 15 was right)."""
    def entry(text: str) -> dict:
        return {"token": text, "logprob": -1.0, "bytes": list(text.encode()), "top_logprobs": []}

    async def items():
        yield 0, {"delta": "Hel", "logprobs": [entry("Hello")]}  # "lo" held back by stop ["lo!?"]
        yield 0, {"delta": "lo wor", "logprobs": [entry(" world")]}
        yield 0, {"delta": "ld", "logprobs": [entry("!")]}
        yield 0, {"finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 3}}

    async def offsets() -> list[int]:
        found = []
        async for chunk in completion_events("m", items(), False, 1):
            for line in chunk.splitlines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        found += (choice.get("logprobs") or {}).get("text_offset", [])
        return found

    assert asyncio.run(offsets()) == [0, 5, 11]

