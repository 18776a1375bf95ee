"""Hostile input against a live `serve run serve_config.yaml`: every case a clear 4xx within seconds,
and afterwards every family still answers and no replica was replaced (same pids).

Before the request guard, one 50 MB chat body or one 2 MB prompt grew the LLM replica to ~20 GB and
Ray's memory monitor killed every worker on the node (shared/FACTS.md, "Hostile input").
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import signal
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import pytest
import requests
import soundfile as sf
from PIL import Image

import live_server
from serve_testutil import png_data_uri, wav_bytes

MB = 2**20
CHAT = "/v1/chat/completions"
SPEECH = "/v1/audio/speech"
STT = "/v1/audio/transcriptions"
VOICE = "/v1/audio/chat"


@dataclass
class Case:
    name: str
    path: str
    status: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    param: str | None = None  # expected error.param (None: not checked)
    code: str | None = None  # expected error.code (None: not checked)
    method: str = "POST"
    mentions: str | None = None  # a word the message must contain (the limit's name, say)


def chat(content: Any = "hi", model: str = "tiny-llm", **extra) -> dict:
    return {"json": {"model": model, "messages": [{"role": "user", "content": content}], **extra}}


def image_chat(url: str, model: str = "tiny-llava", count: int = 1) -> dict:
    parts = [{"type": "text", "text": "what is this?"}] + [
        {"type": "image_url", "image_url": {"url": url}} for _ in range(count)]
    return chat(parts, model=model)


def raw_json(text: str | bytes) -> dict:
    return {"data": text, "headers": {"content-type": "application/json"}}


def png_uri(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG", optimize=True)  # compresses to a few kB
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def audio_bytes(seconds: float, rate: int = 16000, channels: int = 1, fmt: str = "WAV", silent: bool = False) -> bytes:
    """A tone, or silence written block by block (a long silent multi-channel FLAC is a few kB)."""
    frames = int(seconds * rate)
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", rate, channels, format=fmt, subtype="PCM_16") as f:
        block = 1 << 16
        for start in range(0, frames, block):
            n = min(block, frames - start)
            t = (start + np.arange(n)) / rate
            tone = np.zeros(n, np.float32) if silent else (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
            f.write(np.tile(tone[:, None], (1, channels)))
    return buffer.getvalue()


def stt(data: bytes | None = None, model: str = "tiny-whisper", **fields) -> dict:
    files = {"file": ("a.wav", data)} if data is not None else None
    return {"files": files, "data": {"model": model, **fields}}


def voice(data: bytes | None = None, **fields) -> dict:
    return {"files": {"file": ("a.wav", data)} if data is not None else None, "data": fields}


def crafted_dds() -> bytes:
    """A 16x16 DDS whose pixel-format flags (offset 80) name no format: Pillow's header read raises
    NotImplementedError."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "DDS")
    data = bytearray(buffer.getvalue())
    data[80:84] = (0x80).to_bytes(4, "little")
    return bytes(data)


def odd_charset_form(fields: dict[str, str], charset: str, audio: bytes) -> dict:
    """A multipart form whose Content-Type names `charset`: Starlette decodes the text parts with it, and
    unicode_escape or utf-7 turn `\\ud800` into a lone surrogate."""
    boundary = "hostileBoundary"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                    for name, value in fields.items())
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
             "Content-Type: audio/wav\r\n\r\n").encode() + audio + f"\r\n--{boundary}--\r\n".encode()
    return {"data": body, "headers": {"content-type": f"multipart/form-data; boundary={boundary}; charset={charset}"}}


def big_body(size: int) -> bytes:
    return b'{"model": "tiny-llm", "messages": [{"role": "user", "content": "' + b"a" * size + b'"}]}'


def chunked(data: bytes, piece: int = MB):
    for i in range(0, len(data), piece):
        yield data[i:i + piece]


