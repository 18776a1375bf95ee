"""Silence two transformers warnings that Whisper's own `generate` triggers on every request.

`WhisperForConditionalGeneration.generate` passes a `generation_config` together with keyword
arguments and sets `max_length` itself, so transformers 5.x warns twice per call about arguments we
never passed; under load that is two log lines per request in every STT replica's log.
"""

from __future__ import annotations

import logging

_NOISE = (
    "Passing `generation_config` together with generation-related arguments",
    "seem to have been set. `max_new_tokens` will take precedence",
)


class _DropWhisperNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


def quiet_generation_warnings() -> None:
    logger = logging.getLogger("transformers.generation.utils")
    if not any(isinstance(f, _DropWhisperNoise) for f in logger.filters):
        logger.addFilter(_DropWhisperNoise())
