"""The prefix cache: prompts that start with stored blocks prefill only the rest, and answer exactly
as they would alone; matches are verified token by token, kept per adapter and bounded in bytes."""

from __future__ import annotations

import pytest
import torch

from deployments.decode_loop import DecodeLoop
from deployments.generation import generate_batch
from deployments.llm import LLMServer
from deployments.params import ChatParams
from deployments.prefix_cache import PrefixCache

SYSTEM = "You answer questions about the weather in the city and the mountains, briefly and politely."


@pytest.fixture(scope="module")
def models(tiny_llm_models):
    return tiny_llm_models(24)


def chat(question: str, system: str = SYSTEM, **kw) -> ChatParams:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return ChatParams(model="tiny", messages=messages, max_new_tokens=kw.pop("max_new_tokens", 16),
                      temperature=kw.pop("temperature", 0), **kw)


def alone(models, name: str, params: ChatParams):
    spec, loaded = models[name]
    params.inputs = LLMServer.encode(None, loaded, params)
    return generate_batch(spec, loaded, [params])[0]


def waves(models, loop: DecodeLoop, *batches: list[tuple[str, ChatParams]]) -> list:
    """Each wave submitted together and run to its end before the next: later waves find the earlier
    waves' prompts stored."""
    out: list = []
    for jobs in batches:
        results: dict[int, object] = {}
        for i, (name, params) in enumerate(jobs):
            spec, loaded = models[name]
            params.inputs = LLMServer.encode(None, loaded, params)
            loop.submit(spec, loaded, params, lambda outcome, i=i, results=results: results.__setitem__(i, outcome))
        loop.run()
        out.extend(results[i] for i in range(len(jobs)))
    return out


def new_loop(prefix_bytes: int = 8 << 20) -> DecodeLoop:
    return DecodeLoop(max_rows=8, stats={"model_calls": 0, "requests": 0, "largest_batch": 0},
                      prefix_cache_bytes=prefix_bytes, length_ratio=float("inf"))  # one batch, whatever the lengths


def test_prompts_sharing_a_system_prompt_reuse_it_and_answer_as_alone(models):
    first = [("tiny", chat("Will it rain tomorrow?"))]
    # one wave mixes a hit on the whole stored prompt, hits on the system prompt only, and a miss
    second = [("tiny", chat("Will it rain tomorrow?")), ("tiny", chat("Is it windy up there at noon?")),
              ("tiny", chat("Snow?")), ("tiny", chat("Hello there", system="Another system prompt entirely."))]
    expected = [alone(models, name, chat(p.messages[1]["content"], p.messages[0]["content"]))
                for name, p in first + second]
    loop = new_loop()
    results = waves(models, loop, first, second)
    assert [r.text for r in results] == [e.text for e in expected]
    assert [r.prompt_tokens for r in results] == [e.prompt_tokens for e in expected]
    assert loop.stats["prefix_cache_hits"] == 3
    assert loop.stats["model_calls"] - loop.stats["decode_steps"] == 2  # a prefill per wave: the miss joined the hits
    stored = loop._prefix_cache(models["tiny"][1])
    repeated = stored.match(None, second[0][1].inputs["input_ids"][0].tolist())
    assert repeated is not None and repeated[1] == (second[0][1].inputs["input_ids"].shape[1] - 1) // 8 * 8
    # what each reply reports as usage.prompt_tokens_details.cached_tokens
    assert results[0].cached_tokens == 0 and results[1].cached_tokens == repeated[1]
    assert results[4].cached_tokens == 0 and 0 < results[2].cached_tokens < repeated[1]


def test_adapter_rows_keep_their_own_prefixes(models):
    """A LoRA on the attention projections changes keys and values: the base's stored system prompt
    must not serve an adapter row, and mixed-adapter waves still answer as alone."""
    loop = new_loop()
    base_first = waves(models, loop, [("tiny", chat("Sunny today?"))])
    mixed = [("lora", chat("Sunny today?")), ("tiny", chat("Cloudy later?")), ("lora", chat("Cold tonight?"))]
    expected = [alone(models, name, chat(p.messages[1]["content"])) for name, p in mixed]
    results = waves(models, loop, mixed)
    assert base_first[0].text == alone(models, "tiny", chat("Sunny today?")).text
    assert [r.text for r in results] == [e.text for e in expected]
    # the base row reused the base's system prompt; the first adapter row found nothing of its own
    assert loop.stats["prefix_cache_hits"] == 1
    assert [r.text for r in waves(models, loop, [("lora", chat("Cold tonight?"))])] == [expected[2].text]
    assert loop.stats["prefix_cache_hits"] == 2


