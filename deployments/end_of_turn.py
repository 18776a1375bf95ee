"""Whether a speaker's words so far end their turn: the chat model's own probability that the user's
message closes right after them (the Realtime session's `semantic_vad`).

A chat model is trained on conversations rendered by its template, where each message is followed by the
template's closing token (`<|im_end|>`, `<|eot_id|>`, `</s>`). Rendered up to the end of the words heard,
the probability of that token next is how likely the message is to end there: "Set a timer for" scores
1e-9 on SmolLM2-135M-Instruct, "Set a timer for five minutes." 1e-2 (tests/deployments/test_end_of_turn.py).
LiveKit's turn detector is a small model fine-tuned for this one score; here the served LLM gives it, so no
other model is loaded. One forward of a few hundred tokens at most, on the replica's inference thread.

No Ray and no HTTP here.
"""

from __future__ import annotations

from typing import Any

USER_CHARS = 600  # the end of the words heard: what decides whether they end
ANSWERED_CHARS = 300  # the end of the reply the user answers, where there is one


class NoTurnEnd(ValueError):
    """The chat template writes no token after a message's text (or there are no words): nothing to score."""


def turn_prefix(owner: Any, heard: str, answered: str | None = None) -> tuple[list[int], int]:
    """The words `heard` as the user's message (after the assistant's reply `answered`, where there is one),
    rendered by `owner`'s (a tokenizer's or processor's) chat template up to the end of the words, as token
    ids, and the token the template writes there to close a message. Each text is cut to its end, so the
    prompt stays a few hundred tokens however long the turn or the reply."""
    text = heard.strip()[-USER_CHARS:]
    if not text:
        raise NoTurnEnd("no words to score")
    user = {"role": "user", "content": text}
    tries = [[{"role": "assistant", "content": answered[-ANSWERED_CHARS:]}, user]] if answered else []
    for messages in [*tries, [user]]:  # a template that needs a user message first gets the words alone
        try:
            rendered = owner.apply_chat_template(messages, tokenize=False)
        except Exception:  # the template's own raise_exception (roles must alternate), or its shape
            continue
        end = rendered.rfind(text)
        if end < 0:
            break
        end += len(text)
        tokenizer = getattr(owner, "tokenizer", owner)
        ids = list(tokenizer(rendered[:end], add_special_tokens=False)["input_ids"])
        closing = list(tokenizer(rendered[end:], add_special_tokens=False)["input_ids"])
        if ids and closing:
            return ids, closing[0]
        break
    raise NoTurnEnd("the chat template does not close a user message after its text")


def closing_probability(loaded: Any, ids: list[int], closing: int) -> float:
    """P(`closing` | `ids`) under the model: one forward, the last position's distribution only."""
    import torch

    with loaded.active() as model, torch.inference_mode():
        inputs = torch.tensor([ids], device=loaded.model.device)
        try:  # the vocabulary's scores at the last position only (SmolLM2: ~15% of the forward at every position)
            out = model(input_ids=inputs, use_cache=False, logits_to_keep=1)
        except TypeError:  # a model whose forward does not take it
            out = model(input_ids=inputs, use_cache=False)
        logits = out.logits[0, -1].float()
        return float(torch.softmax(logits, dim=-1)[closing])
