"""The demo application through the official `openai` client and plain HTTP.

These tests use the random-weight models, so they check shapes, counts, formats and behaviour, never
the words; the demo's real chat model (the default `llm`) is checked for its words in test_real_model.py.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re

import numpy as np
import openai
import pytest
import soundfile as sf
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from deployments.audio import resample

from serve_testutil import free_port, png_data_uri, wav_bytes

pytestmark = pytest.mark.usefixtures("demo_app")
REAL_LLM = "smollm2-135m-instruct"  # the demo's real chat model, alias `llm` (not random-weight)


def assert_openai_error(response, status: int, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# -- models and health ---------------------------------------------------------------------------------
def test_models_list_every_served_model_with_family_state_and_demo_flag(demo_app):
    models = demo_app.openai().models.list().data
    by_id = {m.id: m for m in models}
    assert set(by_id) == {REAL_LLM, "tiny-llm", "tiny-llm-lora", "tiny-whisper", "tiny-vits", "tiny-llava",
                          "tiny-llava-lora", "tiny-llava-vision-lora"}
    assert by_id["tiny-whisper"].model_extra["family"] == "stt"
    assert by_id["tiny-llava"].model_extra["family"] == "vlm"
    for model in models:
        assert model.model_extra["state"] == "ready"
        assert model.model_extra["device"] == "cpu"
        assert model.model_extra["demo"] is (model.id != REAL_LLM)


@pytest.mark.parametrize("name,model_id,family", [
    ("tiny-llm", "tiny-llm", "llm"), ("llm", REAL_LLM, "llm"), ("whisper-1", "tiny-whisper", "stt"),
    ("tts-1", "tiny-vits", "tts"), ("tiny-llava-lora", "tiny-llava-lora", "vlm"),
])
def test_one_model_by_name_or_alias_is_its_card_from_the_list(demo_app, name, model_id, family):
    client = demo_app.openai()
    model = client.models.retrieve(name)
    assert model.id == model_id and model.object == "model"  # an alias answers with the model's own id
    assert model.model_extra["family"] == family and model.model_extra["state"] == "ready"
    listed = {m.id: m for m in client.models.list().data}[model_id]
    assert model.model_dump() == listed.model_dump()
    if name != model_id:
        assert name in model.model_extra["aliases"]


@pytest.mark.parametrize("name", ["gpt-7", "acme/tiny-llm", "tiny-llm-"])
def test_an_unknown_model_id_is_404_in_openai_shape_listing_the_models(demo_app, name):
    error = assert_openai_error(demo_app.get(f"/v1/models/{name}"), 404, "model")
    assert error["code"] == "model_not_found"
    assert name in error["message"] and "tiny-llm" in error["message"] and "tiny-vits" in error["message"]
    with pytest.raises(openai.NotFoundError):
        demo_app.openai().models.retrieve(name)


def test_health_reports_each_model_and_says_demo_output_is_gibberish(demo_app):
    health = demo_app.get("/health").json()
    assert health["status"] == "ok"
    assert "gibberish" in health["demo"]
    lora = health["models"]["tiny-llm-lora"]
    assert lora["state"] == "ready" and lora["adapter"].endswith("tiny-llm-lora")
    assert lora["base"] == "shared with served model 'tiny-llm'"  # one copy of the base weights
    for info in health["models"].values():
        assert {"name", "device", "loading_strategy", "state", "max_new_tokens"} <= set(info)
        assert info["loading_strategy"] == "float32 on cpu"
        assert ("gibberish" in info.get("note", "")) is (info["name"] != REAL_LLM)


# -- chat -------------------------------------------------------------------------------------------------
def test_chat_completion_counts_usage_and_respects_max_tokens(demo_app):
    reply = demo_app.openai().chat.completions.create(
        model="tiny-llm", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=7, temperature=0,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert reply.usage.completion_tokens <= 7
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")


def test_chat_by_alias_and_greedy_is_deterministic(demo_app):
    client = demo_app.openai()
    ask = lambda model: client.chat.completions.create(  # noqa: E731
        model=model, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12, temperature=0
    ).choices[0].message.content
    assert ask("llm") == ask(REAL_LLM)


def test_adapter_and_base_interleaved_each_answer_as_themselves(demo_app, models_dir):
    """tiny-llm-lora shares tiny-llm's weights: concurrent requests to both must not bleed."""
    from concurrent.futures import ThreadPoolExecutor

    from deployments.generation import generate_batch
    from deployments.llm import LLMServer
    from deployments.params import ChatParams
    from loading import ModelSpec, load_model

    client = demo_app.openai()
    messages = [{"role": "user", "content": "The weather today is"}]
    ask = lambda model: client.chat.completions.create(  # noqa: E731
        model=model, messages=messages, max_tokens=16, temperature=0).choices[0].message.content
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, ["tiny-llm", "tiny-llm-lora"] * 8))
    base_answers, lora_answers = set(answers[::2]), set(answers[1::2])
    assert len(base_answers) == 1 and len(lora_answers) == 1 and base_answers != lora_answers
    # the served base answers exactly like the same directory loaded alone, in-process
    spec = ModelSpec(name="alone", source=str(models_dir / "tiny-llm"), max_new_tokens=16)
    loaded, params = load_model(spec), ChatParams(model="alone", messages=messages, temperature=0)
    params.inputs = LLMServer.encode(None, loaded, params)
    alone = generate_batch(spec, loaded, [params])
    assert base_answers == {alone[0].text}