def av_audio(container: str, codec: str, seconds: float = 1.0, rate: int = 48000) -> bytes:
    """A tone as PyAV (ffmpeg) writes it: WebM/Opus as Chrome records, MP4/AAC as Safari does."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        tone = 0.2 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * rate)) / rate)
        frame = av.AudioFrame.from_ndarray(tone[None].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def corpus() -> list[Case]:
    short = wav_bytes(0.5)
    webm, m4a = av_audio("webm", "libopus"), av_audio("mp4", "aac", rate=44100)
    return [
        # -- sizes: the two that took the whole node down, and their kin
        Case("50 MB chat body (Content-Length)", CHAT, 413, {"data": big_body(50 * MB)}, mentions="max_json_body_bytes"),
        Case("50 MB chat body, chunked", CHAT, 413, {"data": chunked(big_body(50 * MB))}, mentions="max_json_body_bytes"),
        Case("2 MB prompt", CHAT, 400, chat("hello " * (2 * MB // 6)), "messages", "context_length_exceeded"),
        Case("prompt over the context, tokenized", CHAT, 400, chat("hello " * 600), "messages", "context_length_exceeded"),
        Case("prompt plus max_tokens over the context", CHAT, 400, chat("hello " * 220, max_tokens=64),
             "messages", "context_length_exceeded"),
        Case("50 MB speech body", SPEECH, 413, {"data": b'{"model": "tiny-vits", "input": "' + b"a" * 50 * MB + b'"}'}),
        Case("50 MB /generate body", "/generate", 413, {"data": b'{"query": "' + b"a" * 50 * MB + b'"}'}),
        Case("30 MB upload", STT, 413, stt(b"\0" * 30 * MB), mentions="max_upload_bytes"),
        Case("30 MB voice upload", VOICE, 413, voice(b"\0" * 30 * MB)),
        Case("2 MB /generate query", "/generate", 400, {"json": {"query": "hello " * (2 * MB // 6)}},
             "messages", "context_length_exceeded"),
        # -- JSON structure
        Case("100k nested arrays", CHAT, 400, raw_json("[" * 100_000 + "]" * 100_000), code="json_too_deep"),
        Case("40 nested objects in a field", CHAT, 400, chat(content="hi", metadata=json.loads(
            "{" + '"a": {' * 40 + "}" * 41)), code="json_too_deep", mentions="max_json_depth"),
        Case("5000-digit integer", CHAT, 400, raw_json('{"model": "tiny-llm", "max_tokens": ' + "9" * 5000 + "}")),
        Case("integer past 64 bits", CHAT, 400, chat(max_tokens=10**30), code="integer_out_of_range"),
        Case("seed past 64 bits", CHAT, 400, chat(seed=2**70), code="integer_out_of_range"),
        Case("lone surrogate in content", CHAT, 400, raw_json('{"model": "tiny-llm", "messages": [{"role": "user", '
                                                             '"content": "hi \\ud800 there"}]}'),
             "messages.0.content", "invalid_unicode"),
        Case("lone surrogate in a key", CHAT, 400, raw_json('{"\\udfff": 1}'), code="invalid_unicode"),
        Case("invalid UTF-8", CHAT, 400, raw_json(b'{"model": "\xff\xfe"}'), code="invalid_json"),
        Case("not JSON", CHAT, 400, raw_json("{not json")),
        Case("empty body", CHAT, 400, raw_json("")),
        Case("JSON array body", CHAT, 400, raw_json("[1, 2]")),
        Case("JSON string body", CHAT, 400, raw_json('"hello"')),
        # -- chat schema
        Case("message without content", CHAT, 400, {"json": {"model": "tiny-llm", "messages": [{"role": "user"}]}},
             "messages.0"),
        Case("no messages", CHAT, 400, {"json": {"model": "tiny-llm", "messages": []}}, "messages"),
        Case("messages not a list", CHAT, 400, {"json": {"model": "tiny-llm", "messages": "hi"}}, "messages"),
        Case("unknown role", CHAT, 400, {"json": {"model": "tiny-llm", "messages": [{"role": "god", "content": "x"}]}}),
        Case("unknown content part", CHAT, 400, chat([{"type": "video", "video": "x"}])),
        Case("no model", CHAT, 400, {"json": {"messages": [{"role": "user", "content": "x"}]}}, "model"),
        Case("unknown model", CHAT, 404, chat(model="gpt-5"), "model", "model_not_found"),
        Case("an STT model for chat", CHAT, 404, chat(model="tiny-whisper"), "model"),
        Case("max_tokens 0", CHAT, 400, chat(max_tokens=0), "max_tokens"),
        Case("max_tokens past the model's limit", CHAT, 400, chat(max_tokens=10_000), "max_tokens"),
        Case("temperature 5", CHAT, 400, chat(temperature=5), "temperature"),
        Case("top_p below 0", CHAT, 400, chat(top_p=-0.5), "top_p"),
        Case("5 stop strings", CHAT, 400, chat(stop=["a", "b", "c", "d", "e"]), "stop", mentions="max_stop_sequences"),
        Case("a 1000-char stop string", CHAT, 400, chat(stop=["x" * 1000]), "stop", mentions="max_stop_chars"),
        Case("an empty stop string", CHAT, 400, chat(stop=[""]), "stop.0"),
        Case("n=9 (past max_choices)", CHAT, 400, chat(n=9), "n", mentions="max_choices"),
        Case("1025 messages", CHAT, 400, {"json": {"model": "tiny-llm", "messages": [
            {"role": "user", "content": "x"}] * 1025}}, "messages", mentions="max_messages"),
        Case("stream with a bad request", CHAT, 400, chat(max_tokens=0, stream=True), "max_tokens"),
        Case("wait header not a number", CHAT, 400, {**chat(), "headers": {"x-wait-for-model": "soon"}},
             "x-wait-for-model"),
        # -- images
        Case("image sent to an LLM", CHAT, 400, image_chat(png_data_uri(), model="tiny-llm"), "messages"),
        Case("remote image URL", CHAT, 400, image_chat("https://example.com/a.png"), "messages.0.content.1.image_url"),
        Case("image data URI not base64", CHAT, 400, image_chat("data:image/png,abc"), "messages.0.content.1.image_url"),
        Case("image of garbage bytes", CHAT, 400, image_chat("data:image/png;base64,"
                                                              + base64.b64encode(b"garbage" * 100).decode()),
             "messages.0.content.1.image_url"),
        Case("10000x10000 image (a few kB)", CHAT, 413, image_chat(png_uri(10_000, 10_000)),
             "messages.0.content.1.image_url", "image_too_large", mentions="max_image_pixels"),
        Case("1x16777216 image (65 kB; upscaled by CLIP: ~5.6 billion pixels)", CHAT, 400,
             image_chat(png_uri(1, 16_777_216)), "messages.0.content.1.image_url", "image_aspect_ratio",
             mentions="max_image_aspect_ratio"),
        Case("image in a tool message", CHAT, 400, {"json": {"model": "tiny-llava", "messages": [
            {"role": "user", "content": "Look"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                   "function": {"name": "shot", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": [
                {"type": "image_url", "image_url": {"url": png_data_uri()}}]}]}}, "messages.2.content.0"),
        Case("9 images", CHAT, 413, image_chat(png_data_uri(), count=9), "messages", mentions="max_images"),
        Case("file:// outside allowed dirs", CHAT, 400, image_chat("file:///etc/passwd"),
             "messages.0.content.1.image_url"),
        Case("file:// with ..", CHAT, 400, image_chat("file:///tmp/../etc/passwd"), "messages.0.content.1.image_url"),
        # -- speech
        Case("speech input of 5000 chars", SPEECH, 400, {"json": {"model": "tiny-vits", "input": "a" * 5000}},
             "input", mentions="max_speech_input_chars"),
        Case("speech input blank", SPEECH, 400, {"json": {"model": "tiny-vits", "input": "  "}}, "input"),
        Case("speech format wma", SPEECH, 400, {"json": {"model": "tiny-vits", "input": "hi",
                                                         "response_format": "wma"}}, "response_format"),
        Case("speech speed 10", SPEECH, 400, {"json": {"model": "tiny-vits", "input": "hi", "speed": 10}}, "speed"),
        Case("speech with an LLM", SPEECH, 404, {"json": {"model": "tiny-llm", "input": "hi"}}, "model"),
        # -- transcriptions
        Case("no file", STT, 400, stt(), "file"),
        Case("file not audio", STT, 400, stt(b"not audio at all"), "file"),
        Case("empty file", STT, 400, stt(b""), "file"),
        Case("two files", STT, 400, {"files": [("file", ("a.wav", short)), ("file", ("b.wav", short))],
                                     "data": {"model": "tiny-whisper"}}, "file", "too_many_files"),
        Case("an extra part", STT, 400, stt(short, extra="x"), "extra"),
        Case("4 kHz audio", STT, 400, stt(audio_bytes(1, rate=4000)), "file", mentions="min_sample_rate"),
        Case("300 kHz audio", STT, 400, stt(audio_bytes(0.2, rate=300_000)), "file", mentions="max_sample_rate"),
        Case("16-channel audio", STT, 400, stt(audio_bytes(0.5, channels=16)), "file", mentions="max_audio_channels"),
        Case("12 min silent 8-channel FLAC (past the model's max_audio_seconds)", STT, 413,
             stt(audio_bytes(720, rate=16000, channels=8, fmt="FLAC", silent=True)), "file", "audio_too_long",
             mentions="max_audio_seconds"),
        Case("31 min of audio by an alias", STT, 413,
             stt(audio_bytes(1860, rate=8000, fmt="FLAC", silent=True), model="whisper-1"), "file", "audio_too_long"),
        Case("WebM: a MediaRecorder header, then garbage", STT, 400, stt(webm[:60] + b"\x00garbage" * 500), "file",
             "invalid_audio", mentions="WebM"),
        Case("M4A cut short (its index, the moov atom, is at the end)", STT, 400, stt(m4a[:len(m4a) // 2]), "file",
             "invalid_audio", mentions="moov"),
        Case("MP4 of AC-3 audio (a decoder not accepted)", STT, 400, stt(av_audio("mp4", "ac3")), "file",
             mentions="accepted codecs"),
        Case("4 MiB of random bytes behind an ADTS header (a 35-channel AAC frame: PyAV's conversion crashed)", STT,
             400, stt(b"\xff\xf1\x50\x80" + np.random.default_rng(1).integers(0, 256, 4 * MB, np.uint8).tobytes()),
             "file", "invalid_audio", mentions="35 channels"),
        Case("language not a code", STT, 400, stt(short, language="english"), "language"),
        Case("response_format docx", STT, 400, stt(short, response_format="docx"), "response_format"),
        Case("prompt of 40k chars", STT, 400, stt(short, prompt="a" * 40_000), "prompt"),
        Case("prompt spelling a special token", STT, 400, stt(short, prompt="<|en|> hello"), "prompt"),
        Case("temperature 2", STT, 400, stt(short, temperature=2), "temperature"),
        Case("unknown STT model", STT, 404, stt(short, model="nope"), "model"),
        Case("JSON to a multipart route", STT, 400, {"json": {"model": "tiny-whisper"}}),
        # -- voice round trip
        Case("voice: no file", VOICE, 400, {"data": {"response_format": "wav"}}, "file"),
        Case("voice: bad response_format", VOICE, 400, voice(short, response_format="wma"), "response_format"),
        Case("voice: 40k-char system prompt", VOICE, 400, voice(short, system_prompt="a" * 40_000), "system_prompt"),
        Case("voice: unknown llm_model", VOICE, 404, voice(short, llm_model="gpt-5"), "llm_model"),
        Case("voice: an LLM as tts_model", VOICE, 404, voice(short, tts_model="tiny-llm"), "tts_model"),
        Case("voice: max_tokens -1", VOICE, 400, voice(short, max_tokens=-1), "max_tokens"),
        Case("voice: 16-channel audio", VOICE, 400, voice(audio_bytes(0.5, channels=16)), "file"),
        Case("voice: an extra part", VOICE, 400, voice(short, model="tiny-llm"), "model"),
        # -- the seed servers' routes
        Case("/generate without query", "/generate", 400, {"json": {"system_prompt": "x"}}, "query"),
        Case("/generate max_new_tokens past the limit", "/generate", 400, {"json": {"query": "hi",
                                                                                   "max_new_tokens": 10_000}}),
        Case("/tts text of 5000 chars", "/tts", 400, {"json": {"text": "a" * 5000}}, "text"),
        Case("/tts empty text", "/tts", 400, {"json": {"text": ""}}, "text"),
        Case("/tts nothing pronounceable: the 400 names its own field", "/tts", 400, {"json": {"text": "🙂 ★"}},
             "text"),
        Case("/stt without audio", "/stt", 400, {"data": {"x": "y"}}),
        Case("/stt garbage", "/stt", 400, {"files": {"audio": ("a.wav", b"garbage")}}, "file"),
        Case("/stt 16-channel audio", "/stt", 400, {"files": {"audio": ("a.wav", audio_bytes(0.5, channels=16))}}),
        # -- routes and methods
        Case("GET on a POST route", CHAT, 405, method="GET"),
        Case("unknown route", "/v1/nothing", 404, {"json": {}}),
        # found by review (each was a 500 before)
        Case("file:// path with a NUL", CHAT, 400, image_chat("file:///tmp/a%00b"), "messages.0.content.1.image_url"),
        Case("crafted DDS header (Pillow raises NotImplementedError)", CHAT, 400,
             image_chat("data:image/png;base64," + base64.b64encode(crafted_dds()).decode()),
             "messages.0.content.1.image_url"),
        Case("logit_bias key '²' (isdigit, not int)", CHAT, 400, chat(logit_bias={"\u00b2": 5}), "logit_bias"),
        Case("lone surrogate, Content-Type Application/JSON", CHAT, 400, {
            "data": '{"model": "tiny-llm", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
            "headers": {"content-type": "Application/JSON"}}, code="invalid_unicode"),
        Case("completions token id past the vocabulary", "/v1/completions", 400,
             {"json": {"model": "tiny-llm", "prompt": [100_000], "max_tokens": 2}}, "prompt"),
        # ('<image>' in a VLM chat's text was a 400 here; it is text now: tests/deployments/test_vlm_inputs.py)
        Case("image in an assistant message", CHAT, 400, {"json": {"model": "tiny-llava", "messages": [
            {"role": "user", "content": "Draw"},
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": png_data_uri()}}]},
            {"role": "user", "content": "Again"}]}}, "messages.1.content.0"),
        # found by the HTTP-surface review
        Case("lone surrogate in a transcription prompt (form charset=unicode_escape)", STT, 400,
             odd_charset_form({"model": "tiny-whisper", "prompt": "hi \\ud800 there"}, "unicode_escape", short),
             "content-type", "unsupported_charset"),
        Case("lone surrogate in a voice system_prompt (form charset=utf-7)", VOICE, 400,
             odd_charset_form({"system_prompt": "be +2AA- nice"}, "utf-7", short), "content-type", "unsupported_charset"),
        Case("2 MB transcription prompt (past the form's part bound)", STT, 400, stt(short, prompt="a" * 2 * MB),
             "prompt", "string_above_max_length", mentions="max_form_field_chars"),
        Case("voice: 2 MB system_prompt", VOICE, 400, voice(short, system_prompt="a" * 2 * MB), "system_prompt",
             mentions="max_form_field_chars"),
        Case("20 fields in a form", STT, 400, stt(short, **{"timestamp_granularities[]": ["segment"] * 20}),
             "timestamp_granularities[]", "too_many_fields"),
        Case("20 MB chat body labelled multipart/form-data", CHAT, 413, {
            "data": big_body(20 * MB), "headers": {"content-type": "multipart/form-data; boundary=x"}},
             mentions="max_json_body_bytes"),
        Case("20 MB chat body labelled multipart/form-data, chunked", CHAT, 413, {
            "data": chunked(big_body(20 * MB)), "headers": {"content-type": "multipart/form-data; boundary=x"}},
             mentions="max_json_body_bytes"),
        Case("a JSON chat sent as text/plain", CHAT, 400, {"data": json.dumps(chat()["json"]),
                                                          "headers": {"content-type": "text/plain"}},
             code="invalid_content_type", mentions="application/json"),
        Case("best_of 1 with n 2", "/v1/completions", 400, {"json": {"model": "tiny-llm", "prompt": "hi", "n": 2,
                                                                     "best_of": 1}}, "best_of"),
        Case("GET /v1/realtime over plain HTTP: a WebSocket endpoint", "/v1/realtime", 426, method="GET",
             code="websocket_required", mentions="WebSocket"),
        # found by the operations review: read as is, a gzip body was "not valid UTF-8 at byte 1"
        Case("gzip bomb (200 kB inflating to 200 MB)", CHAT, 415, {"data": gzip.compress(b" " * 200 * MB), "headers": {
            "content-type": "application/json", "content-encoding": "gzip"}}, "content-encoding",
             "unsupported_content_encoding", mentions="'gzip'"),
        Case("temperature NaN (Python's json reads it; JSON has none)", CHAT, 400, raw_json(
            '{"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
             "temperature", "invalid_number"),
        Case("a deflated upload", STT, 415, {"data": zlib.compress(b"--x--\r\n"), "headers": {
            "content-type": "multipart/form-data; boundary=x", "content-encoding": "deflate"}}, "content-encoding",
             "unsupported_content_encoding"),
        Case("stream_options without stream", "/v1/chat/completions", 400, {"json": {
            "model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}],
            "stream_options": {"include_usage": True}}}, "stream_options"),
    ]


def send(url: str, case: Case) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.request(case.method, url + case.path, timeout=60, **case.kwargs)
    return response, time.monotonic() - started


@pytest.fixture(scope="module")
def live(tmp_path_factory, models_dir):
    server = live_server.start(tmp_path_factory.mktemp("live"), models_dir)
    # /health is ok before lazily loaded models are in: a case that needs a tokenizer would meet a
    # (right) 503 "still loading" instead of the refusal it tests. Every family answers first.
    deadline = time.monotonic() + 180
    while (codes := answers_of_every_family(server.url)) != dict.fromkeys(codes, 200):
        assert time.monotonic() < deadline, f"the families never all answered: {codes}"
        time.sleep(1)
    yield server
    live_server.stop(server)


def answers_of_every_family(url: str) -> dict[str, int]:
    calls: dict[str, Callable[[], requests.Response]] = {
        "llm": lambda: requests.post(url + CHAT, timeout=60, **chat(max_tokens=4)),
        "vlm": lambda: requests.post(url + CHAT, timeout=60, json={
            "model": "tiny-llava", "max_tokens": 4, **image_chat(png_data_uri())["json"]}),
        "stt": lambda: requests.post(url + STT, timeout=60, **stt(wav_bytes(1.0))),
        "tts": lambda: requests.post(url + SPEECH, timeout=60, json={"model": "tiny-vits", "input": "hello"}),
    }
    return {family: call().status_code for family, call in calls.items()}


def test_every_hostile_request_gets_its_4xx_and_harms_nothing(live):
    cases = corpus()
    assert len(cases) >= 60
    pids_before = live.replica_pids()
    assert set(pids_before) == {"llm", "vlm", "stt", "tts", "ingress"}
    failures = []
    for case in cases:
        try:
            response, seconds = send(live.url, case)
        except requests.RequestException as exc:
            failures.append(f"{case.name}: no answer ({type(exc).__name__}: {exc})")
            continue
        problem = check(case, response, seconds)
        if problem:
            failures.append(f"{case.name}: {problem}")
    if failures:  # say whether a replica was replaced or a model reloaded meanwhile (a 503 "still loading")
        states = {name: info.get("state") for name, info in live.health()["models"].items()}
        failures.append(f"(replica pids before: {pids_before}, now: {live.replica_pids()}; model states now: {states})")
    assert not failures, "\n".join(failures)
    assert answers_of_every_family(live.url) == {"llm": 200, "vlm": 200, "stt": 200, "tts": 200}
    assert live.replica_pids() == pids_before, "a replica was replaced"
    assert live.health()["status"] == "ok"


def check(case: Case, response: requests.Response, seconds: float) -> str | None:
    if response.status_code != case.status:
        return f"HTTP {response.status_code} (wanted {case.status}): {response.text[:300]}"
    if seconds > 15:
        return f"answered after {seconds:.1f} s"
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not OpenAI's error shape: {response.text[:200]}"
    if set(error) != {"message", "type", "param", "code"} or not error["message"]:
        return f"not OpenAI's error shape: {error}"
    if case.param is not None and error["param"] != case.param:
        return f"param {error['param']!r} (wanted {case.param!r}): {error['message'][:200]}"
    if case.code is not None and error["code"] != case.code:
        return f"code {error['code']!r} (wanted {case.code!r}): {error['message'][:200]}"
    if case.mentions is not None and case.mentions not in error["message"]:
        return f"message does not name {case.mentions!r}: {error['message'][:200]}"
    for leak in ("Traceback", "object at 0x", "/site-packages/", "/tmp/"):
        if leak in error["message"]:
            return f"message leaks internals ({leak!r}): {error['message'][:200]}"
    return None


def noise_png_uri(width: int, height: int) -> str:
    """A PNG of random pixels: it does not compress, so it is ~3 bytes a pixel on the wire."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_requests_within_the_limits_that_carry_over_4_mib_between_replicas_are_served(live):
    """Throughput-optimized mode carries the ingress's calls to the families over gRPC, with Ray's 4 MiB bound
    on a message unless serve.env raises it: each of these was a 500 (the ingress log: "Received message
    larger than max"). They are within every limit, and are answered as any other."""
    pids_before = live.replica_pids()
    long_audio = audio_bytes(90)  # 5.8 MB decoded (float32 at 16 kHz)
    cases = [
        ("a 90 s transcription", STT, 200, stt(long_audio)),
        ("a 5 MB image", CHAT, 200, {"json": {**image_chat(noise_png_uri(1300, 1300))["json"], "max_tokens": 4}}),
        ("4096 characters spoken as flac (the reply carries the whole waveform)", SPEECH, 200,
         {"json": {"model": "tiny-vits", "input": ("Hello there. " * 316)[:4096], "response_format": "flac"}}),
        ("a 90 s voice round trip", VOICE, 200, voice(long_audio, max_tokens="4", response_format="wav")),
        ("a 5 MB message: its own 400, not a 500", CHAT, 400, chat("hello " * (5 * MB // 6))),
    ]
    failures = []
    for name, path, status, kwargs in cases:
        response = requests.post(live.url + path, timeout=120, **kwargs)
        if response.status_code != status:
            failures.append(f"{name}: HTTP {response.status_code} (wanted {status}): {response.text[:300]}")
    assert not failures, "\n".join(failures)
    assert answers_of_every_family(live.url) == {"llm": 200, "vlm": 200, "stt": 200, "tts": 200}
    assert live.replica_pids() == pids_before, "a replica was replaced"


def decode_workers(ingress_pid: int) -> list[int]:
    """The ingress's audio decoder processes (deployments/isolated.py), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == ingress_pid and b"deployments.decode_worker" in cmdline:
            found.append(int(entry))
    return found


def busy_worker(pids: list[int], within_s: float = 30) -> int:
    """The one of `pids` that starts using CPU (decoding) within `within_s`."""
    def ticks(pid: int) -> int:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    start, deadline = {pid: ticks(pid) for pid in pids}, time.monotonic() + within_s
    while time.monotonic() < deadline:
        for pid in pids:
            if ticks(pid) - start[pid] >= 5:
                return pid
        time.sleep(0.01)
    raise AssertionError(f"no decoder of {pids} started decoding")


def test_a_decoder_that_crashes_costs_only_its_own_request(live):
    """libsndfile and ffmpeg parse the uploads in processes of the ingress's own: a segfault there (fuzzing
    found one in PyAV) is that request's 400, and the ingress, its other requests and every family go on."""
    pids_before = live.replica_pids()
    rate = 48000
    noise = np.random.default_rng(0).integers(-3, 4, size=rate * 590).astype(np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, noise, rate, format="FLAC", subtype="PCM_16")  # ~12 MB, ~1 s to decode
    deadline = time.monotonic() + 30
    while not decode_workers(pids_before["ingress"]):  # one is started with the ingress
        assert time.monotonic() < deadline, "the ingress has no audio decoder process"
        time.sleep(0.1)
    with ThreadPoolExecutor(1) as pool:
        doomed = pool.submit(requests.post, live.url + STT, timeout=120, **stt(buffer.getvalue()))
        victim = busy_worker(decode_workers(pids_before["ingress"]))
        os.kill(victim, signal.SIGSEGV)
        response = doomed.result()
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("file", "invalid_audio")
    assert "crashed on this file (signal SIGSEGV)" in error["message"]
    assert answers_of_every_family(live.url) == {"llm": 200, "vlm": 200, "stt": 200, "tts": 200}
    assert live.replica_pids() == pids_before, "a replica was replaced"
    assert victim not in decode_workers(pids_before["ingress"])


def test_rays_off_path_processes_leave_the_cpu_to_the_serving_ones(live):
    """serve.env: Ray's workers at nice 0 (RAY_worker_niceness), and MODELFLEET_RAY_DAEMONS_NICE (19): the
    replicas lowered the dashboard, its modules, the log monitor, the dashboard agent and (HAProxy answering) the
    HTTP proxy actor of this `serve run` to 19 and the controller to 15; the raylet, the GCS, HAProxy and every
    thread of every replica run at the priority `serve run` started with (deployments/ray_daemons.py)."""
    from deployments.ray_daemons import daemon_markers, kind_of

    base = os.getpriority(os.PRIO_PROCESS, 0)
    # what the replicas lowered, and what must keep `serve run`'s priority
    markers = {**daemon_markers({"RAY_SERVE_ENABLE_HA_PROXY": "1"}),
               **{kept: kept for kept in ("raylet", "gcs_server", "ServeReplica", "haproxy")}}
    seen: dict[str, set[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) != live.process.pid or (kind := kind_of(pid, markers)) is None:
                continue
            seen.setdefault(kind, set()).update(
                os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task"))
        except (OSError, ProcessLookupError):
            continue
    for lowered in ("dashboard", "dashboard module", "dashboard agent", "log monitor", "http proxy actor"):
        assert seen.get(lowered) == {19}, (lowered, seen)
    assert seen.get("serve controller") == {15}, seen
    for kept in ("raylet", "gcs_server", "ServeReplica", "haproxy"):
        assert seen.get(kept) == {base}, (kept, seen)
