"""The same work the family replicas do, called directly in this process on the loaded model.

This is the baseline of the overhead section: the replica-side functions (generation,
transcription, synthesis) with no HTTP, no proxy, no handles. Torch uses one thread, as Ray gives
a replica with num_cpus < 1 (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .workloads import PROMPT, SPEECH_TEXT


class InProcess:
    def __init__(self, dirs: dict[str, Path], max_new_tokens: int = 64):
        import torch

        from loading import ModelSpec, load_model

        torch.set_num_threads(1)
        self.specs = {
            "llm": ModelSpec(name="tiny-llm", source=str(dirs["llm"]), family="llm", max_new_tokens=max_new_tokens),
            "stt": ModelSpec(name="tiny-whisper", source=str(dirs["stt"]), family="stt", max_new_tokens=32),
            "tts": ModelSpec(name="tiny-vits", source=str(dirs["tts"]), family="tts"),
        }
        self.loaded = {family: load_model(spec) for family, spec in self.specs.items()}

    def chat(self, max_tokens: int) -> Callable[[], object]:
        from deployments.generation import generate_batch
        from deployments.llm import LLMServer
        from deployments.params import ChatParams

        spec, loaded = self.specs["llm"], self.loaded["llm"]

        def call():
            params = ChatParams(model=spec.name, messages=[{"role": "user", "content": PROMPT}],
                                max_new_tokens=max_tokens, temperature=0)
            params.inputs = LLMServer.encode(None, loaded, params)
            return generate_batch(spec, loaded, [params])

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
