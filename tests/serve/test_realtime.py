"""The Realtime WebSocket endpoint through the official `openai` client's realtime connection, against
the shipped demo app (and an app with API keys): server VAD on real speech, input transcription,
text and audio responses, barge-in, errors as `error` events, the key on the socket.

The models are random-weight: the tests check the protocol's events, their order and their payloads
(pcm16 audio, transcripts that match their deltas, usage), never the words.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
import soundfile as sf

from serve_testutil import demo_args, run_app

SPEECH = Path(__file__).parent / "data" / "speech.flac"
RATE = 24000


def speech_pcm24(seconds: tuple[float, float] = (0.0, 2.0)) -> bytes:
    """A stretch of the real-speech fixture as pcm16 at 24 kHz (the Realtime API's format)."""
    from deployments.audio import resample

    samples, rate = sf.read(SPEECH, dtype="float32")
    piece = samples[int(seconds[0] * rate):int(seconds[1] * rate)]
    return (resample(piece, rate, RATE) * 32767).astype("<i2").tobytes()


def silence_pcm24(seconds: float) -> bytes:
    return np.zeros(int(seconds * RATE), dtype="<i2").tobytes()


def async_client(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    # the beta realtime client dials wss:// unless told the WebSocket base (the server is plain HTTP here)
    return openai.AsyncOpenAI(base_url=f"{url}/v1", websocket_base_url=url.replace("http://", "ws://") + "/v1",
                              api_key=key, max_retries=0)


async def events_until(connection, last: str, timeout: float = 60.0, stop_on_error: bool = False) -> list:
    """Events received up to and including the first of type `last`."""
    out = []

    async def collect():
        async for event in connection:
            out.append(event)
            if event.type == last or (stop_on_error and event.type == "error"):
                return

    await asyncio.wait_for(collect(), timeout)
    return out


# The demo's default LLM (the first in serve_config.yaml): a session asking for it keeps it, so the first
# session.updated a test waits for is its own (asking for another model sends one more, for the switch).
DEFAULT_LLM = "smollm2-135m-instruct"


async def append_audio(connection, pcm: bytes, chunk_s: float = 0.1) -> None:
    step = int(chunk_s * RATE) * 2
    for i in range(0, len(pcm), step):
        await connection.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + step]).decode())


def run(coro):
    return asyncio.run(coro)


