"""Text-to-waveform synthesis (the torch side of the TTS deployment)."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from loading import LoadedModel, ModelSpec

from .errors import InvalidRequestError
from .params import SpeechParams, SpeechResult

# VITS samples its durations: a fixed seed per request makes the same text give the same audio.
SEED = 0


def synthesize(spec: ModelSpec, loaded: LoadedModel, params: SpeechParams) -> SpeechResult:
    inputs = loaded.processor(text=params.text, return_tensors="pt")
    if inputs["input_ids"].shape[-1] == 0:  # VITS raises an opaque RuntimeError on empty input
        raise InvalidRequestError(
            "input has no characters this voice can pronounce (after normalisation it is empty)", param="input"
        )
    inputs = inputs.to(loaded.model.device)
    kwargs = {}
    if "speaking_rate" in inspect.signature(loaded.model.forward).parameters:
        kwargs["speaking_rate"] = params.speed
    elif params.speed != 1.0:
        raise InvalidRequestError(f"model {spec.name!r} does not support speed", param="speed")
    with loaded.active() as model, torch.inference_mode():
        torch.manual_seed(SEED)
        output = model(**inputs, **kwargs)
    waveform = output.waveform if hasattr(output, "waveform") else output[0]
    samples = waveform[0].float().cpu().numpy().astype(np.float32)
    rate = int(getattr(loaded.model.config, "sampling_rate", 16000))
    return SpeechResult(samples, rate)
