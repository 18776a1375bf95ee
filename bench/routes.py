"""Section 5: every route of the app, one request at a time, on the demo's tiny models.

Not a comparison: the latency a client sees per route on this machine, so that a change that
slows one route shows up here. Chat routes generate up to `max_tokens` tokens (greedy).
"""

from __future__ import annotations

from . import workloads
from .load import Request, percentile, sequential


def routes(max_tokens: int) -> dict[str, Request]:
    audio = workloads.wav_bytes()
    wav = ("audio.wav", audio, "audio/wav")
    return {
        "GET /health": Request("/health", method="GET"),
        "GET /v1/models": Request("/v1/models", method="GET"),
        f"chat, LLM (max_tokens={max_tokens})": workloads.chat("tiny-llm", max_tokens),
        f"chat, LLM streamed (max_tokens={max_tokens})": workloads.chat("tiny-llm", max_tokens, stream=True),
        f"chat, LLM + LoRA adapter (max_tokens={max_tokens})": workloads.chat("tiny-llm-lora", max_tokens),
        f"chat, VLM with a PNG (max_tokens={max_tokens})": workloads.image_chat("tiny-llava", max_tokens),
        "transcription (1 s WAV)": workloads.transcription("tiny-whisper", audio),
        "speech (short, WAV)": workloads.speech("tiny-vits"),
        f"voice round trip /v1/audio/chat (1 s WAV, max_tokens={max_tokens})": Request(
            "/v1/audio/chat", form={"max_tokens": str(max_tokens), "temperature": "0"}, files={"file": wav}),
        "legacy POST /generate": Request("/generate", json={"query": workloads.PROMPT, "max_new_tokens": max_tokens}),
        "legacy POST /stt": Request("/stt", files={"audio": wav}),
        "legacy POST /tts": Request("/tts", json={"text": workloads.SPEECH_TEXT}),
    }


def measure(url: str, n: int, max_tokens: int) -> dict[str, dict]:
    out = {}
    for name, request in routes(max_tokens).items():
        samples = sequential(url, lambda i, r=request: r, n)
        good = [s.latency_s * 1000 for s in samples if s.ok]
        ttft = [s.ttft_s * 1000 for s in samples if s.ok and s.ttft_s is not None]
        errors = [s.error for s in samples if not s.ok]
        out[name] = {"n": len(samples), "errors": len(errors), "first_error": errors[0][:300] if errors else "",
                     "p50_ms": percentile(good, 0.5), "p99_ms": percentile(good, 0.99),
                     "ttft_p50_ms": percentile(ttft, 0.5)}
    return out