def test_stop_sequence_truncates_the_reply(demo_app):
    client = demo_app.openai()
    messages = [{"role": "user", "content": "Count with me"}]
    full = client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert len(text) > 4, text
    stop = text[3:5]
    cut = client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_streamed_chat_ends_with_usage_and_matches_the_plain_reply(demo_app):
    client = demo_app.openai()
    messages = [{"role": "user", "content": "Stream please"}]
    plain = client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(
        model="tiny-llm", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stream_wire_format_ends_with_done(demo_app):
    response = demo_app.post("/v1/chat/completions", json={
        "model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_concurrent_chats_are_batched_into_fewer_model_calls(demo_app):
    from concurrent.futures import ThreadPoolExecutor

    def stats():
        return demo_app.get("/health").json()["models"]["tiny-llm"]["replica"]["batching"]

    before = stats()
    client = demo_app.openai()
    ask = lambda i: client.chat.completions.create(  # noqa: E731
        model="tiny-llm", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=16, temperature=0)
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(32)))
    after = stats()
    assert all(r.usage.completion_tokens >= 1 for r in replies)
    requests_ = after["requests"] - before["requests"]
    calls = after["model_calls"] - before["model_calls"]  # prefills and decode steps (continuous batching)
    tokens = sum(r.usage.completion_tokens for r in replies)
    assert requests_ == 32 and calls < tokens / 4, (tokens, before, after)  # 4+ rows per forward on average
    assert after["largest_batch"] > 4
    # batched answers equal unbatched ones (left padding works)
    alone = ask(5)
    assert alone.choices[0].message.content == replies[5].choices[0].message.content


def test_concurrent_streams_share_batches_and_each_streams_its_own_reply(demo_app):
    from concurrent.futures import ThreadPoolExecutor

    def stats():
        return demo_app.get("/health").json()["models"]["tiny-llm"]["replica"]["batching"]

    client = demo_app.openai()
    messages = lambda i: [{"role": "user", "content": f"stream number {i}"}]  # noqa: E731

    def stream(i):
        chunks = list(client.chat.completions.create(
            model="tiny-llm", messages=messages(i), max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage

    before = stats()
    with ThreadPoolExecutor(16) as pool:
        streamed = list(pool.map(stream, range(16)))
    after = stats()
    assert after["requests"] - before["requests"] == 16
    tokens = sum(usage.completion_tokens for _, usage in streamed)
    assert after["model_calls"] - before["model_calls"] < tokens / 4, (tokens, before, after)  # rows share steps
    for i in (0, 7, 15):
        plain = client.chat.completions.create(model="tiny-llm", messages=messages(i), max_tokens=12, temperature=0)
        assert streamed[i][0] == plain.choices[0].message.content
        assert streamed[i][1].completion_tokens == plain.usage.completion_tokens


def test_a_bad_request_fails_alone_not_the_batch_it_arrives_with(demo_app):
    """max_tokens over the model's limit is a 400 for that request; its concurrent neighbours succeed."""
    from concurrent.futures import ThreadPoolExecutor

    def post(max_tokens):
        return demo_app.post("/v1/chat/completions", json={
            "model": "tiny-llm", "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens})

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, [8, 100000] * 6))
    for good, bad in zip(responses[::2], responses[1::2], strict=True):
        assert good.status_code == 200, good.text
        assert_openai_error(bad, 400, "max_tokens")


def test_vlm_reads_a_data_uri_png(demo_app):
    reply = demo_app.openai().chat.completions.create(
        model="tiny-llava", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": png_data_uri()}},
        ]}],
    )
    assert reply.usage.prompt_tokens > 16  # 16 image tokens plus the text
    assert reply.usage.completion_tokens >= 1


