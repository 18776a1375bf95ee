"""The TTS deployment: text-to-waveform models (VITS / MMS-TTS and kin)."""

from __future__ import annotations

from typing import ClassVar

from loading import ModelSpec

from .admission import speech_request_bytes
from .family_server import FamilyServer
from .options import SpeechOptions
from .params import SpeechParams, SpeechResult


class TTSServer(FamilyServer):
    Options: ClassVar[type[SpeechOptions]] = SpeechOptions

    def __init__(self, specs: list[ModelSpec], options: SpeechOptions):
        super().__init__(specs, options)

    async def synthesize(self, params: SpeechParams) -> SpeechResult:
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        from . import synthesis  # torch side, imported on first use (loaded with the model by then)

        need = speech_request_bytes(loaded.config, min(len(params.text), self.options.max_chars_per_call))
        async with self.memory.hold(need, "this text", param="input"):
            return await self._until_cancelled(params, self._infer(
                synthesis.synthesize, spec, loaded, params, self.options.max_chars_per_call))
