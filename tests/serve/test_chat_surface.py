"""The rest of OpenAI's chat surface through the official client: logprobs from the model's own
scores, `n` choices, presence/frequency penalties and logit_bias honoured, /v1/completions (string and
list prompts, echo, logprobs, streaming, suffix refused), refused fields answered with a 400 saying why;
and a generate()-fallback model refusing the per-row features by name (in-process)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

ASK = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def app(chat_app):
    return chat_app


def test_logprobs_are_the_models_own_and_greedy_takes_the_top_one(app):
    client = app.openai()
    reply = client.chat.completions.create(model="tiny-llm", messages=ASK, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    assert "".join(bytes(e.bytes).decode("utf-8", errors="replace") for e in entries) == choice.message.content or \
        b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace") == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and sum(math.exp(t) for t in tops) <= 1.0 + 1e-4
        assert entry.logprob == pytest.approx(tops[0])  # greedy: the sampled token is the most likely
    # the same model scores give the same numbers streamed
    chunks = list(client.chat.completions.create(model="tiny-llm", messages=ASK, max_tokens=8, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]


def test_n_choices_are_sampled_apart_and_usage_counts_them_all(app):
    client = app.openai()
    reply = client.chat.completions.create(model="tiny-llm", messages=ASK, max_tokens=10, temperature=1.0, n=3, seed=9)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1
    single = client.chat.completions.create(model="tiny-llm", messages=ASK, max_tokens=10, temperature=1.0, seed=9)
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once
    assert reply.choices[0].message.content == single.choices[0].message.content  # choice 0 uses the seed itself
    chunks = list(client.chat.completions.create(model="tiny-llm", messages=ASK, max_tokens=10, temperature=1.0, n=3,
                                                 seed=9, stream=True, stream_options={"include_usage": True}))
    texts = {i: "" for i in range(3)}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert [texts[i] for i in range(3)] == [c.message.content for c in reply.choices]
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-llm", messages=ASK, n=9)
    assert caught.value.body["param"] == "n" and "max_choices=8" in caught.value.body["message"]


def test_logit_bias_and_penalties_change_what_is_sampled(app, models_dir):
    client = app.openai()

    def ask(**kw):
        reply = client.chat.completions.create(model="tiny-llm", messages=ASK, max_tokens=40, temperature=0,
                                               logprobs=True, **kw)
        return reply.choices[0]

    plain = ask()
    first = plain.logprobs.content[0]
    banned = ask(logit_bias={str(_token_id(models_dir, first.bytes)): -100})
    assert banned.logprobs.content[0].bytes != first.bytes
    forced = ask(logit_bias={"300": 100})
    assert len({tuple(e.bytes) for e in forced.logprobs.content}) == 1  # every token is token 300
    def repeats(choice) -> int:
        tokens = [tuple(e.bytes) for e in choice.logprobs.content]
        return len(tokens) - len(set(tokens))

    penalized = ask(frequency_penalty=2.0, presence_penalty=2.0)
    assert repeats(plain) > 0  # the random model repeats itself in 40 greedy tokens...
    assert repeats(penalized) < repeats(plain)  # ...and the penalties make it repeat less


def _token_id(models_dir, token_bytes: list[int]) -> int:
    """A token's id in the tiny LLM's vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tiny-llm")
    for token_id in range(len(tokenizer)):
        piece = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)]).encode()
        if list(piece) == list(token_bytes):
            return token_id
    raise AssertionError(f"no token for {token_bytes}")


