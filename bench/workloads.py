"""The fixed requests every server gets: the same bodies for ours and for each peer."""

from __future__ import annotations

import base64
import io
import itertools
from collections.abc import Iterator

import numpy as np

from .load import Request

PROMPT = "Summarize the benefits of batching requests for a language model server in one sentence."
SPEECH_TEXT = "hello world, this is a short benchmark sentence."
AUDIO_SECONDS = 1.0
AUDIO_RATE = 16000


def chat_body(model: str, max_tokens: int, stream: bool = False, request: int | None = None) -> dict:
    """`request`: the load's request number, which starts the user message (`Request 17: ...`). Every
    request then shares the chat template's system turn with the others but not its question, as an
    app's users do; without it, servers that reuse a stored prompt prefix (ours does) would skip
    nearly the whole prompt of a workload no user sends."""
    content = PROMPT if request is None else f"Request {request}: {PROMPT}"
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}
    if stream:
        body["stream"] = True
    return body


def chat(model: str, max_tokens: int, stream: bool = False, request: int | None = None) -> Request:
    return Request("/v1/chat/completions", json=chat_body(model, max_tokens, stream, request), stream=stream)


# bench/overhead.py's chats are numbered from here on both sides (HTTP and in-process): apart from the
# throughput sweeps' numbers (from 0, on every server), and with as many digits on both sides
OVERHEAD_NUMBERS = 10**6

# (url, first number) -> the next request numbers of the server listening there (see request_numbers)
_NUMBERS: dict[tuple[str, int], Iterator[int]] = {}


def request_numbers(url: str, start: int = 0) -> Iterator[int]:
    """The running count of the numbered chats (chat_body's `request`) sent to the server at `url`: every
    load draws its numbers from it, so warm-ups, concurrency levels, plain and streamed sweeps, phases and
    rounds each ask questions that server has not been asked (a load numbered from 0 again would resend
    questions whose prompts a prefix cache still holds, ours does). bench/servers.py starts the count
    again (`new_server`) when a server starts at that url: every server measured gets the same questions.
    `start`: a band of numbers of its own (bench/overhead.py's from OVERHEAD_NUMBERS), so that one
    workload run on only some servers leaves the others' numbering, and prompt lengths, alike."""
    return _NUMBERS.setdefault((url.rstrip("/"), start), itertools.count(start))


def new_server(url: str) -> None:
    """A server (with empty caches) starts at `url`: its request numbers start again."""
    for key in [key for key in _NUMBERS if key[0] == url.rstrip("/")]:
        del _NUMBERS[key]


def numbered_chat(url: str, model: str, max_tokens: int, stream: bool = False):
    """A load's request factory (`make(i)`) of chats numbered from the server's running count, not from i."""
    numbers = request_numbers(url)
    return lambda i: chat(model, max_tokens, stream=stream, request=next(numbers))


def image_chat(model: str, max_tokens: int) -> Request:
    """A chat about a small PNG sent as a data URI (the server fetches nothing from the network)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": url}}]
    return Request("/v1/chat/completions", json={"model": model, "max_tokens": max_tokens, "temperature": 0,
                                                 "messages": [{"role": "user", "content": content}]})


def wav_bytes(seconds: float = AUDIO_SECONDS, rate: int = AUDIO_RATE) -> bytes:
    """A deterministic tone with a little noise, as a 16-bit WAV file."""
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def transcription(model: str, audio: bytes) -> Request:
    return Request("/v1/audio/transcriptions", form={"model": model, "response_format": "json"},
                   files={"file": ("audio.wav", audio, "audio/wav")})


def speech(model: str) -> Request:
    return Request("/v1/audio/speech", json={"model": model, "input": SPEECH_TEXT, "response_format": "wav"})
