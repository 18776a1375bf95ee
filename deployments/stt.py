"""The STT deployment: speech-to-text with sequence-to-sequence models (Whisper and kin).

Long audio is cut at silences (deployments/vad.py: pieces of at most 30 s, so no word is split at a
cut). Requests are batched: the pieces of every request in the batch go through the model a bounded
number at a time; each request gets its text back with one segment per piece. A streamed request
sends its pieces through the same batches one window at a time and yields each piece's text as soon
as it and those before it are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import numpy as np

from loading import ModelSpec

from .admission import FLOAT_BYTES, settle, to_thread_held, transcription_request_bytes
from .audio import resample
from .batching import Batcher
from .family_server import FamilyServer, cancelled, raise_if_error
from .options import TranscriptionOptions
from .params import TranscribeParams, TranscribeResult


class STTServer(FamilyServer):
    Options: ClassVar[type[TranscriptionOptions]] = TranscriptionOptions
    options: TranscriptionOptions

    def __init__(self, specs: list[ModelSpec], options: TranscriptionOptions):
        super().__init__(specs, options)
        self.batch_stats.update(fallback_decodes=0, silent_pieces=0)  # the temperature fallback's work, in /health
        self._transcribe_batch: Batcher[TranscribeParams] = Batcher(self._transcribe_batch_call, options.max_batch_size,
                                         options.batch_wait_timeout_s, abandoned=cancelled)

    @contextlib.asynccontextmanager
    async def _admitted(self, params: TranscribeParams) -> AsyncIterator[Any]:
        """Checks that fail this request alone (4xx), then holds the working memory it may need for the
        block; yields the loaded model."""
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        params.model, params.served = spec.name, (spec, loaded)
        _transcription().validate(spec, loaded, params)  # a 400 for this request, not a failed batch
        # The samples came with the request: held from here on, so the audio of a request that waits for
        # the rest of its estimate stays counted.
        async with self.memory.hold(len(params.audio) * FLOAT_BYTES, "this audio", param="file") as held:
            rate = loaded.processor.feature_extractor.sampling_rate
            if params.sample_rate != rate:
                audio = np.asarray(params.audio, dtype=np.float32)
                params.audio = await to_thread_held(resample, audio, params.sample_rate, rate)
                params.sample_rate = rate
            need = transcription_request_bytes(loaded.config, len(params.audio), self.options.max_chunks_per_call)
            await held.grow(need, "this audio", param="file")
            yield loaded

    async def check_language(self, model: str, language: str) -> None:
        """400 on `language` if the model cannot transcribe in it, as a transcription would answer (Realtime's
        session.update asks before its turns need it). Needs the model loaded: a loading model's 503 passes."""
        spec, loaded = await self.pool.get(model, 0)
        _transcription().check_language(spec, loaded, language)

    async def transcribe(self, params: TranscribeParams) -> TranscribeResult:
        with self._observed(params) as params.running:
            async with self._admitted(params):
                # the cuts are found off the inference thread (onnxruntime releases the GIL)
                params.cuts = await to_thread_held(_transcription().plan, np.asarray(params.audio, dtype=np.float32),
                                                   params.sample_rate, params.vad)
                return raise_if_error(await self._until_cancelled(params, self._transcribe_batch(params)))

    async def transcribe_stream(self, params: TranscribeParams) -> AsyncIterator[dict]:
        """Yields {"segment": Segment, "words": [Word]} per piece of the audio, in order, then
        {"result": TranscribeResult}. The cuts are found as the scan goes, the first piece goes alone
        (the first text comes after one model call), the rest up to max_chunks_per_call at a time."""
        with self._observed(params) as params.running:
            async for item in self._transcribe_stream(params):
                yield item

    async def _transcribe_stream(self, params: TranscribeParams) -> AsyncIterator[dict]:
        async with self._admitted(params):
            transcription = _transcription()
            audio = np.asarray(params.audio, dtype=np.float32)
            rate = params.sample_rate
            planner = transcription.ChunkPlanner(resample(audio, rate, 16000) if rate != 16000 else audio,
                                                 params.vad, transcription.CHUNK_S)
            cuts = planner.cuts()
            scale = rate / 16000
            language = params.language
            window: deque[asyncio.Future] = deque()
            segments, words, texts, index = [], [], [], 0
            redecoded = silent = prompted = 0
            params.cancelled = params.cancelled or threading.Event()  # its pieces': a cancel counts once

            async def next_cut() -> tuple[int, int] | None:
                cut = await to_thread_held(next, cuts, None)
                return None if cut is None else (int(cut[0] * scale), int(cut[1] * scale))

            def submit(begin: int, end: int) -> asyncio.Future:
                # the first piece goes alone and, with no language given, finds the one every later piece uses
                piece = dataclasses.replace(params, audio=audio[begin:end], language=language,
                                            detect_language=language is None)
                piece.cuts, piece.offset_s, piece.cancelled = [(0, end - begin)], begin / rate, params.cancelled
                piece.running = params.running
                return asyncio.ensure_future(self._until_cancelled(piece, self._transcribe_batch(piece)))

            try:
                cut = await next_cut()
                while cut is not None or window:
                    while cut is not None and len(window) < (1 if index == 0 else self.options.max_chunks_per_call):
                        window.append(submit(*cut))
                        cut = await next_cut()
                    piece_result: TranscribeResult = raise_if_error(await window.popleft())
                    for segment in piece_result.segments:
                        segment.id = index
                        index += 1
                        segments.append(segment)
                        texts.append(segment.text)
                        yield {"segment": segment, "words": piece_result.words}
                    words += piece_result.words
                    redecoded, silent = redecoded + piece_result.fallback_decodes, silent + piece_result.silent_pieces
                    prompted = piece_result.prompt_tokens  # one prompt, read by every piece: counted once
                    language = language or piece_result.language
            finally:
                for future in window:
                    future.cancel()
                for future in window:  # each piece's memory stays held until its model call lets go of it
                    await settle(future)
        yield {"result": TranscribeResult(" ".join(t for t in texts if t).strip(), language,
                                          round(len(audio) / rate, 3), segments, words,
                                          _transcription().language_name(language), redecoded, silent, prompted)}

    async def _transcribe_batch_call(self, batch: list[TranscribeParams]) -> list[Any]:
        chunks, fallback = self.options.max_chunks_per_call, self.options.fallback()
        started = time.monotonic()
        results = await self._run_groups(
            batch, TranscribeParams.batch_key,
            lambda spec, loaded, items: _transcription().transcribe_batch(spec, loaded, items, chunks, fallback),
        )
        spent = (time.monotonic() - started) / max(1, len(batch))  # each request's share of the calls
        for params, result in zip(batch, results, strict=True):
            if not isinstance(result, BaseException):
                self.batch_stats["fallback_decodes"] += result.fallback_decodes
                self.batch_stats["silent_pieces"] += result.silent_pieces
                self.metrics.audio(params.model, False, len(params.audio) / params.sample_rate, spent)
        return results


def _transcription():
    """The torch side, imported on first use (the model, and torch with it, is loaded by then)."""
    from . import transcription

    return transcription
