"""The STT deployment: speech-to-text with sequence-to-sequence models (Whisper and kin).

Requests are batched: each request's audio is cut into 30 s chunks, and the chunks of every
request in the batch go through the model a bounded number at a time; each request gets its text
back with one segment per chunk.
"""

from __future__ import annotations

from typing import Any, ClassVar

from loading import ModelSpec

from .admission import transcription_request_bytes
from .batching import Batcher
from .family_server import FamilyServer, raise_if_error
from .options import TranscriptionOptions
from .params import TranscribeParams, TranscribeResult


class STTServer(FamilyServer):
    Options: ClassVar[type[TranscriptionOptions]] = TranscriptionOptions

    def __init__(self, specs: list[ModelSpec], options: TranscriptionOptions):
        super().__init__(specs, options)
        self._transcribe_batch = Batcher(self._transcribe_batch_call, options.max_batch_size, options.batch_wait_timeout_s)

    async def transcribe(self, params: TranscribeParams) -> TranscribeResult:
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        params.model = spec.name
        _transcription().validate(spec, loaded, params)  # a 400 for this request, not a failed batch
        need = transcription_request_bytes(loaded.config, len(params.audio), self.options.max_chunks_per_call)
        async with self.memory.hold(need, "this audio", param="file"):
            return raise_if_error(await self._until_cancelled(params, self._transcribe_batch(params)))

    async def _transcribe_batch_call(self, batch: list[TranscribeParams]) -> list[Any]:
        chunks = self.options.max_chunks_per_call
        return await self._run_groups(
            batch, TranscribeParams.batch_key,
            lambda spec, loaded, items: _transcription().transcribe_batch(spec, loaded, items, chunks),
        )


def _transcription():
    """The torch side, imported on first use (the model, and torch with it, is loaded by then)."""
    from . import transcription

    return transcription