def test_vlm_adapter_and_different_images_change_the_answer(demo_app):
    client = demo_app.openai()

    def ask(model, color):
        return client.chat.completions.create(model=model, max_tokens=12, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri(color)}},
                                         {"type": "text", "text": "Describe"}]}]).choices[0].message.content

    assert ask("tiny-llava", (250, 0, 0)) != ask("tiny-llava", (0, 0, 250))
    assert ask("tiny-llava-lora", (250, 0, 0)) != ask("tiny-llava", (250, 0, 0))


# -- audio ------------------------------------------------------------------------------------------------
TRANSCRIPT_MEDIA_TYPES = {"json": "application/json", "text": "text/plain", "srt": "text/plain", "vtt": "text/vtt",
                          "verbose_json": "application/json"}


@pytest.fixture(scope="module")
def transcripts(demo_app):
    """The same 1.5 s of audio transcribed in every response_format over plain HTTP (greedy: same text)."""
    audio = wav_bytes(1.5)
    out = {}
    for fmt in TRANSCRIPT_MEDIA_TYPES:
        response = demo_app.post("/v1/audio/transcriptions", files={"file": ("speech.wav", audio)},
                                 data={"model": "tiny-whisper", "response_format": fmt, "language": "en"})
        assert response.status_code == 200, response.text
        out[fmt] = response
    return out


@pytest.mark.parametrize("fmt", list(TRANSCRIPT_MEDIA_TYPES))
def test_transcription_formats_have_their_content_type_and_the_same_text(transcripts, fmt):
    response = transcripts[fmt]
    assert response.headers["content-type"].split(";")[0] == TRANSCRIPT_MEDIA_TYPES[fmt]
    text = transcripts["json"].json()["text"]
    assert set(transcripts["json"].json()) == {"text", "usage"}
    assert text.strip(), "the tiny Whisper says something (gibberish), so an empty body cannot pass"
    if fmt == "text":
        assert response.text == text  # the bare text: no JSON, no quotes, no cue numbers
    elif fmt == "verbose_json":
        assert response.json()["text"] == text
    elif fmt == "srt":
        assert response.text == f"1\n00:00:00,000 --> 00:00:01,500\n{text.strip()}\n"
    elif fmt == "vtt":
        assert response.text == f"WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n{text.strip()}\n"


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt", "verbose_json"])
def test_transcription_in_every_response_format(demo_app, transcripts, fmt):
    """The same through the openai client, which parses each format its own way. json and verbose_json carry
    whisper-1's usage: the audio's seconds, rounded up as OpenAI's (its 8.47 s example: 9), so 1.5 s is 2."""
    result = demo_app.openai().audio.transcriptions.create(
        model="tiny-whisper", file=("speech.wav", wav_bytes(1.5)), response_format=fmt, language="en")
    text = transcripts["json"].json()["text"]
    if fmt == "json":
        assert result.text == text
        assert (result.usage.type, result.usage.seconds) == ("duration", 2), result.usage
    elif fmt == "verbose_json":
        assert result.text == text
        assert (result.usage.type, result.usage.seconds) == ("duration", 2), result.usage
        assert result.duration == pytest.approx(1.5, abs=0.01)
        assert result.language == "english"  # OpenAI names it
        assert len(result.segments) == 1 and result.segments[0].end == pytest.approx(1.5, abs=0.01)
    elif fmt == "srt":
        assert result.startswith("1\n00:00:00,000 --> 00:00:01,500\n"), result
    elif fmt == "vtt":
        assert result.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n"), result
    else:
        assert result == text