# -- a spoken turn, end to end ---------------------------------------------------------------------------
def test_a_spoken_turn_is_detected_transcribed_answered_in_text_and_audio(demo_app):
    async def scenario():
        async with async_client(demo_app.url).beta.realtime.connect(model=DEFAULT_LLM) as conn:
            created = await events_until(conn, "session.created")
            assert created[-1].session.model == DEFAULT_LLM
            await conn.session.update(session={
                "modalities": ["text", "audio"], "voice": "alloy", "instructions": "Be brief.",
                "input_audio_format": "pcm16", "output_audio_format": "pcm16",
                "input_audio_transcription": {"model": "whisper-1"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 400, "prefix_padding_ms": 300},
                "max_response_output_tokens": 40, "speed": 1.25})
            updated = await events_until(conn, "session.updated")
            assert updated[-1].session.turn_detection.silence_duration_ms == 400
            assert updated[-1].session.speed == 1.25  # checked with the TTS model (VITS: speaking_rate)
            # "Hello there." then silence: one turn
            await append_audio(conn, speech_pcm24((0.0, 1.4)) + silence_pcm24(0.8))
            events = await events_until(conn, "response.done", timeout=90)
            # the user heard half of the reply's audio (a client that stopped playback at a barge-in)
            item = events[-1].response.output[0]
            played = sum(len(base64.b64decode(e.delta)) for e in events if e.type == "response.audio.delta")
            half_ms = played // 2 * 1000 // (2 * RATE)
            await conn.conversation.item.truncate(item_id=item.id, content_index=0, audio_end_ms=half_ms)
            await conn.conversation.item.retrieve(item_id=item.id)
            return events, await events_until(conn, "conversation.item.retrieved", stop_on_error=True)

    events, after = run(scenario())
    kinds = [e.type for e in events]
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
             "conversation.item.input_audio_transcription.completed", "response.created",
             "response.output_item.added", "response.content_part.added", "response.audio.done",
             "response.audio_transcript.done", "response.output_item.done", "response.done"]
    positions = [kinds.index(kind) for kind in order]
    assert positions == sorted(positions), kinds
    started = events[kinds.index("input_audio_buffer.speech_started")]
    stopped = events[kinds.index("input_audio_buffer.speech_stopped")]
    # speech at 0.26-0.99 s; audio_start_ms includes the 300 ms prefix padding (OpenAI's), clamped at the start
    assert 0 <= started.audio_start_ms <= 150 and 800 <= stopped.audio_end_ms <= 1300
    transcription = events[kinds.index("conversation.item.input_audio_transcription.completed")]
    assert transcription.item_id == started.item_id and isinstance(transcription.transcript, str)
    deltas = [e.delta for e in events if e.type == "response.audio_transcript.delta"]
    done_transcript = events[kinds.index("response.audio_transcript.done")].transcript
    assert "".join(deltas) == done_transcript and deltas
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.audio.delta")
    # The demo's tiny VITS gives every input token at least one frame of 64 samples at 16 kHz (96 at 24 kHz),
    # and each ASCII letter or digit is a token (its tokenizer drops what its vocabulary lacks): a bound that
    # holds for any reply the LLM samples, "Hi!" included
    spoken = sum(c.isascii() and c.isalnum() for c in done_transcript)
    assert len(audio) >= 2 * 96 * spoken and len(audio) % 2 == 0  # pcm16
    done = events[-1].response
    assert done.status in ("completed", "incomplete") and done.output[0].role == "assistant"
    assert done.usage.output_tokens > 0 and done.usage.input_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    truncated, retrieved = after[-2], after[-1]
    assert (truncated.type, truncated.item_id) == ("conversation.item.truncated", done.output[0].id), after
    heard = retrieved.item.content[0].transcript
    assert done_transcript.startswith(heard) and (len(heard) < len(done_transcript) or not audio), (heard, done_transcript)


