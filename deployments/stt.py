"""The STT deployment: speech-to-text with sequence-to-sequence models (Whisper and kin).

Requests are batched: each request's audio is cut into 30 s chunks, the chunks of every request
in the batch go through one generate call, and each request gets its text back with one
segment per chunk.
"""

from __future__ import annotations

from typing import Any

from .batching import Batcher
from .family_server import FamilyServer, raise_if_error
from .params import TranscribeParams, TranscribeResult


class STTServer(FamilyServer):
    def __init__(self, models: list[dict], max_batch_size: int = 8, batch_wait_timeout_s: float = 0.0,
                 max_loaded_models: int = 4):
        super().__init__(models, max_loaded_models)
        self._transcribe_batch = Batcher(self._transcribe_batch_call, max_batch_size, batch_wait_timeout_s)

    async def transcribe(self, params: TranscribeParams) -> TranscribeResult:
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        params.model = spec.name
        _transcription().validate(spec, loaded, params)  # a 400 for this request, not a failed batch
        return raise_if_error(await self._transcribe_batch(params))

    async def _transcribe_batch_call(self, batch: list[TranscribeParams]) -> list[Any]:
        return await self._run_groups(
            batch, TranscribeParams.batch_key,
            lambda spec, loaded, items: _transcription().transcribe_batch(spec, loaded, items),
        )


def _transcription():
    """The torch side, imported on first use (the model, and torch with it, is loaded by then)."""
    from . import transcription

    return transcription