def test_long_stereo_44k_flac_is_resampled_and_chunked(demo_app):
    audio = wav_bytes(35.0, rate=44100, channels=2, fmt="FLAC")
    result = demo_app.openai().audio.transcriptions.create(
        model="whisper-1", file=("long.flac", audio), response_format="verbose_json")
    assert result.duration == pytest.approx(35.0, abs=0.05)
    assert result.usage.seconds == math.ceil(result.duration)  # of the whole upload, over its pieces
    assert [(s.start, s.end) for s in result.segments] == [(0.0, 30.0), (30.0, pytest.approx(35.0, abs=0.05))]
    assert result.language in LANGUAGES.values()  # detected, since none was given, and named as OpenAI does


def test_transcription_with_a_prompt(demo_app):
    result = demo_app.openai().audio.transcriptions.create(
        model="tiny-whisper", file=("speech.wav", wav_bytes(1.0)), prompt="Glossary: Ray, Serve")
    assert isinstance(result.text, str) and not result.text.startswith("Glossary")


def is_mpeg_layer3_frame(data: bytes) -> bool:
    """An MPEG audio frame header: 11 sync bits, then layer bits 01 (Layer III)."""
    return len(data) >= 4 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0 and (data[1] >> 1) & 0b11 == 0b01


SPEECH_CONTAINERS = {
    # format: (Content-Type, what its first bytes must be)
    "wav": ("audio/wav", lambda d: d[:4] == b"RIFF" and d[8:12] == b"WAVE"),
    "flac": ("audio/flac", lambda d: d[:4] == b"fLaC"),
    "mp3": ("audio/mpeg", lambda d: d[:3] == b"ID3" or is_mpeg_layer3_frame(d)),
    "opus": ("audio/ogg", lambda d: d[:4] == b"OggS" and b"OpusHead" in d[:80]),
    "pcm": ("audio/pcm", lambda d: d[:4] not in (b"RIFF", b"fLaC", b"OggS") and d[:3] != b"ID3"),
}
SPEECH_TEXT = "hello world, this is a test"


@pytest.fixture(scope="module")
def speech_wav(demo_app):
    """Reference: the same text as WAV (synthesis is seeded, so every format encodes the same samples)."""
    response = demo_app.post("/v1/audio/speech", json={"model": "tiny-vits", "input": SPEECH_TEXT, "response_format": "wav"})
    assert response.status_code == 200, response.text
    samples, rate = sf.read(io.BytesIO(response.content), dtype="int16")
    assert rate == 16000 and 0.05 < len(samples) / rate < 30
    return samples


@pytest.mark.parametrize("fmt", list(SPEECH_CONTAINERS))
def test_speech_in_every_format_decodes_back(demo_app, speech_wav, fmt):
    response = demo_app.openai().audio.speech.with_raw_response.create(
        model="tiny-vits", voice="alloy", input=SPEECH_TEXT, response_format=fmt)
    media_type, has_container = SPEECH_CONTAINERS[fmt]
    assert response.headers["content-type"] == media_type
    data = response.content
    assert has_container(data), f"{fmt}: not a {fmt} container: {data[:16]!r}"
    if fmt == "pcm":  # raw 16-bit little-endian mono at 24 kHz, as OpenAI's: the WAV's samples resampled, no header
        assert len(data) == 2 * len(speech_wav) * 3 // 2
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767
        expected = np.clip(resample(speech_wav.astype(np.float32) / 32767, 16000, 24000), -1, 1)
        assert np.abs(samples - expected).max() < 2e-3  # the same audio (int16 rounding apart)
        return
    info = sf.info(io.BytesIO(data))
    assert info.format == {"wav": "WAV", "flac": "FLAC", "mp3": "MP3", "opus": "OGG"}[fmt], info
    assert info.samplerate == 16000 and info.channels == 1
    samples, _ = sf.read(io.BytesIO(data), dtype="int16")
    if fmt in ("wav", "flac"):  # lossless: the same samples (libsndfile's float -> int16 may round apart by 1)
        assert len(samples) == len(speech_wav)
        assert np.abs(samples.astype(np.int32) - speech_wav.astype(np.int32)).max() <= 1
    else:  # lossy codecs add priming/padding frames
        assert abs(len(samples) - len(speech_wav)) < 0.2 * 16000, (len(samples), len(speech_wav))


