"""What browsers and phones upload, and AAC out, through the live demo app and the official `openai` client.

Chrome's and Firefox's MediaRecorder write WebM/Opus, Safari's MP4/AAC; none of them was readable before PyAV.
The files are made here with PyAV from the fixtures' speech. The tiny Whisper answers random text: the checks
are on the request succeeding and on the duration the server decoded, not on the words.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import av
import numpy as np
import openai
import pytest
import soundfile as sf

pytestmark = pytest.mark.usefixtures("demo_app")


def speech(seconds: float) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(Path(__file__).parent / "data" / "speech.flac", dtype="float32")
    return samples[:int(seconds * rate)], rate


def av_file(samples: np.ndarray, rate: int, container: str, codec: str, options: dict | None = None) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container, options=options or {}) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def recordings() -> dict[str, tuple[str, bytes, float]]:
    """name -> (file name, 3 s of speech, what the server may decode past 3 s): AAC's last frame comes whole
    (1024 samples), and ADTS also keeps the encoder's 1024 samples of priming (an M4A's edit list drops them)."""
    samples, rate = speech(3.0)
    at_48k = np.interp(np.arange(3 * 48000) / 48000, np.arange(len(samples)) / rate, samples)
    return {
        # MediaRecorder's WebM is live: no duration, no cues
        "webm/opus (Chrome, Firefox)": ("recording.webm", av_file(at_48k, 48000, "webm", "libopus", {"live": "1"}),
                                        0.0),
        "m4a/aac (Safari, iPhone)": ("memo.m4a", av_file(samples, rate, "mp4", "aac"), 1024 / rate),
        "aac (ADTS)": ("speech.aac", av_file(samples, rate, "adts", "aac"), 2048 / rate),
    }


@pytest.mark.parametrize("name", list(recordings()))
def test_a_browser_or_phone_recording_is_transcribed(demo_app, name):
    filename, data, extra = recordings()[name]
    result = demo_app.openai().audio.transcriptions.create(
        model="whisper-1", file=(filename, data), response_format="verbose_json", language="en")
    assert isinstance(result.text, str)
    assert 2.99 <= result.duration <= 3.01 + extra, result.duration


def test_a_corrupt_or_truncated_upload_is_a_400_and_the_replicas_live_on(demo_app):
    def pids() -> dict[str, int]:
        health = demo_app.get("/health").json()
        return {"ingress": health["ingress"]["pid"], "stt": health["models"]["tiny-whisper"]["replica"]["pid"]}

    before = pids()
    _, webm, _ = recordings()["webm/opus (Chrome, Firefox)"]
    _, m4a, _ = recordings()["m4a/aac (Safari, iPhone)"]
    bad = {
        "corrupt webm": (webm[:60] + b"\x00garbage" * 500, "Could not read the audio file as WebM/Matroska"),
        "truncated m4a": (m4a[:len(m4a) // 2], "it has no index (moov atom)"),
    }
    client = demo_app.openai()
    for name, (data, message) in bad.items():
        with pytest.raises(openai.BadRequestError) as refused:
            client.audio.transcriptions.create(model="whisper-1", file=("a.webm", data))
        error = refused.value.body
        assert (error["param"], error["code"]) == ("file", "invalid_audio"), (name, error)
        assert message in error["message"], (name, error["message"])
    # the bytes decide, not the name: a WebM called .wav is read as WebM
    assert isinstance(client.audio.transcriptions.create(model="whisper-1", file=("ok.wav", webm)).text, str)
    assert pids() == before


def adts_audio(data: bytes) -> tuple[int, int, float]:
    """(rate, channels, seconds) of ADTS AAC bytes, read back with PyAV."""
    with av.open(io.BytesIO(data), "r", format="aac") as container:
        stream = container.streams.audio[0]
        frames = sum(frame.samples for frame in container.decode(stream))
        return stream.codec_context.sample_rate, stream.codec_context.channels, frames / stream.codec_context.sample_rate


def test_speech_as_aac_streams_and_parses_back(demo_app):
    text = "Hello there. This is the second sentence. And here is a third one."
    client = demo_app.openai()
    wav = client.audio.speech.create(model="tiny-vits", voice="alloy", input=text, response_format="wav").content
    wav_seconds = sf.info(io.BytesIO(wav)).duration
    with client.audio.speech.with_streaming_response.create(
            model="tiny-vits", voice="alloy", input=text, response_format="aac") as response:
        assert response.headers["content-type"] == "audio/aac"
        chunks = list(response.iter_bytes(chunk_size=None))
    data = b"".join(chunks)
    assert data[0] == 0xFF and data[1] & 0xF6 == 0xF0  # an ADTS frame first
    rate, channels, seconds = adts_audio(data)
    assert (rate, channels) == (16000, 1)
    # the same samples as the WAV, plus the encoder's priming and the last frame whole (1024 samples each)
    assert wav_seconds <= seconds <= wav_seconds + 2048 / 16000
    # stream_format sse: the same bytes, base64 in speech.audio.delta events
    events = demo_app.post("/v1/audio/speech", json={"model": "tiny-vits", "input": text, "response_format": "aac",
                                                     "stream_format": "sse"})
    deltas = [json.loads(line[6:]) for line in events.text.splitlines() if line.startswith("data: ")]
    assert b"".join(base64.b64decode(d["audio"]) for d in deltas if d["type"] == "speech.audio.delta") == data
