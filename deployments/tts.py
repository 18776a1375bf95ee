"""The TTS deployment: text-to-waveform models (VITS / MMS-TTS and kin)."""

from __future__ import annotations

import numpy as np
import torch

from loading import LoadedModel, ModelSpec

from .errors import InvalidRequestError
from .family_server import FamilyServer
from .params import SpeechParams, SpeechResult

# VITS samples its durations: a fixed seed per request makes the same text give the same audio.
SEED = 0


class TTSServer(FamilyServer):
    async def synthesize(self, params: SpeechParams) -> SpeechResult:
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        return await self._infer(synthesize, spec, loaded, params)


def synthesize(spec: ModelSpec, loaded: LoadedModel, params: SpeechParams) -> SpeechResult:
    inputs = loaded.processor(text=params.text, return_tensors="pt")
    if inputs["input_ids"].shape[-1] == 0:  # VITS raises an opaque RuntimeError on empty input
        raise InvalidRequestError(
            "input has no characters this voice can pronounce (after normalisation it is empty)", param="input"
        )
    inputs = inputs.to(loaded.model.device)
    kwargs = {}
    if "speaking_rate" in loaded.model.forward.__code__.co_varnames:
        kwargs["speaking_rate"] = params.speed
    elif params.speed != 1.0:
        raise InvalidRequestError(f"model {spec.name!r} does not support speed", param="speed")
    with torch.inference_mode():
        torch.manual_seed(SEED)
        output = loaded.model(**inputs, **kwargs)
    waveform = output.waveform if hasattr(output, "waveform") else output[0]
    samples = waveform[0].float().cpu().numpy().astype(np.float32)
    rate = int(getattr(loaded.model.config, "sampling_rate", 16000))
    return SpeechResult(samples, rate)
