"""Text-to-waveform synthesis (the torch side of the TTS deployment)."""

from __future__ import annotations

import inspect
import time
from typing import Any

import numpy as np
import torch

from loading import LoadedModel, ModelSpec

from .errors import InvalidRequestError, ServiceUnavailableError
from .params import SpeechParams, SpeechResult
from .text_split import split_text

# VITS samples its durations: a fixed seed per piece makes the same text give the same audio.
SEED = 0


def model_kwargs(spec: ModelSpec, loaded: LoadedModel, params: SpeechParams) -> dict[str, Any]:
    """What the model's forward takes besides the text (a 400 for a speed it cannot honour)."""
    if "speaking_rate" in inspect.signature(loaded.model.forward).parameters:
        return {"speaking_rate": params.speed}
    if params.speed != 1.0:
        raise InvalidRequestError(f"model {spec.name!r} does not support speed", param="speed")
    return {}


def sample_rate(loaded: LoadedModel) -> int:
    return int(getattr(loaded.model.config, "sampling_rate", 16000))


def synthesize_piece(loaded: LoadedModel, piece: str, kwargs: dict[str, Any]) -> SpeechResult | None:
    """One model call; None when nothing in the piece is pronounceable (e.g. only symbols)."""
    inputs = loaded.processor(text=piece, return_tensors="pt")
    tokens = int(inputs["input_ids"].shape[-1])
    if tokens == 0:
        return None
    with loaded.active() as model, torch.inference_mode():
        torch.manual_seed(SEED)
        output = model(**inputs.to(loaded.model.device), **kwargs)
    waveform = output.waveform if hasattr(output, "waveform") else output[0]
    return SpeechResult(waveform[0].float().cpu().numpy().astype(np.float32), sample_rate(loaded), tokens)


def nothing_to_say() -> InvalidRequestError:
    # VITS raises an opaque RuntimeError on empty input
    return InvalidRequestError(
        "input has no characters this voice can pronounce (after normalisation it is empty)", param="input")


def past_timeout(spec: ModelSpec, started: float) -> ServiceUnavailableError | None:
    if time.monotonic() - started > spec.generation_timeout_s:
        return ServiceUnavailableError(
            f"synthesis took longer than generation_timeout_s={spec.generation_timeout_s:g} s of model {spec.name!r}; "
            "send shorter text (or raise generation_timeout_s)", code="timeout")
    return None


def synthesize(spec: ModelSpec, loaded: LoadedModel, params: SpeechParams,
               max_chars_per_call: int = 400) -> SpeechResult:
    """The text in pieces of at most `max_chars_per_call` (sentence boundaries first), one model call
    each, joined; stops between pieces once the caller has gone away, and fails (503 naming the
    bound) once generation_timeout_s has passed."""
    kwargs = model_kwargs(spec, loaded, params)
    results: list[SpeechResult] = []
    started = time.monotonic()
    for piece in split_text(params.text, max_chars_per_call):
        if params.cancelled is not None and params.cancelled.is_set():
            break
        if results and (error := past_timeout(spec, started)) is not None:
            raise error
        result = synthesize_piece(loaded, piece, kwargs)
        if result is not None:
            results.append(result)
    if not results:
        raise nothing_to_say()
    return SpeechResult(np.concatenate([r.waveform for r in results]), sample_rate(loaded),
                        sum(r.tokens for r in results))
