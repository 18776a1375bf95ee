"""The demo application through the official `openai` client and plain HTTP.

The models are random-weight, so the tests check shapes, counts, formats and behaviour, never
the words.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import openai
import pytest
import soundfile as sf

from serve_testutil import png_data_uri, wav_bytes

pytestmark = pytest.mark.usefixtures("demo_app")


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
    assert set(by_id) == {"tiny-llm", "tiny-llm-lora", "tiny-whisper", "tiny-vits", "tiny-llava", "tiny-llava-lora"}
    assert by_id["tiny-whisper"].model_extra["family"] == "stt"
    assert by_id["tiny-llava"].model_extra["family"] == "vlm"
    for model in models:
        assert model.model_extra["state"] == "ready"
        assert model.model_extra["device"] == "cpu"
        assert model.model_extra["demo"] is True


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
        assert "gibberish" in info["note"]


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
    assert ask("llm") == ask("tiny-llm")


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
    alone = generate_batch(spec, load_model(spec), [ChatParams(model="alone", messages=messages, temperature=0)],
                           lambda loaded, batch: LLMServer.encode(None, loaded, batch))
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
    calls = after["model_calls"] - before["model_calls"]
    assert requests_ == 32 and calls < 32, (before, after)
    assert after["largest_batch"] > 1
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
    assert after["model_calls"] - before["model_calls"] < 16, (before, after)
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
    for good, bad in zip(responses[::2], responses[1::2]):
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
@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt", "verbose_json"])
def test_transcription_in_every_response_format(demo_app, fmt):
    result = demo_app.openai().audio.transcriptions.create(
        model="tiny-whisper", file=("speech.wav", wav_bytes(1.5)), response_format=fmt, language="en")
    if fmt == "json":
        assert isinstance(result.text, str)
    elif fmt == "verbose_json":
        assert result.duration == pytest.approx(1.5, abs=0.01)
        assert result.language == "en"
        assert len(result.segments) == 1 and result.segments[0].end == pytest.approx(1.5, abs=0.01)
    elif fmt == "srt":
        assert result.startswith("1\n00:00:00,000 --> 00:00:01,500\n"), result
    elif fmt == "vtt":
        assert result.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n"), result
    else:
        assert isinstance(result, str)


def test_long_stereo_44k_flac_is_resampled_and_chunked(demo_app):
    audio = wav_bytes(35.0, rate=44100, channels=2, fmt="FLAC")
    result = demo_app.openai().audio.transcriptions.create(
        model="whisper-1", file=("long.flac", audio), response_format="verbose_json")
    assert result.duration == pytest.approx(35.0, abs=0.05)
    assert [(s.start, s.end) for s in result.segments] == [(0.0, 30.0), (30.0, pytest.approx(35.0, abs=0.05))]
    assert result.language.isalpha() and len(result.language) == 2  # detected, since none was given


def test_transcription_with_a_prompt(demo_app):
    result = demo_app.openai().audio.transcriptions.create(
        model="tiny-whisper", file=("speech.wav", wav_bytes(1.0)), prompt="Glossary: Ray, Serve")
    assert isinstance(result.text, str) and not result.text.startswith("Glossary")


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "pcm"])
def test_speech_in_every_format_decodes_back(demo_app, fmt):
    response = demo_app.openai().audio.speech.create(
        model="tiny-vits", voice="alloy", input="hello world, this is a test", response_format=fmt)
    data = response.content
    if fmt == "pcm":
        samples = np.frombuffer(data, dtype="<i2")
        rate = 16000
    else:
        samples, rate = sf.read(io.BytesIO(data))
    expected_rate = {"opus": 16000, "mp3": 16000}.get(fmt, 16000)
    assert rate == expected_rate
    assert 0.05 < len(samples) / rate < 30


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
    assert body["models"] == {"stt": "tiny-whisper", "llm": "tiny-llm", "tts": "tiny-vits"}
    assert isinstance(body["transcript"], str) and isinstance(body["reply"], str)
    samples, rate = sf.read(io.BytesIO(base64.b64decode(body["audio"])))
    assert rate == body["sample_rate"] == 16000 and len(samples) > 0


# -- the seed servers' routes ---------------------------------------------------------------------------
def test_legacy_generate_stt_tts_routes(demo_app):
    generated = demo_app.post("/generate", json={"query": "Hello", "system_prompt": "Be nice", "max_new_tokens": 5})
    assert generated.status_code == 200 and generated.json()["model"] == "tiny-llm"
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
    with pytest.raises(client.ModelServerError, match="tiny-llm"):
        client.generate_remote_reply("Hi", model="no-such-model", base_url=demo_app.url)
    assert not client.is_server_available(base_url="http://127.0.0.1:9")


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
    ("/v1/audio/speech", {"json": {"model": "tiny-vits", "input": "hi", "response_format": "aac"}}, 400,
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
                                  "data": {"model": "tiny-whisper", "prompt": "word " * 300}}, 400, "prompt"),
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
