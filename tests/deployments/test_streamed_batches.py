"""Streams share batched generate calls: each row's deltas add up to exactly its own reply."""

from __future__ import annotations

import pytest

from deployments.generation import generate_batch
from deployments.llm import LLMServer
from deployments.params import ChatParams
from loading import ModelSpec, load_model
from loading.tiny import build_tiny


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = build_tiny("llm", tmp_path_factory.mktemp("models") / "tiny-llm")
    spec = ModelSpec(name="tiny", source=str(path), device="cpu", max_new_tokens=32)
    return spec, load_model(spec)


def _generate(spec, loaded, batch):
    for params in batch:  # each request is encoded on its own, as the server does before batching
        params.inputs = LLMServer.encode(None, loaded, params)
    return generate_batch(spec, loaded, batch)


def _chat(prompt: str, max_new_tokens: int, stop: list[str] | None = None) -> ChatParams:
    return ChatParams(model="tiny", messages=[{"role": "user", "content": prompt}], temperature=0,
                      max_new_tokens=max_new_tokens, stop=stop or [])


def test_each_streamed_row_gets_its_own_deltas_and_they_add_up_to_its_reply(llm):
    spec, loaded = llm
    prompts = [("Tell me a story", 24), ("hi", 5), ("A much longer question about the weather", 16), ("ok", 1)]
    plain = _generate(spec, loaded, [_chat(p, n) for p, n in prompts])

    streamed, received = [_chat(p, n) for p, n in prompts], [[] for _ in prompts]
    for params, pieces in zip(streamed[:3], received, strict=False):  # the last row is a plain request in the same batch
        params.sink = pieces.append
    results = _generate(spec, loaded, streamed)

    assert [r.text for r in results] == [r.text for r in plain]  # streaming changes nothing in the results
    assert [r.completion_tokens for r in results] == [r.completion_tokens for r in plain]
    for pieces, result in zip(received[:3], results, strict=False):
        sent = "".join(pieces)
        assert result.text.startswith(sent)  # the caller sends the held-back rest from the result
    assert len(received[0]) > 3, received[0]  # tokens arrived one by one, not at the end
    assert received[3] == []
    # a row never streams past its own limit though the batch generates up to the longest
    assert results[1].completion_tokens <= 5 and results[3].completion_tokens <= 1


def test_a_streamed_row_never_sends_a_stop_string_or_what_follows_it(llm):
    spec, loaded = llm
    full = _generate(spec, loaded, [_chat("Count with me", 24)])[0].text
    assert len(full) > 6, full
    stop = full[3:6]
    pieces: list[str] = []
    params = _chat("Count with me", 24, stop=[stop])
    params.sink = pieces.append
    result = _generate(spec, loaded, [params, _chat("Count with me", 24, stop=[stop])])[0]
    assert result.text == full[: full.find(stop)] and result.finish_reason == "stop"
    assert result.text.startswith("".join(pieces)) and stop not in "".join(pieces)


def test_a_sink_that_fails_leaves_the_rest_of_the_batch_alone(llm):
    spec, loaded = llm

    def gone(_text: str) -> None:
        raise RuntimeError("client went away")

    first, second = _chat("Tell me a story", 12), _chat("Tell me a story", 12)
    first.sink, pieces = gone, []
    second.sink = pieces.append
    results = _generate(spec, loaded, [first, second])
    assert results[0].text == results[1].text and "".join(pieces) and results[1].text.startswith("".join(pieces))


def test_the_direct_decoder_gives_what_the_tokenizer_gives(llm):
    """RowStream decodes with the Rust tokenizer itself: for any ids (special tokens, a cut UTF-8
    sequence) it must give what transformers' decode gives."""
    import random

    from deployments.generation import text_decoder

    tokenizer = llm[1].tokenizer
    decode, rng = text_decoder(tokenizer), random.Random(0)
    specials = list(tokenizer.all_special_ids)
    for _ in range(500):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(0, 10))] + rng.sample(specials, 1)
        rng.shuffle(ids)
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_tokenizer_that_post_processes_its_text_keeps_its_own_decode(llm, tmp_path, monkeypatch):
    """Space clean-up, or a class with its own _decode (Whisper's): the direct path would differ."""
    from transformers import AutoTokenizer

    from deployments.generation import text_decoder

    tokenizer = llm[1].tokenizer
    calls = []
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: calls.append(ids) or "x")
    text_decoder(tokenizer)([1, 2])
    assert calls == []  # the direct path: transformers' decode is not called
    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", True)
    assert text_decoder(tokenizer)([1, 2]) == "x" and calls == [[1, 2]]
    whisper = AutoTokenizer.from_pretrained(build_tiny("stt", tmp_path / "tiny-whisper"))
    monkeypatch.setattr(whisper, "decode", lambda ids, **kw: calls.append(ids) or "w")
    assert text_decoder(whisper)([3]) == "w"
