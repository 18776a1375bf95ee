"""Continuous batching: rows that join a running batch, leave it early, use different adapters or
sampling settings each get exactly what they would get alone."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, MistralConfig, Qwen2Config
from transformers.masking_utils import create_causal_mask

from deployments import decode_loop
from deployments.decode_loop import DecodeLoop, Group, prepared_step_mask_fits
from deployments.generation import generate_batch
from deployments.llm import LLMServer
from deployments.params import ChatParams

ONE_BAND = float("inf")  # every length in one band


@pytest.fixture(scope="module")
def models(tiny_llm_models):
    return tiny_llm_models(48)


def chat(prompt: str, max_new_tokens: int, **kw) -> ChatParams:
    return ChatParams(model="tiny", messages=[{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens,
                      temperature=kw.pop("temperature", 0), **kw)


def alone(models, name: str, params: ChatParams):
    spec, loaded = models[name]
    params.inputs = LLMServer.encode(None, loaded, params)
    return generate_batch(spec, loaded, [params])[0]


def run_loop(models, jobs: list[tuple[str, ChatParams]], join_after_steps: dict[int, int] | None = None):
    """Submit jobs (some only after the loop made a number of steps) and run it to the end."""
    stats = {"model_calls": 0, "requests": 0, "largest_batch": 0}
    loop = DecodeLoop(max_rows=8, stats=stats)
    results: dict[int, object] = {}
    late = dict(join_after_steps or {})

    def submit(i: int) -> None:
        name, params = jobs[i]
        spec, loaded = models[name]
        params.inputs = LLMServer.encode(None, loaded, params)
        loop.submit(spec, loaded, params, lambda outcome, i=i: results.__setitem__(i, outcome))

    for i in range(len(jobs)):
        if i not in late:
            submit(i)
    original_step = loop._step

    def step(group):  # the late rows join once the loop has made their number of steps
        original_step(group)
        for i, steps in list(late.items()):
            if stats.get("decode_steps", 0) >= steps:
                submit(i)
                del late[i]

    loop._step = step
    loop.run()
    assert not late, "a late job never joined"
    return [results[i] for i in range(len(jobs))], stats


def test_rows_joining_and_leaving_a_running_batch_get_their_greedy_answers(models):
    prompts = [("Tell me a story", 40), ("hi", 3), ("What is the weather like today in the city", 24),
               ("Count with me", 12), ("ok", 1), ("Another long question about many things", 30)]
    expected = [alone(models, "tiny", chat(p, n)) for p, n in prompts]
    jobs = [("tiny", chat(p, n)) for p, n in prompts]
    results, stats = run_loop(models, jobs, join_after_steps={3: 2, 4: 5, 5: 9})
    assert [r.text for r in results] == [e.text for e in expected]
    assert [r.completion_tokens for r in results] == [e.completion_tokens for e in expected]
    assert [r.finish_reason for r in results] == [e.finish_reason for e in expected]
    assert [r.prompt_tokens for r in results] == [e.prompt_tokens for e in expected]
    assert stats["requests"] == 6 and stats["largest_batch"] >= 3
    assert stats["model_calls"] < 6 + sum(n for _, n in prompts)  # prefills were shared, steps too


def test_a_decode_steps_ready_mask_is_the_one_transformers_builds(models):
    """The joining test above runs on it (the tiny Llama attends with SDPA over full-attention layers)."""
    _, loaded = models["tiny"]
    group = Group(loaded)
    assert group.step_mask_prepared
    padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    config = loaded.model.config
    cache = DynamicCache(config=config)  # four columns seen: the step adds the fifth
    heads, width = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        cache.update(torch.zeros(3, heads, 4, width), torch.zeros(3, heads, 4, width), layer)
    built = create_causal_mask(config=config, inputs_embeds=torch.zeros(3, 1, config.hidden_size),
                               attention_mask=padded, cache=cache, position_ids=padded.sum(-1, keepdim=True) - 1)
    assert built is not None and torch.equal(group.step_mask(padded), built)


@pytest.mark.parametrize("config, fits", [
    (LlamaConfig(), True),
    (Qwen2Config(), True),  # sliding window off: every layer attends to the whole cache
    (Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=1), False),
    (MistralConfig(sliding_window=4096), False),
])
def test_only_sdpa_models_without_windowed_layers_get_a_ready_step_mask(config, fits):
    config._attn_implementation = "sdpa"
    assert prepared_step_mask_fits(SimpleNamespace(config=config)) is fits
    config._attn_implementation = "eager"  # eager attention adds a float mask: transformers builds it
    assert prepared_step_mask_fits(SimpleNamespace(config=config)) is False


def test_base_and_adapter_rows_share_steps_and_answer_as_themselves(models):
    expected = [alone(models, "tiny", chat("The weather today is", 16)),
                alone(models, "lora", chat("The weather today is", 16))]
    assert expected[0].text != expected[1].text
    jobs = [("tiny", chat("The weather today is", 16)), ("lora", chat("The weather today is", 16))] * 2
    results, stats = run_loop(models, jobs, join_after_steps={2: 3})
    assert [r.text for r in results] == [e.text for e in expected] * 2
    assert stats["largest_batch"] >= 3


def test_seeded_sampling_is_per_row_and_a_stop_string_cuts_one_row(models):
    sampled = [chat("Tell me a story", 20, temperature=0.9, seed=7) for _ in range(2)]
    full = alone(models, "tiny", chat("Count with me", 24)).text
    stop = full[4:7]
    jobs = [("tiny", sampled[0]), ("tiny", chat("Count with me", 24, stop=[stop])), ("tiny", sampled[1])]
    results, _ = run_loop(models, jobs, join_after_steps={2: 4})
    assert results[0].text == results[2].text  # same seed, same tokens, though they joined apart
    assert results[1].text == full[: full.find(stop)] and results[1].finish_reason == "stop"


def test_a_cancelled_row_leaves_at_the_next_step(models):
    cancelled = threading.Event()
    doomed = chat("Tell me a story", 40, cancelled=cancelled)
    jobs = [("tiny", doomed), ("tiny", chat("Tell me a story", 40))]
    original = DecodeLoop._advance

    def advance(row, token, now):
        if row.params is doomed and len(row.tokens) == 5:
            cancelled.set()
        return original(row, token, now)

    DecodeLoop._advance = staticmethod(advance)
    try:
        results, _ = run_loop(models, jobs)
    finally:
        DecodeLoop._advance = staticmethod(original)
    assert results[0].finish_reason == "cancelled" and results[0].completion_tokens <= 6
    assert results[1].completion_tokens == alone(models, "tiny", chat("Tell me a story", 40)).completion_tokens


def test_a_row_whose_own_callback_fails_leaves_alone_and_is_told_once(models):
    """A failure while settling one row's token (here its `running` callback, called at its first token,
    which comes with the prefill it shares) fails that row alone: the rows prefilled with it answer as
    they would alone, and each caller is told exactly once."""

    def broken():
        raise RuntimeError("running callback failed")

    spec, loaded = models["tiny"]
    loop = DecodeLoop(max_rows=8, stats={"model_calls": 0, "requests": 0, "largest_batch": 0})
    told: dict[int, list] = {0: [], 1: [], 2: []}
    prompts = ["first row", "second row", "third row"]
    for i, prompt in enumerate(prompts):
        params = chat(prompt, 6, running=broken if i == 1 else None)
        params.inputs = LLMServer.encode(None, loaded, params)
        loop.submit(spec, loaded, params, told[i].append)
    loop.run()
    assert [len(outcomes) for outcomes in told.values()] == [1, 1, 1]
    assert isinstance(told[1][0], RuntimeError)
    for i in (0, 2):
        expected = alone(models, "tiny", chat(prompts[i], 6))
        assert (told[i][0].text, told[i][0].finish_reason) == (expected.text, expected.finish_reason)
    assert not loop.busy()


def test_rows_waiting_for_a_place_join_by_priority_then_in_arrival_order(models):
    """scheduling_policy: priority. With the one place taken, rows arriving meanwhile wait; each time it
    frees, the lowest priority takes it, equals in arrival order, also one that arrives while others
    have been waiting for several admissions; the running row is never preempted."""
    spec, loaded = models["tiny"]
    stats = {"model_calls": 0, "requests": 0, "largest_batch": 0}
    loop = DecodeLoop(max_rows=1, stats=stats, length_ratio=ONE_BAND)  # about places: one batch of any length
    order: list[str] = []
    results: dict[str, object] = {}

    def submit(name: str, priority: int, tokens: int = 2) -> None:
        params = chat(f"{name} says hello", tokens, priority=priority)
        params.inputs = LLMServer.encode(None, loaded, params)
        loop.submit(spec, loaded, params, lambda outcome, name=name: (order.append(name),
                                                                     results.__setitem__(name, outcome)))

    submit("running", 9, tokens=6)
    original_step = loop._step

    def step(group):
        original_step(group)
        if stats["decode_steps"] == 1:  # "running" has the place; these wait for it
            for name, priority in [("low", 5), ("a", 0), ("urgent", -2), ("b", 0), ("urgent-2", -2)]:
                submit(name, priority)
        if order == ["running", "urgent"] and "late" not in results:  # arrives behind waiting equals
            results["late"] = None
            submit("late", -2)

    loop._step = step
    loop.run()
    assert order == ["running", "urgent", "urgent-2", "late", "a", "b", "low"], order
    assert not loop.held and not loop.busy()
    assert all(getattr(results[name], "finish_reason", None) in ("stop", "length") for name in order)
    assert results["running"].completion_tokens == expected_tokens(models, "running says hello", 6)


def expected_tokens(models, prompt: str, limit: int) -> int:
    return alone(models, "tiny", chat(prompt, limit)).completion_tokens


def test_rows_waiting_for_a_place_are_not_walked_at_every_step_of_a_full_batch(models):
    """Up to max_ongoing_requests rows may wait in the loop (256 for the LLM): while the batch is full and
    nothing new arrives, a step does not go through them; when a place frees, they join in order."""
    spec, loaded = models["tiny"]
    stats = {"model_calls": 0, "requests": 0, "largest_batch": 0}
    loop = DecodeLoop(max_rows=1, stats=stats, length_ratio=ONE_BAND)  # about places: one batch of any length
    order: list[str] = []
    looked = [0]

    class Watched(threading.Event):
        def is_set(self) -> bool:  # asked of each waiting row (did its caller leave?) and each running one
            looked[0] += 1
            return super().is_set()

    def submit(name: str, limit: int) -> None:
        params = chat(f"{name} says hello", limit, cancelled=Watched())
        params.inputs = LLMServer.encode(None, loaded, params)
        loop.submit(spec, loaded, params, lambda outcome, name=name: order.append(name))

    submit("running", 24)
    original_step = loop._step
    steps: list[tuple[bool, int]] = []  # (the first row still held the place, is_set calls so far)

    def step(group):
        original_step(group)
        if stats["decode_steps"] == 1:
            for i in range(20):
                submit(f"waiting-{i}", 1)
        steps.append((bool(group.rows) and "running" in group.rows[0].params.messages[0]["content"], looked[0]))

    loop._step = step
    loop.run()
    assert order == ["running"] + [f"waiting-{i}" for i in range(20)]
    # steps after the one where the 20 arrived (and were walked once), while "running" held the place:
    # each asked only the running row
    full = [b - a for (held_a, a), (held_b, b) in zip(steps[1:], steps[2:], strict=False) if held_a and held_b]
    assert len(full) >= 3 and set(full) == {1}, steps
    assert stats["waiting_for_place"] == 0


def test_a_row_whose_caller_left_while_it_waited_for_a_place_is_never_prefilled(models):
    spec, loaded = models["tiny"]
    stats = {"model_calls": 0, "requests": 0, "largest_batch": 0}
    loop = DecodeLoop(max_rows=1, stats=stats, length_ratio=ONE_BAND)  # about places: one batch of any length
    results: dict[str, object] = {}
    gone = threading.Event()

    def submit(name: str, **kw) -> None:
        params = chat(f"{name} says hello", 3, **kw)
        params.inputs = LLMServer.encode(None, loaded, params)
        loop.submit(spec, loaded, params, lambda outcome, name=name: results.__setitem__(name, outcome))

    submit("running")
    original_step = loop._step

    def step(group):
        original_step(group)
        if stats["decode_steps"] == 1:
            submit("left", cancelled=gone)
            submit("stayed")
            gone.set()  # the first waiter's caller hangs up before the place frees

    loop._step = step
    loop.run()
    assert results["left"].finish_reason == "cancelled" and results["left"].completion_tokens == 0
    assert results["stayed"].finish_reason in ("stop", "length") and results["stayed"].completion_tokens >= 1
    assert stats["requests"] == 2 and stats["cancelled_while_waiting"] == 1  # prefilled: running and stayed


def test_a_request_that_breaks_a_shared_prefill_fails_alone(models):
    """Token ids past the embedding (a bug upstream, or a check missed) raise in the forward. The rows
    prefilled with it are prefilled again one by one, so only the bad one fails."""
    spec, loaded = models["tiny"]
    loop = DecodeLoop(max_rows=8, stats={"model_calls": 0, "requests": 0, "largest_batch": 0})
    told: dict[int, list] = {0: [], 1: []}
    good = chat("hello there", 4)
    bad = ChatParams(model="tiny", messages=[], prompt=[100_000], max_new_tokens=4, temperature=0)
    for i, params in enumerate((good, bad)):
        params.inputs = LLMServer.encode(None, loaded, params)
        loop.submit(spec, loaded, params, told[i].append)
    loop.run()
    assert isinstance(told[1][0], IndexError) and len(told[1]) == 1
    expected = alone(models, "tiny", chat("hello there", 4))
    assert len(told[0]) == 1 and told[0][0].text == expected.text


def test_a_tiny_temperature_is_greedy_and_a_row_whose_sampling_fails_fails_alone(models, monkeypatch):
    """A valid but tiny temperature (1e-38) made logits / temperature overflow to inf, and torch.multinomial
    raised in the step shared by every row: each request in the batch failed. Below 1e-5 is greedy now, and a
    sampled row's failure, like a hooked row's, ends that row alone."""
    expected = alone(models, "tiny", chat("What is the weather like today", 12))
    results, _ = run_loop(models, [("tiny", chat("What is the weather like today", 12)),
                                   ("tiny", chat("What is the weather like today", 12, temperature=1e-38))])
    assert [r.text for r in results] == [expected.text, expected.text]

    real = decode_loop.sample_token

    def failing(logits, sampling, generator):
        if sampling["top_p"] == 0.5:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, sampling, generator)

    monkeypatch.setattr(decode_loop, "sample_token", failing)
    results, _ = run_loop(models, [("tiny", chat("What is the weather like today", 12)),
                                   ("tiny", chat("Tell me a story", 12, temperature=0.7, top_p=0.5, seed=1))])
    assert results[0].text == expected.text
    assert isinstance(results[1], RuntimeError)
