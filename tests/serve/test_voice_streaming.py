"""Voice streaming through the official `openai` client against the shipped demo app: speech sent as it
is synthesized (SSE events and chunked audio), streamed transcription, translations, word timestamps,
audio cut at silences found by the voice-activity detector, and the streamed voice round trip.

The models are random-weight: the tests check events, counts, formats, timings in the audio and
equalities between streamed and plain answers, never the words. `data/speech.flac` is real speech
(espeak-ng), so that the detector has speech and pauses to find.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf

from deployments.audio import resample

from serve_testutil import wav_bytes

pytestmark = pytest.mark.usefixtures("demo_app")

SPEECH = Path(__file__).parent / "data" / "speech.flac"
# where the fixture's speech is (from the detector; see data/README.md): the silences between are cut points
SPEECH_S = 9.5825625
SPOKEN = [(0.26, 0.99), (1.98, 3.68), (4.7, 8.61)]
SENTENCES = "Hello there. This is the second sentence, with a clause. And here is a third one!"


def speech_audio(repeat: int = 1) -> bytes:
    samples, rate = sf.read(SPEECH, dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, np.tile(samples, repeat), rate, format="FLAC")
    return buf.getvalue()


def sse_events(lines) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]


# -- speech out ----------------------------------------------------------------------------------------
def test_speech_sse_sends_one_delta_per_sentence_then_done_with_usage(demo_app):
    client = demo_app.openai()
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=SENTENCES, response_format="pcm", stream_format="sse") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert [e["type"] for e in events] == ["speech.audio.delta"] * len(deltas) + ["speech.audio.done"]
    # one per sentence (the first is sent before the second is synthesized), then the resampler's last
    # few samples (pcm is 24 kHz; the model's 16 kHz audio is resampled as one stream)
    assert len(deltas) == 4 and len(base64.b64decode(deltas[3]["audio"])) < 200
    usage = events[-1]["usage"]
    assert usage["input_tokens"] > len(SENTENCES) and usage["total_tokens"] == usage["input_tokens"]
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    # each sentence alone is what the plain route says for it (synthesis is seeded per piece), up to the
    # resampler's few samples that reach into the next sentence
    first = np.frombuffer(client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.",
                                                     response_format="pcm").content, dtype="<i2").astype(np.int32)
    sent = np.frombuffer(base64.b64decode(deltas[0]["audio"]), dtype="<i2").astype(np.int32)
    assert len(first) - 100 < len(sent) <= len(first) and np.abs(sent[:-100] - first[: len(sent) - 100]).max() <= 2
    # and the chunked audio stream carries the same bytes as the events
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=SENTENCES, response_format="pcm") as response:
        assert response.headers["content-type"] == "audio/pcm"
        assert b"".join(response.iter_bytes()) == pcm


def test_streamed_wav_has_a_streaming_header_and_decodes_to_the_pcm(demo_app):
    client = demo_app.openai()
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=SENTENCES, response_format="wav") as response:
        assert response.headers["content-type"] == "audio/wav"
        assert "content-length" not in response.headers  # chunked, sent as synthesized
        data = b"".join(response.iter_bytes())
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE" and struct.unpack("<I", data[4:8])[0] == 0xFFFFFFFF
    samples, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 16000
    whole = client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCES, response_format="wav").content
    assert samples.tobytes() == sf.read(io.BytesIO(whole), dtype="int16")[0].tobytes()  # streamed = whole
    pcm = client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCES, response_format="pcm").content
    as_pcm = np.clip(resample(samples.astype(np.float32) / 32767, 16000, 24000), -1, 1)  # the same audio at 24 kHz
    assert np.abs(np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767 - as_pcm).max() < 2e-3


@pytest.mark.parametrize("fmt,container", [("opus", b"OggS"), ("flac", b"fLaC"), ("mp3", None)])
def test_sse_speech_in_codec_formats_decodes(demo_app, fmt, container):
    with demo_app.openai().audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=SENTENCES, response_format=fmt, stream_format="sse") as response:
        events = sse_events(response.iter_lines())
    data = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    if container:
        assert data[:4] == container
    info = sf.info(io.BytesIO(data))
    assert info.channels == 1 and info.duration > 0.2


def test_speech_errors_come_before_the_stream(demo_app):
    with pytest.raises(openai.BadRequestError) as caught:
        demo_app.openai().audio.speech.create(model="tts-1", voice="alloy", input="€€€", stream_format="sse")
    assert caught.value.body["param"] == "input"
    response = demo_app.post("/v1/audio/speech", json={"model": "tts-1", "input": "hi", "stream_format": "ogg"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_format"


# -- text in --------------------------------------------------------------------------------------------
def test_streamed_transcription_gives_a_delta_per_piece_and_the_plain_text(demo_app):
    client = demo_app.openai()
    audio = speech_audio(4)  # 38 s: two pieces, cut at a pause
    plain = client.audio.transcriptions.create(model="whisper-1", file=("s.flac", audio), language="en")
    events = list(client.audio.transcriptions.create(model="whisper-1", file=("s.flac", audio), language="en",
                                                     stream=True))
    assert [e.type for e in events] == ["transcript.text.delta"] * (len(events) - 1) + ["transcript.text.done"]
    assert len(events) == 3
    done = events[-1]
    assert "".join(e.delta for e in events[:-1]) == done.text == plain.text
    assert done.usage.input_tokens == int(np.ceil(4 * SPEECH_S * 50)) and done.usage.output_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens


def test_long_audio_is_cut_in_the_pauses_not_every_30_s(demo_app):
    result = demo_app.openai().audio.transcriptions.create(
        model="whisper-1", file=("s.flac", speech_audio(4)), response_format="verbose_json", language="en")
    cuts = [s.end for s in result.segments[:-1]]
    assert len(result.segments) == 2 and cuts[0] < 30.0
    for cut in cuts:
        within = cut % SPEECH_S
        assert not any(start + 0.05 < within < end - 0.05 for start, end in SPOKEN), (cut, within)
    assert result.segments[-1].end == pytest.approx(4 * SPEECH_S, abs=0.01)
    assert [s.start for s in result.segments[1:]] == cuts  # the pieces cover the audio


@pytest.mark.parametrize("strategy", ["auto", {"type": "server_vad", "silence_duration_ms": 300, "threshold": 0.6,
                                                "prefix_padding_ms": 100}])
def test_chunking_strategy_is_accepted_as_openai_sends_it(demo_app, strategy):
    result = demo_app.openai().audio.transcriptions.create(
        model="whisper-1", file=("s.flac", speech_audio(4)), response_format="verbose_json", language="en",
        chunking_strategy=strategy)
    within = result.segments[0].end % SPEECH_S
    assert not any(start + 0.05 < within < end - 0.05 for start, end in SPOKEN)


def test_word_timestamps_are_ordered_and_inside_the_audio(demo_app):
    client = demo_app.openai()
    result = client.audio.transcriptions.create(
        model="whisper-1", file=("s.flac", speech_audio(4)), response_format="verbose_json", language="en",
        timestamp_granularities=["word", "segment"])
    assert result.words and result.segments
    starts = [w.start for w in result.words]
    assert starts == sorted(starts)
    assert all(0 <= w.start <= w.end <= result.duration and w.word.strip() for w in result.words)
    assert any(w.start >= result.segments[1].start for w in result.words)  # the second piece's words, offset
    words_only = client.audio.transcriptions.create(
        model="whisper-1", file=("s.wav", wav_bytes(1.0)), response_format="verbose_json", language="en",
        timestamp_granularities=["word"])
    assert words_only.words and words_only.segments is None


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt", "verbose_json"])
def test_translation_in_every_format(demo_app, fmt):
    result = demo_app.openai().audio.translations.create(model="whisper-1", file=("s.wav", wav_bytes(1.5)),
                                                         response_format=fmt)
    if fmt == "json":
        assert isinstance(result.text, str) and result.text
        assert "usage" not in result.model_extra  # as OpenAI's Translation: text alone
    elif fmt == "verbose_json":
        assert result.language == "english" and result.duration == pytest.approx(1.5, abs=0.01)
        assert result.model_extra.get("task") == "translate" and len(result.segments) == 1
        assert "usage" not in result.model_extra
    elif fmt == "srt":
        assert result.startswith("1\n00:00:00,000 --> 00:00:01,500\n")
    elif fmt == "vtt":
        assert result.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n")
    else:
        assert isinstance(result, str) and result


@pytest.mark.parametrize("data,param", [
    ({"stream": "true", "response_format": "srt"}, "stream"),
    ({"timestamp_granularities[]": "word"}, "timestamp_granularities"),
    ({"chunking_strategy[threshold]": "2"}, "chunking_strategy[threshold]"),
    ({"chunking_strategy": "{\"type\": \"semantic\"}"}, "chunking_strategy"),
])
def test_bad_transcription_options_are_400_naming_the_field(demo_app, data, param):
    response = demo_app.post("/v1/audio/transcriptions", files={"file": ("x.wav", wav_bytes(0.5))},
                             data={"model": "whisper-1", **data})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# -- the round trip --------------------------------------------------------------------------------------
def test_voice_round_trip_streams_transcript_text_and_audio(demo_app):
    response = demo_app.post("/v1/audio/chat", files={"file": ("q.flac", speech_audio())},
                             data={"max_tokens": "40", "stream": "true", "response_format": "pcm", "temperature": "0"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text.splitlines())
    kinds = [e["type"] for e in events]
    assert kinds[0] == "transcript" and kinds[-1] == "done"
    assert set(kinds[1:-1]) <= {"reply.delta", "audio.delta"} and "reply.delta" in kinds
    done = events[-1]
    assert "".join(e["delta"] for e in events if e["type"] == "reply.delta") == done["reply"]
    assert done["models"] == {"stt": "tiny-whisper", "llm": "smollm2-135m-instruct", "tts": "tiny-vits"}  # the first LLM
    assert done["usage"]["completion_tokens"] > 0 and done["usage"]["prompt_tokens"] > 0
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "audio.delta")
    # audio always (a reply with nothing speakable is a short pause, as unstreamed); pcm is 24 kHz
    assert done["sample_rate"] == 24000 and len(audio) > 0 and len(audio) % 2 == 0
    if any(c.isalnum() for c in done["reply"]):
        assert done["usage"]["speech_input_tokens"] > 0
