"""Whisper's temperature fallback: OpenAI's `temperature` 0 ("the model will use log probability to automatically
increase the temperature until certain thresholds are hit"), run as openai-whisper's transcribe() runs it.

The fallback runs for real here: the tiny random Whisper's greedy decodes fail the log-probability test on every
piece (avg_logprob ~ -2.4 < -1), and a 440 Hz tone's fails the compression-ratio test too (one token repeated:
~9 > 2.4). A real STTServer on the tiny Whisper, behind the real HTTP app (build_api) for the openai client."""

from __future__ import annotations

import asyncio
import io
import zlib
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from local_handles import LocalHandle
from pydantic import ValidationError

from deployments.api import build_api
from deployments.app_config import AppConfig
from deployments.ingress import Ingress
from deployments.options import TranscriptionOptions
from deployments.params import TranscribeParams, TranscribeResult
from deployments.stt import STTServer
from loading import ModelSpec
from loading.tiny import build_tiny

SPEECH = Path(__file__).parents[1] / "serve" / "data" / "speech.flac"
TEMPERATURES = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # the default, openai-whisper's


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    return build_tiny("stt", tmp_path_factory.mktemp("stt") / "tiny-whisper")


def speech() -> tuple[np.ndarray, int]:
    return sf.read(SPEECH, dtype="float32")


def stt_server(whisper_dir: Path, generation_timeout_s: float = 120.0, **options) -> STTServer:
    spec = ModelSpec(name="w", source=str(whisper_dir), generation_timeout_s=generation_timeout_s)
    return STTServer([spec], TranscriptionOptions(memory_budget_mb=4096, **options))


def transcribe(server: STTServer, audio: np.ndarray, rate: int, **fields) -> TranscribeResult:
    return asyncio.run(server.transcribe(TranscribeParams(model="w", audio=audio, sample_rate=rate, wait_s=60,
                                                          language="en", **fields)))


def decodes(server: STTServer, monkeypatch) -> list[float]:
    """The temperature of each generate() call the server makes from now on (the model loaded first)."""
    transcribe(server, np.zeros(1600, np.float32), 16000, temperature=0.5)
    model = server.pool.handles["w"].get(0).model
    calls: list[float] = []
    real = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs.get("temperature", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return calls


def batching(server: STTServer) -> dict:
    return asyncio.run(server.status())[0]["replica"]["batching"]


def openai_client(server: STTServer, whisper_dir: Path) -> openai.OpenAI:
    """The openai client on the real HTTP app (routes, form parsing, audio decoding) over `server`."""
    config = AppConfig.model_validate({"models": [{"name": "w", "source": str(whisper_dir), "family": "stt"}],
                                       "local_models_dir": "/nonexistent"})
    http = TestClient(build_api(Ingress({"stt": LocalHandle(server)}, config)), raise_server_exceptions=False)
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)


def test_temperature_0_decodes_again_while_a_piece_fails_and_its_segment_says_so(whisper_dir, monkeypatch):
    server = stt_server(whisper_dir)  # the defaults: TEMPERATURES, 2.4, -1.0, 0.6
    client = openai_client(server, whisper_dir)
    calls = decodes(server, monkeypatch)
    upload = ("speech.flac", SPEECH.read_bytes())

    fell = client.audio.transcriptions.create(model="w", file=upload, response_format="verbose_json",
                                              timestamp_granularities=["segment", "word"])
    # every decode failed (the tiny model is never confident): one pass per temperature, no more
    assert calls == TEMPERATURES
    segment = fell.segments[0]
    assert segment.temperature == 1.0 and segment.avg_logprob < -1.0  # the last decode stands, as openai-whisper's
    data = segment.text.encode()
    assert segment.compression_ratio == pytest.approx(len(data) / len(zlib.compress(data)), abs=1e-3)
    assert fell.words and all(0 <= w.start <= w.end <= fell.duration for w in fell.words)  # of the last decode
    assert (fell.usage.type, fell.usage.seconds) == ("duration", 10)  # 9.58 s of audio
    assert batching(server)["fallback_decodes"] == 5  # /health shows what the fallback cost

    calls.clear()  # json, no language: each pass's generate() detects it from the encoder's states, run once
    encoded = []
    hook = server.pool.handles["w"].get(0).model.get_encoder().register_forward_hook(lambda *_: encoded.append(1))
    try:
        assert client.audio.transcriptions.create(model="w", file=upload).text
    finally:
        hook.remove()
    assert calls == TEMPERATURES and len(encoded) == 1

    calls.clear()
    sampled = client.audio.transcriptions.create(model="w", file=upload, response_format="verbose_json",
                                                 language="en", temperature=0.4)
    assert calls == [0.4] and sampled.segments[0].temperature == 0.4  # above 0: that temperature, once

    calls.clear()
    with pytest.raises(openai.BadRequestError) as refused:  # OpenAI's range is 0 to 1
        client.audio.transcriptions.create(model="w", file=upload, temperature=1.5)
    error = refused.value.body
    assert error["param"] == "temperature" and "must be from 0 to 1" in error["message"] and "got 1.5" in error["message"]
    assert calls == []


