"""Text-to-waveform synthesis (the torch side of the TTS deployment)."""

from __future__ import annotations

import inspect
import time

import numpy as np
import torch

from loading import LoadedModel, ModelSpec

from .errors import InvalidRequestError, ServiceUnavailableError
from .params import SpeechParams, SpeechResult
from .text_split import split_text

# VITS samples its durations: a fixed seed per piece makes the same text give the same audio.
SEED = 0


def synthesize(spec: ModelSpec, loaded: LoadedModel, params: SpeechParams, max_chars_per_call: int = 400) -> SpeechResult:
    """The text in pieces of at most `max_chars_per_call` (sentence boundaries first), one model call
    each, joined; stops between pieces once the caller has gone away, and fails (503 naming the
    bound) once generation_timeout_s has passed."""
    kwargs = {}
    if "speaking_rate" in inspect.signature(loaded.model.forward).parameters:
        kwargs["speaking_rate"] = params.speed
    elif params.speed != 1.0:
        raise InvalidRequestError(f"model {spec.name!r} does not support speed", param="speed")
    rate = int(getattr(loaded.model.config, "sampling_rate", 16000))
    waves = []
    started = time.monotonic()
    for piece in split_text(params.text, max_chars_per_call):
        if params.cancelled is not None and params.cancelled.is_set():
            break
        if waves and time.monotonic() - started > spec.generation_timeout_s:
            raise ServiceUnavailableError(
                f"synthesis took longer than generation_timeout_s={spec.generation_timeout_s:g} s of model {spec.name!r}; "
                "send shorter text (or raise generation_timeout_s)", code="timeout")
        inputs = loaded.processor(text=piece, return_tensors="pt")
        if inputs["input_ids"].shape[-1] == 0:  # nothing pronounceable in this piece (e.g. only symbols)
            continue
        with loaded.active() as model, torch.inference_mode():
            torch.manual_seed(SEED)
            output = model(**inputs.to(loaded.model.device), **kwargs)
        waveform = output.waveform if hasattr(output, "waveform") else output[0]
        waves.append(waveform[0].float().cpu().numpy().astype(np.float32))
    if not waves:  # VITS raises an opaque RuntimeError on empty input
        raise InvalidRequestError(
            "input has no characters this voice can pronounce (after normalisation it is empty)", param="input"
        )
    return SpeechResult(np.concatenate(waves), rate)
