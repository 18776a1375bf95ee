"""How long a Realtime turn under `semantic_vad` waits in silence before it ends, from how likely the words
heard so far end it.

OpenAI's semantic_vad ends a turn when a model judges the user done, waiting longer after words that trail
off ("I'd like to order a pizza with...") and at most 8, 4 or 2 s of silence for `eagerness` low, medium
(`auto`) or high. Here: after PAUSE_MS of silence the session transcribes the turn so far and asks the chat
model how likely the user's message closes after those words (end_of_turn.py); the turn then ends once the
silence has lasted a share of the eagerness's longest wait that falls with that probability, on a log
scale: at 1e-3 or more (a finished sentence: "Set a timer for five minutes." 1e-2 on SmolLM2-135M) none
beyond the pause, at 1e-8 or less ("Set a timer for", 1e-9) all of it. Speech before then continues the
same turn. Without a score (no words, a template with nothing to score, the LLM unavailable) the turn
ends after a quarter of the longest wait.
"""

from __future__ import annotations

import math

LONGEST_WAIT_S = {"low": 8.0, "medium": 4.0, "high": 2.0, "auto": 4.0}  # OpenAI's documented maxima
PAUSE_MS = 300  # silence after which the words so far are scored; no turn ends sooner
DONE_LOG10 = -3.0  # a closing probability at or above 10**DONE_LOG10: the turn ends at the pause
OPEN_LOG10 = -8.0  # at or below 10**OPEN_LOG10: it waits the eagerness's longest
UNSCORED_SHARE = 0.25


def wait_s(probability: float | None, eagerness: str) -> float:
    """Seconds of silence after which a turn whose words close with `probability` ends."""
    longest = LONGEST_WAIT_S[eagerness]
    if probability is None or math.isnan(probability):
        share = UNSCORED_SHARE
    else:
        level = math.log10(max(probability, 1e-30))
        share = min(1.0, max(0.0, (DONE_LOG10 - level) / (DONE_LOG10 - OPEN_LOG10)))
    return max(PAUSE_MS / 1000, share * longest)