def test_text_turns_without_turn_detection_and_protocol_errors_keep_the_session(demo_app):
    async def scenario():
        async with async_client(demo_app.url).beta.realtime.connect(model=DEFAULT_LLM) as conn:
            await events_until(conn, "session.created")
            await conn.session.update(session={"modalities": ["text"], "turn_detection": None})
            await events_until(conn, "session.updated")
            errors = []
            # bad events: each an error event naming the problem, the session goes on
            await conn.input_audio_buffer.commit()  # nothing buffered
            errors += await events_until(conn, "error")
            await conn.send({"type": "input_audio_buffer.append", "audio": "***not base64***"})
            errors += await events_until(conn, "error")
            await conn.send({"type": "no.such.event"})
            errors += await events_until(conn, "error")
            await conn.response.cancel()  # nothing to cancel
            errors += await events_until(conn, "error")
            await conn.send({"type": "session.update", "session": {"temperature": 9}})
            errors += await events_until(conn, "error")
            await conn._connection.send("x" * (4 * 2**20 + 1))  # past max_realtime_event_bytes
            errors += await events_until(conn, "error")
            # a text turn still works
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Hello"}]})
            await events_until(conn, "conversation.item.created")
            await conn.response.create(response={"max_output_tokens": 12})
            answer = await events_until(conn, "response.done")
            # a side question out of band, about that turn: answered, and the conversation left as it was
            turn = next(e.item.id for e in answer if e.type == "response.output_item.done")
            await conn.response.create(response={
                "conversation": "none", "metadata": {"purpose": "summary"}, "max_output_tokens": 8,
                "input": [{"type": "item_reference", "id": turn},
                          {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Sum up."}]}]})
            side = await events_until(conn, "response.done")
            await conn.conversation.item.retrieve(item_id=side[-1].response.output[0].id)
            missing = await events_until(conn, "error")
            return errors, answer, side, missing

    errors, answer, side, missing = run(scenario())
    assert side[-1].response.conversation_id is None and side[-1].response.metadata == {"purpose": "summary"}
    assert side[-1].response.status in ("completed", "incomplete")
    assert answer[-1].response.conversation_id is not None
    assert "conversation.item.created" not in [e.type for e in side]
    assert missing[-1].error.code == "item_not_found"  # the out-of-band reply never joined the conversation
    codes = [(e.error.code, e.error.param) for e in errors]
    assert codes == [("input_audio_buffer_commit_empty", None), ("invalid_value", "audio"), ("unknown_event", "type"),
                     ("response_cancel_not_active", None), (codes[4][0], "session.temperature"),
                     ("event_too_large", None)], codes
    assert "max_realtime_event_bytes" in errors[-1].error.message
    kinds = [e.type for e in answer]
    assert "response.text.delta" in kinds and "response.audio.delta" not in kinds
    text = "".join(e.delta for e in answer if e.type == "response.text.delta")
    assert answer[kinds.index("response.text.done")].text == text
    assert answer[-1].response.status in ("completed", "incomplete")
    assert 0 < answer[-1].response.usage.output_tokens <= 12


def test_barge_in_and_response_cancel_stop_the_response_at_once(demo_app):
    async def scenario():
        async with async_client(demo_app.url).beta.realtime.connect(model=DEFAULT_LLM) as conn:
            await events_until(conn, "session.created")
            await conn.session.update(session={"turn_detection": {"type": "server_vad", "create_response": False}})
            await events_until(conn, "session.updated")
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Tell me a story"}]})
            # response.cancel right behind response.create
            await conn.response.create()
            await conn.response.cancel()
            cancelled = await events_until(conn, "response.done")
            # new speech while a response is being made: barge-in
            await conn.response.create()
            await append_audio(conn, speech_pcm24((0.0, 0.8)))
            barged = await events_until(conn, "response.done")
            # and the session answers the next request normally
            await conn.input_audio_buffer.clear()
            await events_until(conn, "input_audio_buffer.cleared")
            await conn.response.create(response={"modalities": ["text"], "max_output_tokens": 4})
            after = await events_until(conn, "response.done")
            return cancelled, barged, after

    cancelled, barged, after = run(scenario())
    assert cancelled[-1].response.status == "cancelled"
    assert cancelled[-1].response.status_details.reason == "client_cancelled"
    kinds = [e.type for e in barged]
    assert "input_audio_buffer.speech_started" in kinds
    assert barged[-1].response.status == "cancelled" and barged[-1].response.status_details.reason == "turn_detected"
    assert kinds.index("input_audio_buffer.speech_started") < len(kinds) - 1
    assert after[-1].response.status in ("completed", "incomplete")


def test_a_function_call_and_its_output_through_the_openai_client(demo_app):
    """SmolLM2 made to call (tool_choice required: its reply is grammar-constrained to a call whose arguments
    fit the schema), then told the function's output, answers in words."""
    weather = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                              "required": ["city"], "additionalProperties": False}}

    async def scenario():
        async with async_client(demo_app.url).beta.realtime.connect(model=DEFAULT_LLM) as conn:
            await events_until(conn, "session.created")
            # greedy: sampled (at temperature 1), the city's string ran past max_output_tokens in 3 of
            # 1,024 draws (a 40-token call, closed by the grammar: status `incomplete`); the protocol is under test
            await conn.session.update(session={"modalities": ["text"], "turn_detection": None, "tools": [weather],
                                               "tool_choice": "required", "temperature": 0})
            await events_until(conn, "session.updated")
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "What is the weather in Paris?"}]})
            await conn.response.create(response={"max_output_tokens": 40})
            called = await events_until(conn, "response.done", stop_on_error=True)
            call = called[-1].response.output[0]
            await conn.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id,
                                                      "output": '{"celsius": 21, "sky": "clear"}'})
            await conn.response.create(response={"tool_choice": "none", "max_output_tokens": 24})
            return called, await events_until(conn, "response.done", stop_on_error=True)

    called, answered = run(scenario())
    done = called[-1].response
    assert done.status == "completed" and [o.type for o in done.output] == ["function_call"], done
    call = done.output[0]
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}, call
    arguments = [e for e in called if e.type == "response.function_call_arguments.done"]
    assert arguments[0].arguments == call.arguments and arguments[0].call_id == call.call_id
    reply = answered[-1].response
    assert reply.status in ("completed", "incomplete") and reply.output[0].type == "message", reply
    # the answer's prompt was the conversation with the call and its output in it, as a chat completion renders
    # it (the tokenizer route counts with the chat's own encoding; tool_choice none lists no tools)
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function",
                                                                     "function": {"name": call.name,
                                                                                  "arguments": call.arguments}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": '{"celsius": 21, "sky": "clear"}'}]
    counted = requests.post(demo_app.url + "/tokenize", json={"model": DEFAULT_LLM, "messages": history}, timeout=30)
    assert reply.output[0].content[0].text and reply.usage.input_tokens == counted.json()["count"], counted.text


