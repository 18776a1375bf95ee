"""The TTS deployment: text-to-waveform models (VITS / MMS-TTS and kin)."""

from __future__ import annotations

from .family_server import FamilyServer
from .params import SpeechParams, SpeechResult


class TTSServer(FamilyServer):
    async def synthesize(self, params: SpeechParams) -> SpeechResult:
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        from . import synthesis  # torch side, imported on first use (loaded with the model by then)

        return await self._infer(synthesis.synthesize, spec, loaded, params)