def test_text_completions_plain_listed_echoed_streamed(app):
    client = app.openai()
    one = client.completions.create(model="tiny-llm", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert one.object == "text_completion" and len(one.choices) == 1 and one.usage.completion_tokens <= 6
    several = client.completions.create(model="tiny-llm", prompt=["Once upon a time", "The weather"], max_tokens=6,
                                        temperature=0, n=2)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == one.choices[0].text  # greedy: equal samples
    echoed = client.completions.create(model="tiny-llm", prompt="Once upon a time", max_tokens=6, temperature=0,
                                       echo=True, logprobs=2)
    assert echoed.choices[0].text == "Once upon a time" + one.choices[0].text
    lp = echoed.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(lp.top_logprobs)
    assert lp.token_logprobs[0] is None and all(v is not None and v <= 0 for v in lp.token_logprobs[-6:] if v)
    assert "".join(lp.tokens) == echoed.choices[0].text
    ids = client.completions.create(model="tiny-llm", prompt=[40, 41, 42], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 3
    stream = list(client.completions.create(model="tiny-llm", prompt="Once upon a time", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in stream if c.choices) == one.choices[0].text
    assert stream[-1].usage.completion_tokens == one.usage.completion_tokens
    vlm = client.completions.create(model="tiny-llava", prompt="A picture of", max_tokens=4, temperature=0)
    assert vlm.usage.completion_tokens >= 1


@pytest.mark.parametrize("path,body,param,words", [
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix", "not served"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of", "best_of"),
    ("/v1/completions", {"prompt": ["a"] * 9}, "prompt", "(9 prompts times n=1); at most max_choices"),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, "prompt", "prompt must be"),
    ("/v1/chat/completions", {"messages": ASK, "audio": {"voice": "alloy", "format": "wav"}}, "audio", "speech"),
    ("/v1/chat/completions", {"messages": ASK, "modalities": ["text", "audio"]}, "modalities", "text"),
    ("/v1/chat/completions", {"messages": ASK, "prediction": {"type": "content", "content": "x"}}, "prediction",
     "not served"),
    ("/v1/chat/completions", {"messages": ASK, "store": True}, "store", "not stored"),
    ("/v1/chat/completions", {"messages": ASK, "top_logprobs": 2}, "top_logprobs", "logprobs: true"),
    ("/v1/chat/completions", {"messages": ASK, "top_logprobs": 21, "logprobs": True}, "top_logprobs", "20"),
    ("/v1/chat/completions", {"messages": ASK, "logit_bias": {"99999": 5}}, "logit_bias", "tokens"),
    ("/v1/chat/completions", {"messages": ASK, "logit_bias": {"5": 101}}, "logit_bias", "100"),
    ("/v1/chat/completions", {"messages": ASK, "presence_penalty": 3}, "presence_penalty", "2"),
])
def test_unserved_or_bad_fields_are_400s_saying_why(app, path, body, param, words):
    response = app.post(path, json={"model": "tiny-llm", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_accepted_compatibility_fields_change_nothing(app):
    client = app.openai()
    kwargs = dict(model="tiny-llm", messages=ASK, max_tokens=6, temperature=0)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    with ThreadPoolExecutor(2) as pool:
        same = pool.submit(lambda: client.chat.completions.create(
            **kwargs, store=False, metadata={"k": "v"}, service_tier="auto", user="u1", safety_identifier="s",
            prompt_cache_key="p", modalities=["text"]).choices[0].message.content).result()
    assert same == plain


def test_a_generate_fallback_model_refuses_per_row_features_by_name():
    """Qwen2-VL-style models (3-D rotary positions) run through generate(): logprobs, penalties, bias and
    grammars are 400s naming the model, not silently dropped."""
    import asyncio

    from deployments import chat_server
    from deployments.errors import InvalidRequestError
    from deployments.params import ChatParams

    class Loaded:
        config = type("C", (), {"rope_scaling": {"mrope_section": [1, 1, 1]}})()

    class Pool:
        async def get(self, name, wait_s=0.0):
            return type("S", (), {"name": "qwen2-vl"})(), Loaded()

    server = chat_server.ChatServer.__new__(chat_server.ChatServer)
    server.pool = Pool()
    server.validate = lambda *a: None
    async def admit(params: ChatParams) -> None:
        async with server._admitted(params):
            pass

    for field, value in [("logprobs", True), ("presence_penalty", 0.5), ("logit_bias", {1: 2.0})]:
        params = ChatParams(model="qwen2-vl", messages=[{"role": "user", "content": "x"}], **{field: value})
        with pytest.raises(InvalidRequestError, match="qwen2-vl.*generate") as caught:
            asyncio.run(admit(params))
        assert caught.value.param == field