def test_an_unknown_model_gets_an_error_event_and_the_default_llm(demo_app):
    async def scenario():
        async with async_client(demo_app.url).beta.realtime.connect(model="gpt-4o-realtime-preview") as conn:
            return await events_until(conn, "error")

    events = run(scenario())
    assert events[-1].error.code == "model_not_found" and "tiny-llm" in events[-1].error.message


def test_the_ga_client_speaks_the_same_session_with_ga_names(demo_app):
    async def scenario():
        async with async_client(demo_app.url).realtime.connect(model=DEFAULT_LLM) as conn:
            created = await events_until(conn, "session.created")
            await conn.session.update(session={
                "type": "realtime", "output_modalities": ["audio"], "instructions": "Be brief.",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None},
                          "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"}}})
            updated = await events_until(conn, "session.updated")
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Hello"}]})
            await events_until(conn, "conversation.item.added")
            await conn.response.create(response={"max_output_tokens": 12})
            return created, updated, await events_until(conn, "response.done")

    created, updated, answer = run(scenario())
    assert created[-1].session.audio.output.format.rate == 24000
    assert updated[-1].session.output_modalities == ["audio"] and updated[-1].session.audio.input.turn_detection is None
    kinds = [e.type for e in answer]
    assert "response.output_audio_transcript.delta" in kinds and "response.audio_transcript.delta" not in kinds
    transcript = "".join(e.delta for e in answer if e.type == "response.output_audio_transcript.delta")
    assert answer[kinds.index("response.output_audio_transcript.done")].transcript == transcript
    if any(c.isalnum() for c in transcript):
        assert "response.output_audio.delta" in kinds
    assert answer[-1].response.status in ("completed", "incomplete")
    assert answer[-1].response.output[0].content[0].type == "output_audio"


