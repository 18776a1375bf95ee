"""The same work the family replicas do, called directly in this process on the loaded model.

This is the baseline of the overhead section: the replica-side functions (generation,
transcription, synthesis) with no HTTP, no proxy, no handles. Torch uses one thread, as Ray gives
a replica with num_cpus < 1 (OMP_NUM_THREADS=1).

A chat is computed as the LLM replica computes it (deployments/chat_server.py): the decode loop with
the replica's options (max_batch_size, prefix_cache_mb, batch_length_ratio), its prefix cache kept
from call to call, or generate_batch for a model the decode loop does not run. Each call asks its
own question (workloads.chat_body's request number), as the HTTP side does.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

from .workloads import OVERHEAD_NUMBERS, SPEECH_TEXT, chat_body


class InProcess:
    def __init__(self, dirs: dict[str, Path], max_new_tokens: int = 64, chat_options: dict | None = None):
        """`chat_options`: the LLM family's options the replica runs with (serve config's
        args.families.llm); ChatOptions' defaults without them."""
        import torch

        from deployments.options import ChatOptions
        from loading import ModelSpec, load_model

        torch.set_num_threads(1)
        self.chat_options = ChatOptions(**(chat_options or {}))
        self._decoder = None  # the DecodeLoop, made on first chat (its prefix cache lives as long as it)
        # the chats' request numbers (never one twice to the same cache), as the HTTP side's of the overhead
        self._numbers = itertools.count(OVERHEAD_NUMBERS)
        self.specs = {
            "llm": ModelSpec(name="tiny-llm", source=str(dirs["llm"]), family="llm", max_new_tokens=max_new_tokens),
            "stt": ModelSpec(name="tiny-whisper", source=str(dirs["stt"]), family="stt", max_new_tokens=32),
            "tts": ModelSpec(name="tiny-vits", source=str(dirs["tts"]), family="tts"),
        }
        self.loaded = {family: load_model(spec) for family, spec in self.specs.items()}

    def chat(self, max_tokens: int) -> Callable[[], object]:
        """A call computing one chat as the replica does, each call a question this object has not asked."""
        from deployments.chat_server import uses_decode_loop
        from deployments.generation import generate_batch
        from deployments.llm import LLMServer
        from deployments.params import ChatParams

        spec, loaded = self.specs["llm"], self.loaded["llm"]
        if uses_decode_loop(loaded) and self._decoder is None:
            from deployments.decode_loop import DecodeLoop

            self._decoder = DecodeLoop.for_options(self.chat_options,
                                                   {"model_calls": 0, "requests": 0, "largest_batch": 0})

        def call():
            body = chat_body(spec.name, max_tokens, request=next(self._numbers))
            params = ChatParams(model=spec.name, messages=body["messages"], max_new_tokens=max_tokens, temperature=0)
            params.inputs = LLMServer.encode(None, loaded, params)  # type: ignore[arg-type]
            if self._decoder is None:
                return generate_batch(spec, loaded, [params])
            results: list = []
            self._decoder.submit(spec, loaded, params, results.append)
            self._decoder.run()
            if isinstance(results[0], BaseException):
                raise results[0]
            return results[0]

        return call

    def transcribe(self, audio: bytes) -> Callable[[], object]:
        from deployments.audio import decode_audio
        from deployments.params import TranscribeParams
        from deployments.transcription import transcribe_batch

        spec, loaded = self.specs["stt"], self.loaded["stt"]

        def call():  # decoding the upload is model-side work too: it counts on both sides
            samples, rate = decode_audio(audio)
            return transcribe_batch(spec, loaded, [TranscribeParams(model=spec.name, audio=samples, sample_rate=rate)])

        return call

    def synthesize(self) -> Callable[[], object]:
        from deployments.audio import encode_audio_with_rate
        from deployments.params import SpeechParams
        from deployments.synthesis import synthesize

        spec, loaded = self.specs["tts"], self.loaded["tts"]

        def call():  # encoding the WAV counts on both sides
            result = synthesize(spec, loaded, SpeechParams(model=spec.name, text=SPEECH_TEXT))
            return encode_audio_with_rate(result.waveform, result.sample_rate, "wav")

        return call


def time_calls(fn: Callable[[], object], n: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out