def test_a_piece_that_passes_keeps_its_greedy_decode_in_long_audio_and_in_the_stream(whisper_dir):
    """30 s of a tone, then speech: two pieces. With the compression-ratio test alone, the tone's looping greedy
    decode fails it and is decoded again; the speech's passes and is exactly the greedy decode, in the plain
    answer and the stream (which sends its pieces through the model one at a time)."""
    samples, rate = speech()
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(30 * rate) / rate)).astype(np.float32)
    audio = np.concatenate([tone, samples])
    greedy = transcribe(stt_server(whisper_dir, fallback_temperatures=[0.0]), audio, rate)
    assert [s.compression_ratio > 2.4 for s in greedy.segments] == [True, False], greedy.segments
    server = stt_server(whisper_dir, logprob_threshold=None)

    async def stream() -> TranscribeResult:
        items = [item async for item in server.transcribe_stream(
            TranscribeParams(model="w", audio=audio, sample_rate=rate, wait_s=60, language="en"))]
        return items[-1]["result"]

    for result in (transcribe(server, audio, rate), asyncio.run(stream())):
        assert 1 <= result.fallback_decodes <= 5  # the tone's piece alone was decoded again
        tone_piece, speech_piece = result.segments
        assert (speech_piece.temperature, speech_piece.token_ids) == (0.0, greedy.segments[1].token_ids)
        assert tone_piece.temperature > 0 and tone_piece.token_ids != greedy.segments[0].token_ids
        # it stopped at the first temperature that passed, or ran out of them
        assert tone_piece.compression_ratio <= 2.4 or tone_piece.temperature == 1.0, tone_piece


def test_a_streamed_transcription_counts_its_prompt_as_text_input_tokens(whisper_dir):
    """transcript.text.done's usage, as gpt-4o-transcribe's: input tokens are the audio's and the prompt's, told
    apart in input_token_details (the prompt's were not counted)."""
    server = stt_server(whisper_dir, fallback_temperatures=[0.0])
    samples, rate = speech()
    buffer = io.BytesIO()
    sf.write(buffer, samples[:2 * rate], rate, format="WAV")
    prompt = "Glossary: Ray, Serve, Whisper"
    events = list(openai_client(server, whisper_dir).audio.transcriptions.create(
        model="w", file=("two.wav", buffer.getvalue()), language="en", prompt=prompt, stream=True))
    usage = events[-1].usage
    text = len(server.pool.handles["w"].get(0).processor.get_prompt_ids(prompt)) - 1  # less <|startofprev|>
    assert (usage.input_token_details.audio_tokens, usage.input_token_details.text_tokens) == (100, text)
    assert text > 3 and usage.input_tokens == 100 + text and usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_silence_is_not_decoded_again_and_gives_no_text(whisper_dir, monkeypatch):
    """openai-whisper: <|nospeech|> above no_speech_threshold with avg_logprob at most logprob_threshold is
    silence, not a failed decode. The tiny model's <|nospeech|> probability is ~1e-5: a threshold of 0 makes
    every piece silence."""
    server = stt_server(whisper_dir, no_speech_threshold=0.0)
    calls = decodes(server, monkeypatch)
    before = batching(server)
    result = transcribe(server, *speech())
    assert calls == [0.0] and result.segments == [] and result.text == ""
    after = batching(server)
    assert (after["silent_pieces"] - before["silent_pieces"], after["fallback_decodes"]) == (1, 0)


def test_the_decodes_together_stay_within_generation_timeout_s(whisper_dir, monkeypatch):
    """Each pass after the first gets what is left of the model's generation_timeout_s, and none starts past it:
    a first decode that takes it all is the last (it stands, though it failed)."""
    server = stt_server(whisper_dir, generation_timeout_s=0.001)
    calls = decodes(server, monkeypatch)
    result = transcribe(server, *speech())
    assert calls == [0.0] and result.segments[0].temperature == 0.0


@pytest.mark.parametrize("temperatures", [[0.2, 0.4], [0.0, 0.4, 0.2], [0.0, 0.0], [0.0, 1.5], []])
def test_fallback_temperatures_start_at_0_and_increase_to_at_most_1(temperatures):
    with pytest.raises(ValidationError, match="fallback_temperatures"):
        TranscriptionOptions(fallback_temperatures=temperatures)


def test_each_fallback_temperature_samples_best_of_and_the_likeliest_sample_stands(whisper_dir, monkeypatch):
    """openai-whisper draws best_of samples at each fallback temperature above 0 and keeps the one with the
    highest average log-probability, where a single sample at a high temperature is a draw of chance."""
    from deployments import transcription

    server = stt_server(whisper_dir, fallback_best_of=3, max_chunks_per_call=2)
    transcribe(server, np.zeros(1600, np.float32), 16000, temperature=0.5)  # loaded
    calls: list[tuple[float, list[float]]] = []  # (temperature, each row's avg_logprob)
    real = transcription._generate

    def generate(spec, loaded, first, pieces, inputs, languages, cancelled, temperature, max_time):
        made = real(spec, loaded, first, pieces, inputs, languages, cancelled, temperature, max_time)
        calls.append((temperature, [output.avg_logprob for output in made]))
        return made

    monkeypatch.setattr(transcription, "_generate", generate)
    audio, rate = speech()
    result = transcribe(server, audio, rate)  # one piece; every decode fails (the tiny model is never confident)
    # greedy once; then 3 samples at each temperature, in calls of at most max_chunks_per_call rows
    assert [(t, len(rows)) for t, rows in calls] == [(0.0, 1)] + [(t, n) for t in TEMPERATURES[1:] for n in (2, 1)]
    last = calls[-2][1] + calls[-1][1]  # the three samples at 1.0
    assert result.segments[0].temperature == 1.0 and result.segments[0].avg_logprob == pytest.approx(max(last))
    assert batching(server)["fallback_decodes"] == 5  # a temperature's samples are one decode of the piece

    calls.clear()  # a request's own temperature above 0 is sampled once, as asked
    transcribe(server, audio, rate, temperature=0.4)
    assert [(t, len(rows)) for t, rows in calls] == [(0.4, 1)]