def test_semantic_vad_ends_a_spoken_turn_as_the_agents_sdk_asks_for_it(demo_app):
    """OpenAI's Agents SDK and many GA clients ask for `semantic_vad`; it was refused with an error event. Here
    the silence after the words comes in real time, as a microphone's: the LLM weighs the words at the pause,
    the turn ends once the silence is as long as their score asks (semantic_vad.wait_s, at most 8 s for
    `eagerness` low: the score has that long to come before the turn ends without it), where the speech ended,
    and is answered."""
    from deployments.semantic_vad import wait_s

    def weighed() -> int:
        return demo_app.get("/health").json()["models"][DEFAULT_LLM]["replica"]["batching"]["turn_ends_weighed"]

    async def scenario():
        async with async_client(demo_app.url).realtime.connect(model=DEFAULT_LLM) as conn:
            await events_until(conn, "session.created")
            await conn.session.update(session={
                "type": "realtime", "output_modalities": ["text"], "instructions": "Be brief.",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                    "transcription": {"model": "whisper-1"},
                                    "turn_detection": {"type": "semantic_vad", "eagerness": "low"}}},
                "max_output_tokens": 12})
            updated = await events_until(conn, "session.updated")
            await append_audio(conn, speech_pcm24((0.0, 1.4)))  # "Hello there.": speech ends at 0.99 s
            sent = [0.0]  # seconds of silence sent after it

            async def microphone():
                while sent[0] < 12:
                    await append_audio(conn, silence_pcm24(0.1))
                    sent[0] += 0.1
                    await asyncio.sleep(0.1)

            sending = asyncio.ensure_future(microphone())
            events, committed_after = [], None
            try:
                async def collect():
                    nonlocal committed_after
                    async for event in conn:
                        events.append(event)
                        if event.type == "input_audio_buffer.committed":
                            committed_after = sent[0]
                        if event.type in ("response.done", "error"):
                            return

                await asyncio.wait_for(collect(), 90)
            finally:
                sending.cancel()
            return updated, events, committed_after

    before = weighed()
    updated, events, committed_after = run(scenario())
    assert updated[-1].session.audio.input.turn_detection.type == "semantic_vad"
    assert updated[-1].session.audio.input.turn_detection.eagerness == "low"
    kinds = [e.type for e in events]
    assert "error" not in kinds, events
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
             "conversation.item.input_audio_transcription.completed", "response.created", "response.done"]
    positions = [kinds.index(kind) for kind in order]
    assert positions == sorted(positions), kinds
    assert kinds.count("input_audio_buffer.speech_started") == 1
    stopped = events[kinds.index("input_audio_buffer.speech_stopped")]
    assert 800 <= stopped.audio_end_ms <= 1300  # where the speech ended, not where the wait did
    assert events[-1].response.status in ("completed", "incomplete")
    assert weighed() > before  # the LLM deployment weighed the words
    # the turn ended after the silence its transcript's score asks for (the same score, asked again): 0.41 s
    # of silence came with the speech, the rest in real time. (The tiny Whisper's words are noise, which
    # SmolLM2 scores ~5e-9: the longest wait. Unscored, the turn would end after a quarter of it, 2 s.)
    transcript = events[kinds.index("conversation.item.input_audio_transcription.completed")].transcript
    from ray import serve

    score = serve.get_deployment_handle("llm", demo_app.name).end_of_turn.remote(
        DEFAULT_LLM, transcript, None).result(timeout_s=60)
    wait = wait_s(score, "low")
    assert wait - 0.41 - 0.25 <= committed_after <= max(wait - 0.41, 0) + 3.0, (transcript, score, committed_after)


def test_the_llm_deployment_weighs_whether_words_end_a_turn(demo_app):
    """The score semantic_vad waits by, from the LLM deployment the session calls: the demo's SmolLM2."""
    from ray import serve

    llm = serve.get_deployment_handle("llm", demo_app.name)
    finished = llm.end_of_turn.remote(DEFAULT_LLM, "Set a timer for five minutes.", None).result(timeout_s=60)
    cut = llm.end_of_turn.remote(DEFAULT_LLM, "Set a timer for", None).result(timeout_s=60)
    answer = llm.end_of_turn.remote(DEFAULT_LLM, "Paris.", "Which city are you in?").result(timeout_s=60)
    assert finished > 1e-3 > 1e-7 > cut and answer > 1e-3, (finished, cut, answer)
    assert llm.end_of_turn.remote(DEFAULT_LLM, "  ", None).result(timeout_s=60) is None  # no words: nothing to score


