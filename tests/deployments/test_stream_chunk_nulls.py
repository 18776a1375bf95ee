"""Stream chunks carry the keys OpenAI always sends, as null where unset: `finish_reason` and `logprobs` in
every choice, and `usage` in every chunk before the usage one when `stream_options.include_usage` is on.
Clients read `finish_reason: null` as "not finished yet"; some (strict decoders, `choice.finish_reason !==
null` in JavaScript) read a missing key as something else."""

import asyncio
import json

import pytest
from openai.types.chat import ChatCompletionChunk

from deployments.routes.completions import completion_events
from deployments.sse import chat_events


async def _items():
    yield 0, {"delta": "Hel"}
    yield 0, {"delta": "lo"}
    yield 0, {"finish_reason": "stop", "usage": {"prompt_tokens": 5, "completion_tokens": 2}}


def _chunks(events) -> list[dict]:
    async def collect():
        return "".join([event async for event in events])
    text = asyncio.run(collect())
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(line[len("data: "):]) for line in text.split("\n\n")
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_chunks_carry_finish_reason_logprobs_and_usage_as_null(include_usage):
    chunks = _chunks(chat_events("m", _items(), include_usage))
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        for choice in chunk["choices"]:
            assert "finish_reason" in choice and "logprobs" in choice
            assert choice["logprobs"] is None
        assert ("usage" in chunk) is include_usage
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert deltas[0] == {"role": "assistant", "content": "", "refusal": None}  # OpenAI's first delta
    assert all("refusal" not in delta for delta in deltas[1:])  # and only there
    content = [chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["delta"].get("content")]
    assert content and all(chunk["choices"][0]["finish_reason"] is None for chunk in content)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    if include_usage:
        assert all(chunk["usage"] is None for chunk in chunks[:-1])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("include_usage", [False, True])
def test_completion_chunks_carry_finish_reason_logprobs_and_usage_as_null(include_usage):
    chunks = _chunks(completion_events("m", _items(), include_usage, n=1))
    for chunk in chunks:  # (openai's Completion type is the whole reply's: it has no null finish_reason)
        for choice in chunk["choices"]:
            assert "finish_reason" in choice and "logprobs" in choice
        assert ("usage" in chunk) is include_usage
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None, None, "stop"]
    if include_usage:
        assert all(chunk["usage"] is None for chunk in chunks[:-1]) and chunks[-1]["usage"]["prompt_tokens"] == 5