def test_sampled_rows_with_seeds_are_unchanged_by_a_hit(models):
    params = lambda: chat("Tell me about the wind", temperature=0.9, seed=7, max_new_tokens=12)  # noqa: E731
    cold = waves(models, new_loop(0), [("tiny", params())])[0]
    loop = new_loop()
    warm = waves(models, loop, [("tiny", params())], [("tiny", params())])
    assert [r.text for r in warm] == [cold.text, cold.text]
    assert loop.stats["prefix_cache_hits"] == 1


def test_off_with_zero_bytes(models):
    loop = new_loop(0)
    waves(models, loop, [("tiny", chat("a"))], [("tiny", chat("a"))])
    assert "prefix_cache_hits" not in loop.stats and not loop.prefixes


def kv(tokens: int, value: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, 2, tokens, 4), value), torch.full((1, 2, tokens, 4), value)) for _ in range(2)]


TOKEN = sum(k[0, :, 0].nbytes + v[0, :, 0].nbytes for k, v in kv(1))  # bytes a token takes in kv()


def test_store_matches_whole_blocks_and_leaves_the_last_token():
    store = PrefixCache(max_bytes=1 << 20, block=4)
    prompt = list(range(10))
    store.add(None, prompt, kv, TOKEN)
    assert store.match(None, prompt) == (store.match(None, prompt)[0], 8)  # (10 - 1) // 4 blocks
    assert store.match(None, prompt[:8] + [99])[1] == 8
    assert store.match(None, prompt[:6] + [99, 98, 97])[1] == 4  # shares one block only
    assert store.match(None, prompt[:8])[1] == 4  # its last token must be computed: one block usable
    assert store.match(None, [99] + prompt) is None
    assert store.match("an-adapter", prompt) is None
    assert store.match(None, prompt[:4]) is None  # shorter than a block plus one token


def test_a_hash_collision_is_a_miss_not_a_wrong_prefix(monkeypatch):
    store = PrefixCache(max_bytes=1 << 20, block=4)
    monkeypatch.setattr(store, "_hashes", lambda scope, tokens, blocks: [1] * blocks)  # every block collides
    store.add(None, list(range(10)), kv, TOKEN)
    assert store.match(None, list(range(100, 110))) is None
    assert store.match(None, list(range(10)))[1] == 8


def test_least_recently_used_entries_leave_first_within_the_byte_bound():
    one = sum(k.nbytes + v.nbytes for k, v in kv(8))
    store = PrefixCache(max_bytes=2 * one, block=4)
    a, b, c = [list(range(i * 100, i * 100 + 9)) for i in range(3)]
    store.add(None, a, kv, TOKEN)
    store.add(None, b, kv, TOKEN)
    assert store.match(None, a) is not None  # a is now the most recently used
    store.add(None, c, kv, TOKEN)
    assert store.bytes <= store.max_bytes
    assert store.match(None, b) is None and store.match(None, a) is not None and store.match(None, c) is not None
    copied: list[int] = []
    long_prompt = list(range(1000, 1000 + 99))
    store.add(None, long_prompt, lambda n: copied.append(n) or kv(n), TOKEN)
    assert copied == [16], "of a prompt larger than the whole bound, only the blocks that fit are copied"
    assert store.bytes <= store.max_bytes and store.match(None, long_prompt)[1] == 16


def test_a_cache_that_cannot_be_stored_turns_the_store_off_not_the_request(models, monkeypatch):
    """A model whose KV cache has no per-layer keys and values (linear-attention layers, say) still
    answers; its store is switched off."""
    import deployments.decode_loop as decode_loop

    def unstorable(*args):
        raise AttributeError("'LinearAttentionLayer' object has no attribute 'keys'")

    monkeypatch.setattr(decode_loop, "_store_prefixes", unstorable)
    loop = new_loop()
    results = waves(models, loop, [("tiny", chat("Fog?"))], [("tiny", chat("Fog?"))])
    assert [r.text for r in results] == [alone(models, "tiny", chat("Fog?")).text] * 2
    assert loop._prefix_cache(models["tiny"][1]).max_bytes == 0 and "prefix_cache_hits" not in loop.stats