def test_speech_speed_changes_duration(demo_app):
    def seconds(speed):
        data = demo_app.openai().audio.speech.create(
            model="tts-1", voice="alloy", input="a rather long sentence to speak", speed=speed).content
        samples, rate = sf.read(io.BytesIO(data))
        return len(samples) / rate

    assert seconds(0.5) > seconds(2.0)


def test_voice_round_trip_in_one_request(demo_app):
    response = demo_app.post("/v1/audio/chat", files={"file": ("q.wav", wav_bytes(1.0))},
                             data={"system_prompt": "You are a voice agent.", "max_tokens": "8"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["models"] == {"stt": "tiny-whisper", "llm": REAL_LLM, "tts": "tiny-vits"}
    assert isinstance(body["transcript"], str) and isinstance(body["reply"], str)
    samples, rate = sf.read(io.BytesIO(base64.b64decode(body["audio"])))
    assert rate == body["sample_rate"] == 16000 and len(samples) > 0


# -- the seed servers' routes ---------------------------------------------------------------------------
def test_legacy_generate_stt_tts_routes(demo_app):
    generated = demo_app.post("/generate", json={"query": "Hello", "system_prompt": "Be nice", "max_new_tokens": 5})
    assert generated.status_code == 200 and generated.json()["model"] == REAL_LLM  # the first LLM
    transcribed = demo_app.post("/stt", files={"audio": ("a.wav", wav_bytes(1.0))})
    assert transcribed.status_code == 200 and "text" in transcribed.json()
    spoken = demo_app.post("/tts", json={"text": "hello there"})
    assert spoken.headers["content-type"] == "audio/wav"
    samples, rate = sf.read(io.BytesIO(spoken.content))
    assert rate == 16000 and len(samples) > 0


def test_client_module_against_the_server(demo_app, tmp_path):
    from deployments import client

    assert client.is_server_available(base_url=demo_app.url)
    assert isinstance(client.generate_remote_reply("Hi", "Be brief", base_url=demo_app.url), str)
    wav = tmp_path / "in.wav"
    wav.write_bytes(wav_bytes(1.0))
    assert isinstance(client.transcribe(str(wav), base_url=demo_app.url), str)
    out = client.synthesize("hello", str(tmp_path / "out.wav"), base_url=demo_app.url)
    assert sf.info(out).samplerate == 16000
    with pytest.raises(client.ModelServerError, match="tiny-llm") as caught:
        client.generate_remote_reply("Hi", model="no-such-model", base_url=demo_app.url)
    assert caught.value.status == 404
    assert not client.is_server_available(base_url=f"http://127.0.0.1:{free_port()}")


def test_client_module_reads_MODELFLEET_URL_at_call_time(demo_app, monkeypatch, tmp_path):
    from deployments import client  # imported before the variable is set: it must not have cached it

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    monkeypatch.setenv("MODELFLEET_URL", dead)
    assert not client.is_server_available()
    with pytest.raises(client.ModelServerError, match=re.escape(dead) + ".*MODELFLEET_URL") as caught:
        client.generate_remote_reply("Hi", model="tiny-llm")
    assert caught.value.status is None
    with pytest.raises(client.ModelServerError, match=re.escape(dead)):
        client.synthesize("hello", str(tmp_path / "never.wav"))
    assert not (tmp_path / "never.wav").exists()
    # an explicit base_url wins over the variable
    assert client.is_server_available(base_url=demo_app.url)

    monkeypatch.setenv("MODELFLEET_URL", demo_app.url + "/")  # a trailing slash is fine
    assert client.is_server_available()
    assert isinstance(client.generate_remote_reply("Hi", "Be brief"), str)  # picks the first llm model
    wav = tmp_path / "in.wav"
    wav.write_bytes(wav_bytes(1.0))
    assert isinstance(client.transcribe(wav), str)
    assert sf.info(client.synthesize("hello", tmp_path / "out.wav")).samplerate == 16000
    assert not client.is_server_available(base_url=dead)


# -- bad input: a clear 4xx in OpenAI's shape, and the server stays healthy -----------------------------
def test_unknown_model_is_404_listing_the_models_that_exist(demo_app):
    with pytest.raises(openai.NotFoundError) as caught:
        demo_app.openai().chat.completions.create(model="gpt-7", messages=[{"role": "user", "content": "x"}])
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "tiny-llm" in error["message"] and "tiny-llava" in error["message"]


@pytest.mark.parametrize("path,kwargs,status,param", [
    ("/v1/chat/completions", {"data": "{not json"}, 400, None),
    ("/v1/chat/completions", {"json": {"model": "tiny-llm", "messages": []}}, 400, "messages"),
    ("/v1/chat/completions", {"json": {"model": "tiny-llm", "messages": [{"role": "user", "content": "x"}],
                                       "temperature": 7}}, 400, "temperature"),
    ("/v1/chat/completions", {"json": {"model": "tiny-llm", "messages": [{"role": "user", "content": "x"}],
                                       "max_tokens": 100000}}, 400, "max_tokens"),
    ("/v1/chat/completions", {"json": {"model": "tiny-llm", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_uri()}}]}]}}, 400, "messages"),
    ("/v1/chat/completions", {"json": {"model": "tiny-llava", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}}, 400,
     "messages.0.content.0.image_url"),
    ("/v1/chat/completions", {"json": {"model": "tiny-llava", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}}, 400,
     "messages.0.content.0.image_url"),
    ("/v1/chat/completions", {"json": {"model": "tiny-whisper", "messages": [{"role": "user", "content": "x"}]}},
     404, "model"),
    ("/v1/audio/speech", {"json": {"model": "tiny-vits", "input": "   "}}, 400, "input"),
    ("/v1/audio/speech", {"json": {"model": "tiny-vits", "input": "hi", "response_format": "wma"}}, 400,
     "response_format"),
    ("/v1/audio/speech", {"json": {"model": "tiny-vits", "input": "€€€"}}, 400, "input"),
    ("/v1/audio/transcriptions", {"files": {"file": ("x.wav", b"not audio at all")},
                                  "data": {"model": "tiny-whisper"}}, 400, "file"),
    ("/v1/audio/transcriptions", {"files": {"file": ("x.wav", b"")}, "data": {"model": "tiny-whisper"}}, 400, "file"),
    ("/v1/audio/transcriptions", {"data": {"model": "tiny-whisper"}}, 400, "file"),
    ("/v1/audio/transcriptions", {"files": {"file": ("x.wav", wav_bytes(0.5))},
                                  "data": {"model": "tiny-whisper", "language": "xx"}}, 400, "language"),
    ("/v1/audio/transcriptions", {"files": {"file": ("x.wav", wav_bytes(0.5))},
                                  "data": {"model": "tiny-whisper", "response_format": "docx"}}, 400,
     "response_format"),
    ("/v1/audio/transcriptions", {"files": {"file": ("x.wav", wav_bytes(0.5))},
                                  "data": {"model": "tiny-whisper", "prompt": "<|en|> hello"}}, 400, "prompt"),
    ("/v1/audio/transcriptions", {"files": {"file": ("x.wav", wav_bytes(0.5))},
                                  "data": {"model": "tiny-whisper", "timestamp_granularities[]": "word"}}, 400,
     "timestamp_granularities"),
    ("/generate", {"json": {"query": ""}}, 400, "query"),
    ("/tts", {"json": {"text": ""}}, 400, "text"),
    ("/no/such/route", {"json": {}}, 404, None),
])
def test_bad_input_gets_a_clear_4xx_and_the_server_stays_healthy(demo_app, path, kwargs, status, param):
    assert_openai_error(demo_app.post(path, **kwargs), status, param)
    assert demo_app.get("/health").json()["status"] == "ok"
