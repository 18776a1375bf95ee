"""The TTS deployment: text-to-waveform models (VITS / MMS-TTS and kin)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, ClassVar, TypeVar

import numpy as np

from loading import ModelSpec

from .admission import speech_request_bytes
from .family_server import FamilyServer
from .options import SpeechOptions
from .params import SpeechParams, SpeechResult
from .text_split import stream_pieces

T = TypeVar("T")


class TTSServer(FamilyServer):
    Options: ClassVar[type[SpeechOptions]] = SpeechOptions
    options: SpeechOptions

    def __init__(self, specs: list[ModelSpec], options: SpeechOptions):
        super().__init__(specs, options)

    async def synthesize(self, params: SpeechParams) -> SpeechResult:
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        from . import synthesis  # torch side, imported on first use (loaded with the model by then)

        need = speech_request_bytes(loaded.config, min(len(params.text), self.options.max_chars_per_call), params.speed)
        with self._observed(params) as running:
            async with self.memory.hold(need, "this text", param="input"):
                self.batch_stats["requests"] += 1
                started = time.monotonic()
                result = await self._until_cancelled(params, self._infer_model(
                    loaded, _running_from_start(running, synthesis.synthesize), spec, loaded, params,
                    self.options.max_chars_per_call))
        self._count(spec.name, result, time.monotonic() - started)
        return result

    async def check_speed(self, model: str, speed: float) -> None:
        """400 on `speed` if the model speaks at one speed only, as a synthesis would answer (Realtime's
        session.update asks before its responses need it). Needs the model loaded: a loading model's 503 passes."""
        spec, loaded = await self.pool.get(model, 0)
        from . import synthesis

        synthesis.check_speed(spec, loaded, speed)

    async def silence(self, params: SpeechParams, seconds: float = 0.3) -> SpeechResult:
        """`seconds` of silence at the model's rate: the voice round trip's answer to a reply with nothing
        speakable. Not synthesized: a voice whose vocabulary has no punctuation (MMS-TTS) pronounces
        nothing of "...", and the round trip failed with a 400 on an `input` the form does not have."""
        _, loaded = await self.pool.get(params.model, params.wait_s)
        from . import synthesis

        rate = synthesis.sample_rate(loaded)
        return SpeechResult(np.zeros(int(rate * seconds), dtype=np.float32), rate)

    def _count(self, model: str, result: SpeechResult, seconds: float) -> None:
        """One model call (a whole text, or a streamed piece), in /health's batching figures and the metrics."""
        self.batch_stats["model_calls"] += 1
        self.batch_stats["largest_batch"] = 1  # one request per call
        self.metrics.batch(model, 1)
        self.metrics.audio(model, True, len(result.waveform) / result.sample_rate, seconds)

    async def synthesize_stream(self, params: SpeechParams) -> AsyncGenerator[SpeechResult, None]:
        """The text sentence by sentence (the first cut at a clause if long), one model call each, each
        piece's audio yielded as soon as it is made. The inference thread is released between pieces,
        so concurrent streams take turns instead of one long text holding the model. Errors (speed,
        nothing pronounceable) come before the first piece; a cancelled stream (client gone, barge-in)
        stops before its next piece. generation_timeout_s bounds each model call here, not the whole
        stream: streams taking turns on one replica would all run out together (bench/HOSTILE.md). As in
        `synthesize`, it is checked before a piece and ends the speech there: audio made is never thrown
        away, and a client's streamed file is never cut off mid-way by an error."""
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        from . import synthesis

        kwargs = synthesis.model_kwargs(spec, loaded, params)
        pieces = stream_pieces(params.text, self.options.max_chars_per_call)
        need = speech_request_bytes(loaded.config, max((len(p) for p in pieces), default=1), params.speed)
        with self._observed(params) as running:
            async with self.memory.hold(need, "this text", param="input"):
                self.batch_stats["requests"] += 1
                spoken, started = 0, time.monotonic()
                synthesize_piece = _running_from_start(running, synthesis.synthesize_piece)
                for index, piece in enumerate(pieces):
                    if index and synthesis.past_timeout(spec, started, len(pieces) - index):
                        break  # the last model call took longer than its bound: the speech ends there
                    started = time.monotonic()
                    work = self._infer_model(loaded, synthesize_piece, loaded, piece, kwargs)
                    result = await self._until_cancelled(params, work)
                    if result is not None:
                        self._count(spec.name, result, time.monotonic() - started)
                        spoken += 1
                        yield result
                if not spoken:
                    raise synthesis.nothing_to_say()


def _running_from_start(running: Callable[[], None], fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` for the inference thread, counting its request as running (metrics) once the call starts: one
    waiting for the thread behind others' syntheses (up to max_ongoing_requests, 80) is queued. Counted running
    from its memory hold on, 20 requests of which one computed showed queue_depth 0, running_requests 20."""

    def call(*args: Any) -> T:
        running()
        return fn(*args)

    return call