def test_a_transcription_session_captions_each_turn_and_answers_none(demo_app):
    """Live captioning through the GA client: `intent=transcription` in the URL, a `session.type: transcription`
    update with an OpenAI transcription model's name (an alias of the demo's STT), the two utterances of the
    fixture each committed and transcribed, no response."""

    async def scenario():
        client = async_client(demo_app.url).realtime
        async with client.connect(extra_query={"intent": "transcription"}) as conn:
            created = await events_until(conn, "session.created")
            await conn.session.update(session={
                "type": "transcription", "audio": {"input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": {"model": "gpt-4o-mini-transcribe", "language": "en"},
                    "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})
            updated = await events_until(conn, "session.updated", stop_on_error=True)
            await append_audio(conn, speech_pcm24((0.0, 4.0)) + silence_pcm24(1.0))
            events = []
            while len([e for e in events if e.type.endswith("input_audio_transcription.completed")]) < 2:
                events += await events_until(conn, "conversation.item.input_audio_transcription.completed",
                                             stop_on_error=True)
                assert events[-1].type != "error", events[-1]
            await conn.response.create()
            refused = await events_until(conn, "error")
            return created, updated, events, refused

    created, updated, events, refused = run(scenario())
    assert created[-1].session.type == "transcription" and updated[-1].session.type == "transcription"
    assert "conversation.created" not in [e.type for e in created]
    assert updated[-1].session.audio.input.transcription.model == "gpt-4o-mini-transcribe"
    kinds = [e.type for e in events]
    assert kinds.count("input_audio_buffer.committed") == 2 and kinds.count("conversation.item.added") == 2
    done = [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
    committed = [e.item_id for e in events if e.type == "input_audio_buffer.committed"]
    assert [e.item_id for e in done] == committed and all(isinstance(e.transcript, str) for e in done)
    assert not [kind for kind in kinds + [e.type for e in refused[:-1]] if kind.startswith("response.")]
    assert refused[-1].error.param == "type" and "makes no responses" in refused[-1].error.message


# -- the API key on the socket ---------------------------------------------------------------------------
KEY = "sk-realtime-test-key"


@pytest.fixture(scope="module")
def keyed_app(serve_url, models_dir, tmp_path_factory):
    from ray import serve

    key_file = tmp_path_factory.mktemp("auth") / "keys"
    key_file.write_text(KEY + "\n")
    args = demo_args()
    args["local_models_dir"] = str(models_dir)
    args["models"] = [m for m in args["models"] if m["name"] == "tiny-llm"]
    args["families"] = {"llm": {**args["families"]["llm"], "autoscaling": None}}
    args["auth"] = {"api_keys_file": str(key_file), "required": True}
    app = run_app(serve_url, "realtimekeys", args)
    auth = {"Authorization": f"Bearer {KEY}"}
    for _ in range(240):
        if requests.get(app.url + "/health", headers=auth, timeout=10).json()["status"] == "ok":
            break
        import time

        time.sleep(0.25)
    yield app
    serve.delete("realtimekeys")


def test_the_socket_needs_the_api_key_like_every_route(keyed_app):
    async def connect(key: str):
        async with async_client(keyed_app.url, key).beta.realtime.connect(model="tiny-llm") as conn:
            first = await conn.recv()
            rest = []
            import websockets

            with pytest.raises(websockets.ConnectionClosed):
                rest.append(await asyncio.wait_for(conn.recv(), 10))  # the server closes after the error
            return first, rest, conn._connection.close_code

    first, rest, code = run(connect("sk-wrong"))
    assert first.type == "error" and first.error.code == "invalid_api_key" and not rest
    assert code == 1008

    async def good():
        async with async_client(keyed_app.url, KEY).beta.realtime.connect(model="tiny-llm") as conn:
            return await conn.recv()

    assert run(good()).type == "session.created"


def test_the_browser_subprotocol_carries_the_key_too(keyed_app):
    import websockets

    async def scenario(protocols):
        url = keyed_app.url.replace("http://", "ws://") + "/v1/realtime?model=tiny-llm"
        async with websockets.connect(url, subprotocols=protocols) as ws:
            return json.loads(await ws.recv()), ws.subprotocol

    first, chosen = run(scenario(["realtime", f"openai-insecure-api-key.{KEY}", "openai-beta.realtime-v1"]))
    assert first["type"] == "session.created" and chosen == "realtime"
    first, _ = run(scenario(["realtime", "openai-insecure-api-key.sk-nope"]))
    assert first["type"] == "error" and first["error"]["code"] == "invalid_api_key"
