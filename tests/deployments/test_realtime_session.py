"""The Realtime session's own logic, in-process: turn detection on real speech with the real Silero VAD,
and the ordering of turns, transcriptions and responses. The ingress is a scripted stand-in here (text,
audio and transcripts with set delays), so that the races these tests pin down happen every time; the
same session against the real models, end to end, is tests/serve/test_realtime.py."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from starlette.websockets import WebSocketState

from deployments.audio import resample
from deployments.errors import InvalidRequestError, ServiceUnavailableError
from deployments.limits import RequestLimits
from deployments.options import TranscriptionOptions
from deployments.params import ChatParams, SpeechResult, TranscribeParams, TranscribeResult
from deployments.realtime import RealtimeSession
from deployments.stt import STTServer
from loading import Family, ModelSpec
from loading.tiny import build_tiny

SPEECH = Path(__file__).parents[1] / "serve" / "data" / "speech.flac"  # speech at 0.26-0.99, 1.98-3.68 s
RATE = 24000


class Socket:
    def __init__(self, ga: bool = False, send_delay: float = 0.0):
        self.headers = {} if ga else {"openai-beta": "realtime=v1"}
        self.application_state = WebSocketState.CONNECTED
        self.sent: list[dict] = []
        self.send_delay = send_delay

    async def send_text(self, text: str) -> None:
        if self.send_delay:
            await asyncio.sleep(self.send_delay)
        self.sent.append(json.loads(text))

    def of(self, kind: str) -> list[dict]:
        return [event for event in self.sent if event["type"] == kind]


class ScriptedIngress:
    """The session's view of the app: a reply of `words`, silent speech, and `transcripts` in turn."""

    def __init__(self, limits: RequestLimits | None = None, words: int = 3, word_s: float = 0.01,
                 transcribe_s: float = 0.01, max_new_tokens: int = 256, closing: float | None = None):
        self.limits = limits or RequestLimits()
        self.max_new_tokens = max_new_tokens  # the LLM's, as its ModelSpec's
        self.config = SimpleNamespace(ingress=SimpleNamespace(voice_first_piece_chars=80))
        self.words, self.word_s, self.transcribe_s = words, word_s, transcribe_s
        self.heard: list[float] = []  # seconds of audio each transcription was given
        self.closing = closing  # the LLM's end-of-turn probability for any words (semantic_vad)
        self.weighed: list[tuple[str, str | None]] = []  # the words end_of_turn was asked about, and the reply
        self.chats: list[list[dict]] = []
        self.calls: list[ChatParams] = []

    def default_model(self, family: Family) -> str:
        return {Family.LLM: "llm", Family.TTS: "tts", Family.STT: "stt"}[family]

    def spec(self, name: str, *families: Family, param: str = "model") -> SimpleNamespace:
        if name not in ("llm", "tts", "stt"):
            raise InvalidRequestError(f"The model {name!r} does not exist.", param=param)
        return SimpleNamespace(name=name, max_new_tokens=self.max_new_tokens)

    async def chat_params(self, spec, messages: list[dict], wait_s: float, **sampling) -> ChatParams:
        self.chats.append(messages)
        self.calls.append(ChatParams(model=spec.name, messages=messages, wait_s=wait_s, **sampling))
        return self.calls[-1]

    def voice_priority(self, spec) -> int:
        return 0

    def _tts_chars(self) -> int:
        return 400

    async def chat_stream(self, params: ChatParams):
        if params.max_new_tokens is not None and params.max_new_tokens > self.max_new_tokens:  # as chat_server's
            raise InvalidRequestError(f"max_tokens={params.max_new_tokens} exceeds the limit of model "
                                      f"{params.model!r} ({self.max_new_tokens})", param="max_tokens")
        for i in range(self.words):
            await asyncio.sleep(self.word_s)
            yield {"delta": f"w{i} "}
        yield {"finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": self.words}}

    async def synthesize_stream(self, params):
        yield SpeechResult(np.zeros(1600, dtype=np.float32), 16000, tokens=1)

    async def transcribe(self, params) -> TranscribeResult:
        self.heard.append(len(params.audio) / params.sample_rate)
        await asyncio.sleep(self.transcribe_s)
        return TranscribeResult(f"turn{len(self.heard)}", "en", len(params.audio) / params.sample_rate, [], [])

    async def check_transcription_language(self, model: str, language: str) -> None:
        """Every language is known to the scripted STT."""

    async def end_of_turn(self, model: str, heard: str, answered: str | None) -> float | None:
        self.weighed.append((heard, answered))
        await asyncio.sleep(0)  # an answer at the next turn of the loop: the tests pace audio at 10 ms a block
        return self.closing


def speech(seconds: tuple[float, float] = (0.0, 4.0)) -> np.ndarray:
    samples, rate = sf.read(SPEECH, dtype="float32")
    piece = samples[int(seconds[0] * rate):int(seconds[1] * rate)]
    return (resample(piece, rate, RATE) * 32767).astype("<i2")


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype="<i2")


async def append(session: RealtimeSession, audio: np.ndarray, block: int = 2400, pace_s: float = 0.0) -> None:
    for i in range(0, len(audio), block):
        piece = base64.b64encode(audio[i:i + block].astype("<i2").tobytes()).decode()
        await session.handle(json.dumps({"type": "input_audio_buffer.append", "audio": piece}))
        if pace_s:
            await asyncio.sleep(pace_s)


async def settle(session: RealtimeSession, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        weighing = session.pause.task if session.pause is not None else None
        busy = [t for t in [session.response, *session.transcriptions, weighing] if t is not None and not t.done()]
        if not busy:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the session's work never ended")


def turns(socket: Socket) -> list[tuple[str, int]]:
    return [(event["type"].removeprefix("input_audio_buffer.speech_"),
             event.get("audio_start_ms", event.get("audio_end_ms")))
            for event in socket.sent if event["type"].startswith("input_audio_buffer.speech_")]


def test_turns_do_not_depend_on_how_the_audio_is_cut_into_appends():
    """A browser's AudioWorklet sends 128-sample blocks. Each append was resampled to 16 kHz on its own,
    its length rounded up: the detector's clock ran ahead (123.55 s heard for 122.60 s sent) and the
    start of an utterance after two minutes was cut off."""

    async def run(block: int) -> tuple[list, list]:
        socket, ingress = Socket(), ScriptedIngress()
        session = RealtimeSession(socket, ingress, None)
        await append(session, np.concatenate([silence(20.0), speech(), silence(1.0)]), block)
        await settle(session)
        return turns(socket), [round(s, 2) for s in ingress.heard]

    large, small = asyncio.run(run(2400)), asyncio.run(run(128))
    assert small == large
    # a start is where its turn's audio begins: prefix_padding_ms (300) before the speech heard
    assert large[0][:4] == [("started", 19956), ("stopped", 20992), ("started", 21684), ("stopped", 23680)]


def test_turn_detection_switched_on_mid_session_hears_from_then_on():
    """A new detector counted its samples from 0 while the stream did not: its first turn was placed at
    the session's start and committed nothing."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress()
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
        await append(session, silence(5.0))
        await session.handle(json.dumps({"type": "session.update", "session": {
            "turn_detection": {"type": "server_vad"}}}))
        await append(session, np.concatenate([speech((0.0, 1.5)), silence(1.0)]))
        await settle(session)
        return turns(socket), ingress.heard

    detected, heard = asyncio.run(scenario())
    assert detected[0] == ("started", 4956)  # speech at 5256 ms, less the 300 ms prefix padding
    assert len(heard) == 1 and heard[0] > 0.9


def test_a_long_turn_is_committed_when_the_buffer_fills_and_the_session_goes_on():
    """Under server VAD, speech longer than max_realtime_buffer_seconds filled the buffer, every later
    append was refused (the silence that would end the turn too), and the session was stuck."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress(RequestLimits(max_realtime_buffer_seconds=1.5))
        session = RealtimeSession(socket, ingress, None)
        await append(session, np.concatenate([speech((1.9, 3.7)), speech((1.9, 3.7)), silence(1.5)]))
        await settle(session)
        return socket, ingress

    socket, ingress = asyncio.run(scenario())
    assert socket.of("error") == []
    assert len(ingress.heard) >= 2 and all(seconds <= 1.5 for seconds in ingress.heard)
    assert turns(socket)[-1][0] == "stopped"


def test_a_turn_transcribed_while_the_user_speaks_again_is_answered_with_the_next():
    """Turn 1's transcript came while turn 2 was being spoken; its response then ran through turn 2, and
    turn 2, transcribed meanwhile, never got one."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress(words=12, word_s=0.25, transcribe_s=1.0)
        session = RealtimeSession(socket, ingress, None)
        await append(session, np.concatenate([speech(), silence(1.5)]), pace_s=0.1)  # in real time
        await settle(session, 20)
        return socket, ingress

    socket, ingress = asyncio.run(scenario())
    assert len(socket.of("input_audio_buffer.committed")) == 2
    answered = {m["content"] for chat in ingress.chats for m in chat if m["role"] == "user"}
    assert {"turn1", "turn2"} <= answered
    assert all(event["response"]["status"] == "completed" for event in socket.of("response.done"))


def test_response_cancel_does_not_cancel_the_users_transcription():
    """A response waits for the last turn's transcription; cancelling the response cancelled the
    transcription too, and the user's item kept no transcript."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress(transcribe_s=0.3)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "turn_detection": None, "input_audio_transcription": {"model": "stt"}}}))
        await append(session, speech((0.2, 1.0)))
        for kind in ("input_audio_buffer.commit", "response.create", "response.cancel"):
            await session.handle(json.dumps({"type": kind}))
        await settle(session)
        return socket, session

    socket, session = asyncio.run(scenario())
    assert [e["response"]["status"] for e in socket.of("response.done")] == ["cancelled"]
    assert [e["transcript"] for e in socket.of("conversation.item.input_audio_transcription.completed")] == ["turn1"]
    assert [item.text for item in session.items if item.role == "user"] == ["turn1"]


def test_response_cancel_stops_the_response_and_the_turn_waiting_for_it_is_answered():
    """Turn 2 was transcribed while turn 1's answer ran (interrupt_response off), so it waited for that answer
    to end; a response.cancel of turn 1's answer dropped turn 2 too, and it was never answered. response.cancel
    stops a response, not the user's next turn."""

    async def until(condition, seconds: float = 10) -> None:
        for _ in range(int(seconds / 0.02)):
            if condition():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the session never got there")

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress(words=12, word_s=0.25, transcribe_s=0.2)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "turn_detection": {"type": "server_vad", "interrupt_response": False}}}))
        await append(session, np.concatenate([speech((0.2, 1.0)), silence(1.5)]))  # one turn
        await until(lambda: socket.of("response.created"))
        await append(session, np.concatenate([speech((0.2, 1.0)), silence(1.5)]))  # one turn
        await until(lambda: session.respond_after)  # turn 2 is heard and waits for the answer in progress
        await session.handle(json.dumps({"type": "response.cancel"}))
        await settle(session, 20)
        return socket, ingress

    socket, ingress = asyncio.run(scenario())
    assert [e["response"]["status"] for e in socket.of("response.done")] == ["cancelled", "completed"]
    assert [m["content"] for m in ingress.chats[-1] if m["role"] == "user"][-1] == "turn2"


def test_a_response_cancelled_as_it_starts_still_ends_with_response_done():
    async def scenario():
        socket = Socket(send_delay=0.02)
        session = RealtimeSession(socket, ScriptedIngress(), None)
        await session.handle(json.dumps({"type": "response.create"}))
        await session.handle(json.dumps({"type": "response.cancel"}))
        await settle(session)
        return socket

    socket = asyncio.run(scenario())
    assert [e["response"]["status"] for e in socket.of("response.done")] == ["cancelled"]
    assert len(socket.of("response.created")) == 1


def test_a_refused_session_update_changes_nothing_and_limits_are_checked():
    async def scenario():
        socket = Socket()
        session = RealtimeSession(socket, ScriptedIngress(), None)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "instructions": "Answer in pirate speak.", "tools": [{"type": "function", "name": "f",
                                                                 "parameters": {"type": "string"}}]}}))
        await session.handle(json.dumps({"type": "session.update", "session": {
            "instructions": "Be terse.", "input_audio_transcription": {"model": "nope"}}}))
        await session.handle(json.dumps({"type": "session.update", "session": {"max_response_output_tokens": -5}}))
        await session.handle(json.dumps({"type": "response.create", "response": {"max_output_tokens": 0}}))
        return socket, session

    socket, session = asyncio.run(scenario())
    params = [event["error"]["param"] for event in socket.of("error")]
    assert params == ["session.tools.0.parameters", "session.input_audio_transcription.model",
                      "session.max_response_output_tokens", "response.max_output_tokens"]
    assert session.config.instructions == "" and socket.of("session.updated") == []
    assert session.response is None


def test_ga_events_with_the_wrong_nested_types_are_the_clients_error():
    async def scenario():
        socket = Socket(ga=True)
        session = RealtimeSession(socket, ScriptedIngress(), None)
        await session.handle(json.dumps({"type": "session.update", "session": {"audio": {"input": "x"}}}))
        await session.handle(json.dumps({"type": "response.create", "response": {"audio": {"output": [1]}}}))
        return socket

    errors = [event["error"] for event in asyncio.run(scenario()).of("error")]
    assert [(e["type"], e["code"], e["param"]) for e in errors] == [
        ("invalid_request_error", "invalid_value", "session.audio.input"),
        ("invalid_request_error", "invalid_value", "response.audio.output")]


def test_events_get_the_json_checks_of_an_http_body_and_their_size_is_counted_in_bytes(caplog):
    """A deeply nested event raised RecursionError (an internal_error event, 'Unhandled error' logged); the
    guard's checks (depth, huge integers, lone surrogates) were not applied; max_realtime_event_bytes was
    compared with characters, so 600k three-byte characters passed a 1 MiB limit."""
    limit = 64 * 1024

    async def scenario():
        socket = Socket()
        session = RealtimeSession(socket, ScriptedIngress(RequestLimits(max_realtime_event_bytes=limit)), None)
        await session.handle('{"type": "session.update", "session": {"x": ' + "[" * 20_000 + "]" * 20_000 + "}}")
        await session.handle('{"type": "session.update", "session": {"instructions": "hi \\ud800"}}')
        await session.handle('{"type": "response.create", "response": {"max_output_tokens": ' + "9" * 30 + "}}")
        euros = json.dumps({"type": "session.update", "session": {"instructions": "\u20ac" * (limit // 3 + 1)}},
                           ensure_ascii=False)
        assert len(euros) < limit < len(euros.encode())
        await session.handle(euros)
        await session.handle(euros.encode())  # a binary frame, counted and read the same
        await session.handle(b'{"type": "session.update", "session": {"instructions": "\xff"}}')
        # the session goes on: a good event after them all is served
        await session.handle(json.dumps({"type": "session.update", "session": {"instructions": "Be terse."}}))
        await session.handle(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}).encode())
        return socket, session

    with caplog.at_level("ERROR"):
        socket, session = asyncio.run(scenario())
    errors = [(e["error"]["type"], e["error"]["code"]) for e in socket.of("error")]
    assert errors == [("invalid_request_error", "json_too_deep"), ("invalid_request_error", "invalid_unicode"),
                      ("invalid_request_error", "integer_out_of_range"), ("invalid_request_error", "event_too_large"),
                      ("invalid_request_error", "event_too_large"), ("invalid_request_error", "invalid_json")], errors
    assert "max_json_depth" in socket.of("error")[0]["error"]["message"]
    assert "max_realtime_event_bytes" in socket.of("error")[3]["error"]["message"]
    assert socket.of("error")[1]["error"]["param"] == "session.instructions"
    assert len(socket.of("session.updated")) == 2 and session.config.instructions == "Be brief."
    assert "Unhandled error" not in caplog.text


def test_a_commit_under_server_vad_takes_all_the_audio_kept():
    """While the detector heard no speech, every append trimmed the buffer to the padding (0.4 s): speech it
    missed (here under heavy noise) was gone when the client committed. OpenAI's commit takes the buffer;
    a session listening to silence stays within max_realtime_buffer_seconds by forgetting the oldest audio."""

    async def scenario(limits: RequestLimits | None, audio: np.ndarray) -> tuple[Socket, ScriptedIngress]:
        socket, ingress = Socket(), ScriptedIngress(limits) if limits else ScriptedIngress()
        session = RealtimeSession(socket, ingress, None)
        await append(session, audio)
        await session.handle(json.dumps({"type": "input_audio_buffer.commit"}))
        await settle(session)
        return socket, ingress

    clean = speech((1.9, 3.7)).astype(np.float32)
    noisy = clean + np.random.default_rng(0).normal(0, 3 * clean.std(), len(clean))  # -10 dB SNR
    socket, ingress = asyncio.run(scenario(None, np.clip(noisy, -32768, 32767).astype("<i2")))
    assert turns(socket) == []  # the detector heard no speech
    assert ingress.heard == [pytest.approx(len(clean) / RATE, abs=0.01)]  # was 0.4 s

    socket, ingress = asyncio.run(scenario(RequestLimits(max_realtime_buffer_seconds=2.0), silence(7.0)))
    assert not [e for e in socket.sent if e["type"] == "error"]  # silence past the bound is no error
    assert ingress.heard == [pytest.approx(2.0, abs=0.01)]  # the last 2 s


def test_speech_after_silence_past_the_buffer_bound_is_one_turn():
    """Silence kept up to max_realtime_buffer_seconds left the buffer full when speech began, so the
    turn's first append committed 0.37 s of it and the rest became a second turn with a second reply."""

    async def scenario(silence_s: float) -> tuple[Socket, ScriptedIngress]:
        socket, ingress = Socket(), ScriptedIngress(RequestLimits(max_realtime_buffer_seconds=10.0))
        session = RealtimeSession(socket, ingress, None)
        await append(session, np.concatenate([silence(silence_s), speech((1.9, 3.7)), silence(1.5)]))
        await settle(session)
        return socket, ingress

    for silence_s in (3.0, 12.0):  # within the bound, and past it
        socket, ingress = asyncio.run(scenario(silence_s))
        assert [kind for kind, _ in turns(socket)] == ["started", "stopped"], silence_s
        assert len(ingress.heard) == 1 and ingress.heard[0] > 1.5, (silence_s, ingress.heard)


def test_response_create_refuses_what_it_does_not_serve():
    """`conversation: none` (out of band) and `input` were dropped in silence: an out-of-band request ran over
    the whole conversation and its answer joined it; then they were refused; now they are served (the tests of
    out-of-band responses below), and what cannot be is refused by name. (A response's `tools` and
    `tool_choice` are served: a tool_choice that needs tools, with none, is refused.)"""

    async def scenario(response: dict) -> list[dict]:
        socket, ingress = Socket(), ScriptedIngress()
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}))
        await session.handle(json.dumps({"type": "response.create", "response": response}))
        await settle(session)
        return [e for e in socket.sent if e["type"] in ("error", "response.created")]

    for response, param in [({"conversation": "conv_elsewhere"}, "response.conversation"),
                            ({"input": [{"type": "message", "role": "user", "content": []}]},
                             "response.input.0.content")]:
        sent = asyncio.run(scenario(response))
        assert [(e["type"], e["error"]["param"]) for e in sent] == [("error", param)], (response, sent)
    sent = asyncio.run(scenario({"tool_choice": "required"}))
    assert [(e["type"], e["error"]["param"]) for e in sent] == [("error", "response.tool_choice")], sent
    assert [e["type"] for e in asyncio.run(scenario({"conversation": "auto", "tool_choice": "none"}))] == [
        "response.created"]


def _say(text: str, role: str = "user", item_id: str | None = None, **fields) -> str:
    """A conversation.item.create of a text message; `fields`: the event's own (previous_item_id)."""
    item = {"type": "message", "role": role, "content": [{"type": "input_text", "text": text}]}
    return json.dumps({"type": "conversation.item.create", **fields,
                       "item": {**item, **({"id": item_id} if item_id else {})}})


class FailingFirstChat(ScriptedIngress):
    """Its first chat fails before any text (the LLM family's 503)."""

    async def chat_stream(self, params: ChatParams):
        if len(self.calls) == 1:
            raise ServiceUnavailableError("the llm deployment did not start streaming within 120 s", code="timeout")
        async for chunk in super().chat_stream(params):
            yield chunk


def test_a_response_that_said_nothing_is_not_in_later_prompts():
    """A failed response (or one cancelled before its first token) left an empty assistant item, which
    later prompts sent as the assistant saying "(silence)": words it never said, that it then imitates."""

    async def scenario():
        socket, ingress = Socket(), FailingFirstChat()
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
        for text in ("hello", "are you there?"):
            await session.handle(_say(text))
            await session.handle(json.dumps({"type": "response.create", "response": {"modalities": ["text"]}}))
            await settle(session)
        return socket, ingress

    socket, ingress = asyncio.run(scenario())
    assert [e["response"]["status"] for e in socket.of("response.done")] == ["failed", "completed"]
    assert ingress.chats[-1] == [{"role": "user", "content": "hello"}, {"role": "user", "content": "are you there?"}]


def test_ga_content_parts_keep_the_part_types_of_the_ga_events():
    """GA renames content types inside items (output_text, output_audio), but a content_part event's
    `part` is "text" | "audio" in the GA types too: the renamed part was rejected by the official client."""

    async def scenario(modalities: list[str]) -> Socket:
        socket = Socket(ga=True)
        session = RealtimeSession(socket, ScriptedIngress(), None)
        await session.handle(json.dumps({"type": "session.update", "session": {"output_modalities": modalities}}))
        await session.handle(_say("hi"))
        await session.handle(json.dumps({"type": "response.create"}))
        await settle(session)
        return socket

    for modalities, kind in ((["text"], "text"), (["audio"], "audio")):
        socket = asyncio.run(scenario(modalities))
        parts = [e["part"]["type"] for e in socket.sent if e["type"].startswith("response.content_part.")]
        assert parts == [kind, kind], parts
        done = socket.of("response.output_item.done")[0]
        assert done["item"]["content"][0]["type"] == f"output_{kind}"


def test_response_cancel_cancels_only_the_response_it_names():
    """response_id was ignored: a cancel for a response that had ended (crossing the start of the next)
    cancelled the next one."""

    async def scenario():
        socket = Socket()
        session = RealtimeSession(socket, ScriptedIngress(words=20, word_s=0.02), None)
        await session.handle(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
        await session.handle(_say("hi"))
        await session.handle(json.dumps({"type": "response.create"}))
        await settle(session)
        first = socket.of("response.done")[0]["response"]["id"]
        await session.handle(json.dumps({"type": "response.create"}))
        await asyncio.sleep(0.1)
        await session.handle(json.dumps({"type": "response.cancel", "response_id": first}))
        await settle(session)
        await session.handle(json.dumps({"type": "response.create"}))
        await asyncio.sleep(0.1)
        third = socket.of("response.created")[-1]["response"]["id"]
        await session.handle(json.dumps({"type": "response.cancel", "response_id": third}))
        await settle(session)
        return socket, first

    socket, first = asyncio.run(scenario())
    assert [e["response"]["status"] for e in socket.of("response.done")] == ["completed", "completed", "cancelled"]
    [error] = socket.of("error")
    assert (error["error"]["code"], error["error"]["param"]) == ("response_cancel_not_active", "response_id")
    assert first in error["error"]["message"]


def test_conversation_item_create_inserts_after_previous_item_id():
    """previous_item_id was ignored: every item was appended (a note put at the 'root' came after the
    latest turn), and an id of no item was accepted."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress(words=1)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
        await session.handle(_say("first", item_id="a"))
        await session.handle(_say("second"))
        await session.handle(_say("ROOT NOTE", "system", previous_item_id="root"))
        await session.handle(_say("after first", previous_item_id="a"))
        await session.handle(_say("after nothing", previous_item_id="item_does_not_exist"))
        await session.handle(json.dumps({"type": "response.create", "response": {"modalities": ["text"]}}))
        await settle(session)
        return socket, ingress, session

    socket, ingress, session = asyncio.run(scenario())
    assert [m["content"] for m in ingress.chats[-1]] == ["ROOT NOTE", "first", "after first", "second"]
    created = [(e["previous_item_id"], e["item"]["content"][0].get("text")) for e in
               socket.of("conversation.item.created")]
    second_id = session.items[3].id
    assert created == [(None, "first"), ("a", "second"), (None, "ROOT NOTE"), ("a", "after first"),
                       (second_id, "")]  # the reply, after the last item
    [error] = socket.of("error")
    assert error["error"]["param"] == "previous_item_id" and "item_does_not_exist" in error["error"]["message"]

    async def full() -> list[str]:  # at max_realtime_items, the oldest other item makes room
        session = RealtimeSession(Socket(), ScriptedIngress(RequestLimits(max_realtime_items=2)), None)
        for text, where in (("a", None), ("b", None), ("note", "root")):
            await session.handle(_say(text, **({"previous_item_id": where} if where else {})))
        return [item.text for item in session.items]

    assert asyncio.run(full()) == ["note", "b"]


class LoadingStt(ScriptedIngress):
    async def transcribe(self, params) -> TranscribeResult:
        raise ServiceUnavailableError("Model 'stt' is still loading (loading weights); retry in 2 s.",
                                      retry_after_s=2, code="model_loading")


def test_a_failed_transcription_is_an_error_event_when_transcription_events_are_off():
    """With input_audio_transcription null (no transcription events), a failed transcription still sent
    ...input_audio_transcription.failed, and nothing said why the turn got no answer."""

    async def scenario(transcription: dict | None) -> Socket:
        socket = Socket()
        session = RealtimeSession(socket, LoadingStt(), None)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "input_audio_transcription": transcription}}))
        await append(session, np.concatenate([speech((0.0, 1.5)), silence(1.0)]))
        await settle(session)
        return socket

    socket = asyncio.run(scenario(None))
    assert [e["type"] for e in socket.sent if "transcription" in e["type"]] == []
    [error] = socket.of("error")
    item = socket.of("input_audio_buffer.committed")[0]["item_id"]
    assert error["error"]["code"] == "model_loading" and item in error["error"]["message"]
    assert "not answered" in error["error"]["message"] and socket.of("response.created") == []

    socket = asyncio.run(scenario({"model": "stt"}))  # asked for: the event that says so
    assert len(socket.of("conversation.item.input_audio_transcription.failed")) == 1 and socket.of("error") == []


def test_output_tokens_above_the_models_limit_are_capped_at_it():
    """max_response_output_tokens=4096 (OpenAI's documented maximum, which clients send) was accepted and
    then failed every response of a model whose max_new_tokens is smaller."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress(max_new_tokens=32)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "turn_detection": None, "modalities": ["text"], "max_response_output_tokens": 4096}}))
        await session.handle(_say("hi"))
        for response in ({}, {"max_output_tokens": 10}, {"max_output_tokens": "inf"}, {"max_output_tokens": 33}):
            await session.handle(json.dumps({"type": "response.create", "response": response}))
            await settle(session)
        return socket, ingress

    socket, ingress = asyncio.run(scenario())
    assert socket.of("error") == []
    assert [e["response"]["status"] for e in socket.of("response.done")] == ["completed"] * 4
    # asked for explicitly: the prompt must leave the reply that room (see the reply-room test)
    assert [call.max_new_tokens for call in ingress.calls] == [32, 10, 32, 32]
    assert socket.of("session.updated")[0]["session"]["max_response_output_tokens"] == 4096


class WhisperIngress(ScriptedIngress):
    """Transcribes with a real (tiny) Whisper, in-process."""

    def __init__(self, server: STTServer):
        super().__init__()
        self.server = server

    async def transcribe(self, params: TranscribeParams) -> TranscribeResult:
        return await self.server.transcribe(params)

    async def check_transcription_language(self, model: str, language: str) -> None:
        await self.server.check_language(model, language)


def test_a_language_the_stt_model_does_not_know_is_refused_at_session_update(tmp_path):
    """session.update took any two-letter language; then every turn failed to transcribe and was never
    answered. /v1/audio/transcriptions refuses it (400 on `language`); so does session.update now, and the
    check costs no model call."""
    source = build_tiny("stt", tmp_path / "tiny-whisper")
    server = STTServer([ModelSpec(name="stt", source=str(source))],
                       TranscriptionOptions(memory_budget_mb=4096, fallback_temperatures=[0.0]))

    async def scenario():
        await server.transcribe(TranscribeParams(model="stt", audio=np.zeros(1600, np.float32), sample_rate=16000,
                                                 wait_s=60))  # loaded: the check needs the model
        calls = server.batch_stats["model_calls"]
        socket = Socket()
        session = RealtimeSession(socket, WhisperIngress(server), None)
        for language in ("xx", "EN"):
            await session.handle(json.dumps({"type": "session.update", "session": {
                "instructions": language, "input_audio_transcription": {"model": "stt", "language": language}}}))
        return socket, session, server.batch_stats["model_calls"] - calls

    socket, session, model_calls = asyncio.run(scenario())
    [error] = socket.of("error")
    assert error["error"]["param"] == "session.input_audio_transcription.language"
    assert "'xx' is not supported" in error["error"]["message"] and "use one of" in error["error"]["message"]
    [updated] = socket.of("session.updated")  # the refused update changed nothing
    assert updated["session"]["instructions"] == "EN" and session.config.transcription.language == "EN"
    assert model_calls == 0


class SmallContext(ScriptedIngress):
    """An LLM whose context holds `context` characters of messages (context_length_exceeded past it)."""

    def __init__(self, context: int):
        super().__init__(words=3)
        self.context = context

    async def chat_stream(self, params: ChatParams):
        size = sum(len(m["content"]) for m in params.messages)
        if size > self.context:
            raise InvalidRequestError(f"This model's maximum context length is {self.context} tokens, but you "
                                      f"requested {size} tokens in the messages.", param="messages",
                                      code="context_length_exceeded")
        async for chunk in super().chat_stream(params):
            yield chunk


def test_a_conversation_longer_than_the_context_leaves_its_oldest_items_out_of_the_prompt():
    """The whole conversation went to the LLM each turn: once it outgrew the context every response failed
    (context_length_exceeded) for good. As OpenAI's truncation 'auto', the oldest items are left out of
    the prompt (the instructions and system items stay); they stay in the conversation."""

    async def scenario(context: int):
        socket, ingress = Socket(), SmallContext(context)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "turn_detection": None, "modalities": ["text"], "instructions": "Be brief."}}))
        await session.handle(_say("NOTE", "system"))
        for turn in range(20):
            await session.handle(_say(f"Turn {turn}: tell me about the weather."))
            await session.handle(json.dumps({"type": "response.create"}))
            await settle(session)
        return socket, ingress, session

    socket, ingress, session = asyncio.run(scenario(300))
    assert [e["response"]["status"] for e in socket.of("response.done")] == ["completed"] * 20
    assert len(session.items) == 41  # left out of prompts, not out of the conversation
    last = ingress.chats[-1]
    assert last[:2] == [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "NOTE"}]
    assert last[-1] == {"role": "user", "content": "Turn 19: tell me about the weather."}
    assert sum(len(m["content"]) for m in last) <= 300 and len(last) > 4
    assert len(ingress.calls) - 20 <= 8  # a later turn starts from where the last one had to (few retries)

    socket, ingress, session = asyncio.run(scenario(40))  # not even the last turn fits: the error says so
    assert {e["response"]["status"] for e in socket.of("response.done")} == {"failed"}
    assert {e["error"]["code"] for e in socket.of("error")} == {"context_length_exceeded"}


class ReplyRoom(SmallContext):
    """An LLM whose context must hold the messages and the reply's max_new_tokens (None: what is left)."""

    def __init__(self, context: int, max_new_tokens: int):
        super().__init__(context)
        self.max_new_tokens = max_new_tokens

    async def chat_stream(self, params: ChatParams):
        size = sum(len(m["content"]) for m in params.messages) + (params.max_new_tokens or 0)
        if size > self.context:
            raise InvalidRequestError(f"This model's maximum context length is {self.context} tokens, but you "
                                      f"requested {size} tokens.", param="messages", code="context_length_exceeded")
        async for chunk in ScriptedIngress.chat_stream(self, params):
            yield chunk


def test_a_reply_keeps_its_room_and_the_oldest_items_make_it():
    """With 'inf' the reply was asked for with no max_tokens, so near the context edge the LLM cut it to
    what was left (4 of 48 tokens in the review's run) instead of the oldest items being left out. OpenAI's
    truncation keeps room for the output; where even the newest turn leaves less, the reply gets what fits.
    A conversation with no user item that must be shortened was a StopIteration (internal_error)."""

    async def scenario(context: int, items: list[str]):
        socket, ingress = Socket(), ReplyRoom(context, max_new_tokens=100)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "turn_detection": None, "modalities": ["text"], "max_response_output_tokens": "inf"}}))
        for text in items:
            role, _, said = text.partition(":")
            await session.handle(_say(said, role))
            if role == "user":
                await session.handle(json.dumps({"type": "response.create"}))
                await settle(session)
        if items[-1].startswith("system"):
            await session.handle(json.dumps({"type": "response.create"}))
            await settle(session)
        return socket, ingress

    turns = [f"user:Turn {turn}: tell me about the weather today." for turn in range(12)]
    socket, ingress = asyncio.run(scenario(400, turns))
    assert [e["response"]["status"] for e in socket.of("response.done")] == ["completed"] * 12
    answered = [call for call in ingress.calls if call.max_new_tokens == 100]
    assert len(answered) >= 12 and all(call.max_new_tokens == 100 for call in ingress.calls)  # never cut short

    socket, ingress = asyncio.run(scenario(120, ["user:" + "x" * 60]))  # the turn alone leaves less than 100
    assert [e["response"]["status"] for e in socket.of("response.done")] == ["completed"]
    assert [call.max_new_tokens for call in ingress.calls][-1] is None  # the reply gets what fits

    socket, ingress = asyncio.run(scenario(300, ["assistant:" + "y" * 240, "system:Be brief."]))
    assert [e["response"]["status"] for e in socket.of("response.done")] == ["completed"]


def test_session_texts_are_bounded_and_a_long_append_is_heard_off_the_event_loop(monkeypatch):
    """The transcription prompt had no bound (3.9 M characters taken, then tokenized at every turn: 62.7 s and
    +1.2 GB in the STT replica), nor response.create's instructions; and one append of ~59 s ran the
    resampler and VAD on the ingress's event loop (0.5-0.8 s of every other request's time)."""
    import threading

    from deployments.vad import TurnDetector

    fed_on: list[bool] = []
    feed = TurnDetector.feed
    monkeypatch.setattr(TurnDetector, "feed", lambda self, audio: fed_on.append(
        threading.current_thread() is threading.main_thread()) or feed(self, audio))
    limits = RequestLimits(max_form_field_chars=1000)

    async def scenario():
        socket = Socket()
        session = RealtimeSession(socket, ScriptedIngress(limits), None)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "input_audio_transcription": {"model": "stt", "prompt": "a" * 1001}}}))
        await session.handle(json.dumps({"type": "response.create", "response": {"instructions": "b" * 1001}}))
        await session.handle(json.dumps({"type": "session.update", "session": {"turn_detection": {
            "type": "server_vad"}}}))
        await append(session, silence(0.1))  # an ordinary append: on the loop
        await append(session, np.concatenate([silence(1.0), speech((0.0, 4.0)), silence(2.0)]), block=10 * RATE)
        await settle(session)
        return socket, session

    socket, session = asyncio.run(scenario())
    errors = [(event["error"]["param"], event["error"]["code"]) for event in socket.of("error")]
    assert errors == [("session.input_audio_transcription.prompt", "string_above_max_length"),
                      ("response.instructions", "string_above_max_length")]
    assert session.config.transcription is None  # the refused update changed nothing
    assert fed_on[0] and not any(fed_on[1:]) and len(fed_on) >= 2
    assert [kind for kind, _ in turns(socket)] == ["started", "stopped", "started", "stopped"]  # heard as before


class ListeningSocket(Socket):
    """A client that stays connected and says nothing: receive() waits until the server closes."""

    def __init__(self):
        super().__init__()
        self.closed_with: list[int] = []
        self._gone = asyncio.Event()

    async def receive(self) -> dict:
        await self._gone.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def close(self, code: int = 1000) -> None:
        self.closed_with.append(code)
        self.application_state = WebSocketState.DISCONNECTED
        self._gone.set()


def test_a_session_past_max_realtime_session_s_is_closed_cleanly():
    """It sent `session_expired` and then left the socket unclosed (run() read the 'client left' flag after
    stop() had set it), so the client saw an abnormal closure (1006, no close frame) through the live app."""
    async def scenario():
        socket = ListeningSocket()
        session = RealtimeSession(socket, ScriptedIngress(RequestLimits(max_realtime_session_s=0.2)), None)
        await asyncio.wait_for(session.run(), 5)
        return socket

    socket = asyncio.run(scenario())
    assert [event["error"]["code"] for event in socket.of("error")] == ["session_expired"]
    assert socket.closed_with == [1000]


def _closing_events(socket: Socket, response_id: str) -> list[tuple[str, str | None]]:
    """(type, the item's status where the event carries the item) of a response's events after its deltas."""
    kinds = ("response.audio.done", "response.audio_transcript.done", "response.text.done",
             "response.content_part.done", "response.output_item.done", "response.done")
    out = []
    for event in socket.sent:
        if event["type"] in kinds and response_id in (event.get("response_id"), event.get("response", {}).get("id")):
            item = event.get("item") or next(iter(event.get("response", {}).get("output") or []), None)
            out.append((event["type"], item["status"] if item else None))
    return out


def test_every_part_a_response_opened_is_closed_however_it_ends():
    """A cancelled response (response.cancel, barge-in) sent output_item.added and content_part.added but none
    of their .done events, which OpenAI sends 'also when a Response is interrupted, incomplete, or cancelled'
    (clients such as the Agents SDK mark the item done by output_item.done: it stayed in_progress); and a
    reply cut at max_output_tokens had output_item.done say 'completed' while response.done said 'incomplete'."""
    class LongReplies(ScriptedIngress):
        async def chat_stream(self, params: ChatParams):
            async for chunk in super().chat_stream(params):
                if "finish_reason" in chunk:
                    chunk = {**chunk, "finish_reason": "length"}
                yield chunk

    async def scenario():
        socket = Socket()
        session = RealtimeSession(socket, LongReplies(words=30, word_s=0.02), None)
        await session.handle(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
        await session.handle(_say("hi"))
        await session.handle(json.dumps({"type": "response.create"}))
        for _ in range(100):
            if socket.of("response.audio_transcript.delta"):
                break
            await asyncio.sleep(0.01)
        await session.handle(json.dumps({"type": "response.cancel"}))
        await settle(session)
        await session.handle(json.dumps({"type": "response.create", "response": {"modalities": ["text"]}}))
        await settle(session)
        return socket

    socket = asyncio.run(scenario())
    cancelled, cut = (event["response"]["id"] for event in socket.of("response.created"))
    assert _closing_events(socket, cancelled) == [
        ("response.audio.done", None), ("response.audio_transcript.done", None), ("response.content_part.done", None),
        ("response.output_item.done", "incomplete"), ("response.done", "incomplete")]
    assert [e["response"]["status"] for e in socket.of("response.done")] == ["cancelled", "incomplete"]
    assert _closing_events(socket, cut) == [
        ("response.text.done", None), ("response.content_part.done", None),
        ("response.output_item.done", "incomplete"), ("response.done", "incomplete")]


def test_ga_errors_name_the_field_the_ga_client_sent():
    """A GA session.update was refused naming the beta field it had been translated to: a bad
    session.audio.input.turn_detection.type came back as 'session.turn_detection.type', and an
    audio.input.format of audio/pcmu as 'session.input_audio_format', 'Input should be pcm16' (a value
    the GA client cannot send)."""
    async def scenario():
        socket = Socket(ga=True)
        session = RealtimeSession(socket, ScriptedIngress(), None)
        for update in ({"audio": {"input": {"turn_detection": {"type": "push_to_talk"}}}},
                       {"audio": {"input": {"format": {"type": "audio/pcmu", "rate": 16000}}}},  # G.711 is 8 kHz
                       {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}},
                       {"audio": {"input": {"transcription": {"model": "nope"}}}},
                       {"audio": {"output": {"voice": "v" * 65}}},
                       {"output_modalities": ["video"]},
                       {"max_output_tokens": 0},
                       {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}},
                        "output_modalities": ["text"]}):
            await session.handle(json.dumps({"type": "session.update", "session": {"type": "realtime", **update}}))
        await session.handle(json.dumps({"type": "response.create", "response": {"output_modalities": []}}))
        return socket

    socket = asyncio.run(scenario())
    errors = [event["error"] for event in socket.of("error")]
    assert [e["param"] for e in errors] == [
        "session.audio.input.turn_detection.type", "session.audio.input.format", "session.audio.output.format",
        "session.audio.input.transcription.model", "session.audio.output.voice", "session.output_modalities.0",
        "session.max_output_tokens", "response.output_modalities"]
    assert "'session.audio.input.turn_detection.type'" in errors[0]["message"]
    assert "audio/pcmu" in errors[1]["message"] and '"rate": 24000' in errors[1]["message"]
    assert "pcm16'" not in errors[1]["message"]
    assert len(socket.of("session.updated")) == 1  # the valid update went through


def test_a_session_update_mid_speech_keeps_the_turn_under_way():
    """Any session.update that carried turn_detection (clients send their whole session with each update,
    here only new instructions) made a new detector: the turn under way was dropped (its speech_started
    never stopped nor committed), the new detector heard the rest as a new turn, and the audio before the
    update was cut from it (on the live app: 0.62 s of the 0.95 s turn transcribed)."""
    detection = {"type": "server_vad", "silence_duration_ms": 400, "create_response": False}

    async def scenario(update: bool):
        socket, ingress = Socket(), ScriptedIngress()
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "session.update", "session": {"turn_detection": detection}}))
        audio = np.concatenate([speech((0.0, 1.5)), silence(1.0)])
        await append(session, audio[:int(0.6 * RATE)])
        if update:
            await session.handle(json.dumps({"type": "session.update", "session": {
                "instructions": "Be brief.", "turn_detection": {**detection, "threshold": 0.6}}}))
        await append(session, audio[int(0.6 * RATE):])
        await settle(session)
        return turns(socket), ingress.heard, socket, session

    plain_turns, plain_heard, _, _ = asyncio.run(scenario(update=False))
    detected, heard, socket, session = asyncio.run(scenario(update=True))
    assert detected == plain_turns and len(detected) == 2
    assert heard == plain_heard
    started, committed = socket.of("input_audio_buffer.speech_started"), socket.of("input_audio_buffer.committed")
    assert [e["item_id"] for e in started] == [e["item_id"] for e in committed]
    assert session.detector is not None and session.detector.options.threshold == 0.6  # the new knobs apply


def test_an_item_id_the_conversation_has_already_is_refused():
    """conversation.item.create took an id the conversation had already: two items 'a', so previous_item_id
    'a' (and where a truncated prompt starts) meant the first of them, whichever the client meant."""
    async def scenario():
        socket, ingress = Socket(), ScriptedIngress(words=1)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(_say("first", item_id="a"))
        await session.handle(_say("second", item_id="a"))
        await session.handle(_say("third", item_id="b"))
        return socket, session

    socket, session = asyncio.run(scenario())
    assert [item.id for item in session.items] == ["a", "b"]
    [error] = socket.of("error")
    assert (error["error"]["param"], error["error"]["code"]) == ("item.id", "invalid_value")
    assert "'a'" in error["error"]["message"]


def test_a_session_type_is_realtime_or_transcription_and_changes_only_before_a_conversation():
    """A GA session.update with type 'transcription' was once taken as a conversation (session.updated said
    'realtime', every turn answered); then refused. Now it makes a transcription session; any other type is
    refused by name, and the type may change while the session has no conversation yet."""
    async def scenario():
        socket = Socket(ga=True)
        session = RealtimeSession(socket, ScriptedIngress(), None)
        for kind in ("translation", "transcription", "realtime"):
            await session.handle(json.dumps({"type": "session.update", "session": {"type": kind}}))
        return socket, session

    socket, session = asyncio.run(scenario())
    [error] = socket.of("error")
    assert (error["error"]["param"], error["error"]["code"]) == ("session.type", "invalid_value")
    assert '"translation"' in error["error"]["message"] and "'transcription'" in error["error"]["message"]
    assert [e["session"]["type"] for e in socket.of("session.updated")] == ["transcription", "realtime"]
    assert not session.transcribing


def test_a_browser_asking_for_the_beta_protocol_by_subprotocol_gets_it():
    """Browsers cannot set OpenAI-Beta on a WebSocket; OpenAI's beta has them offer the subprotocol
    'openai-beta.realtime-v1' instead (as the openai-realtime-api-beta client does). Such a client was
    spoken to in GA: its session.update's 'modalities' was dropped unread and its text came as
    response.output_text.delta, which a beta client does not know."""
    async def scenario(protocols: str):
        socket = Socket(ga=True)
        socket.headers = {"sec-websocket-protocol": protocols}
        session = RealtimeSession(socket, ScriptedIngress(), None)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "modalities": ["text"], "turn_detection": None}}))
        await session.handle(_say("hi"))
        await session.handle(json.dumps({"type": "response.create"}))
        await settle(session)
        return socket

    beta = asyncio.run(scenario("realtime, openai-insecure-api-key.sk-x, openai-beta.realtime-v1"))
    assert beta.of("session.updated")[0]["session"]["modalities"] == ["text"]
    assert beta.of("response.text.delta") and not beta.of("response.output_text.delta")
    ga = asyncio.run(scenario("realtime, openai-insecure-api-key.sk-x"))
    assert "output_modalities" in ga.of("session.updated")[0]["session"]


class SpokenSentences(ScriptedIngress):
    """A reply of three sentences, each spoken in two 50 ms pieces: 100 ms of audio a sentence."""

    REPLY = ("One two three. ", "Four five six. ", "Seven eight nine.")

    async def chat_stream(self, params: ChatParams):
        for part in self.REPLY:
            await asyncio.sleep(self.word_s)
            yield {"delta": part}
        yield {"finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 9}}

    async def synthesize_stream(self, params):
        for _ in range(2):
            yield SpeechResult(np.zeros(1200, dtype=np.float32), RATE, tokens=1)


def _event(kind: str, **fields) -> str:
    return json.dumps({"type": kind, **fields})


def test_truncate_keeps_what_was_heard_and_delete_and_retrieve_serve_items():
    """conversation.item.truncate (a client that stopped playback at a barge-in), .delete and .retrieve were
    refused as unknown events, so the next prompt held every word of a reply the user heard a third of."""

    async def scenario():
        socket, ingress = Socket(), SpokenSentences()
        session = RealtimeSession(socket, ingress, None)
        await session.handle(_event("session.update", session={"turn_detection": None}))
        await session.handle(_say("hello", item_id="q1"))
        await session.handle(_event("response.create"))
        await settle(session)
        reply = socket.of("response.done")[-1]["response"]["output"][0]["id"]
        for bad, param in (({"item_id": "nope", "audio_end_ms": 10}, "item_id"),
                           ({"item_id": "q1", "audio_end_ms": 10}, "item_id"),
                           ({"item_id": reply, "audio_end_ms": 301}, "audio_end_ms"),
                           ({"item_id": reply, "audio_end_ms": -1}, "audio_end_ms"),
                           ({"item_id": reply, "audio_end_ms": 10, "content_index": 1}, "content_index")):
            await session.handle(_event("conversation.item.truncate", **bad))
            assert socket.sent[-1]["type"] == "error" and socket.sent[-1]["error"]["param"] == param, socket.sent[-1]
        await session.handle(_event("conversation.item.truncate", item_id=reply, content_index=0, audio_end_ms=150))
        truncated = socket.sent[-1]
        await session.handle(_event("conversation.item.retrieve", item_id=reply))
        retrieved = socket.sent[-1]
        await session.handle(_say("go on"))
        await session.handle(_event("conversation.item.delete", item_id="q1"))
        deleted = socket.sent[-1]
        await session.handle(_event("response.create", response={"modalities": ["text"]}))
        await settle(session)
        # a truncate of the item a response is still writing ends that response first
        ingress.word_s = 0.5
        await session.handle(_event("response.create"))
        await asyncio.sleep(0.1)
        await session.handle(_event("conversation.item.truncate", item_id=session.response_item.id, audio_end_ms=0))
        return socket, ingress, session, truncated, retrieved, deleted

    socket, ingress, session, truncated, retrieved, deleted = asyncio.run(scenario())
    assert (truncated["type"], truncated["audio_end_ms"], truncated["content_index"]) == \
        ("conversation.item.truncated", 150, 0), truncated
    # 150 ms: the first sentence whole, half of the second ('Four fi'), back to the last whole word
    assert retrieved["item"]["content"] == [{"type": "audio", "transcript": "One two three. Four"}], retrieved
    assert (deleted["type"], deleted["item_id"]) == ("conversation.item.deleted", "q1")
    assert ingress.chats[1] == [{"role": "assistant", "content": "One two three. Four"},
                                {"role": "user", "content": "go on"}]
    assert socket.of("response.done")[-1]["response"]["status"] == "cancelled"
    assert socket.sent[-1]["type"] == "conversation.item.truncated" and session.response_item.text == ""


def test_a_turn_deleted_while_it_is_transcribed_is_not_answered():
    """Server VAD committed a turn and the client deleted its item (conversation.item.delete) before the
    transcript came: the turn was answered all the same, a reply to a prompt of '(silence)' (or, later in a
    conversation, a second answer to the turn before it)."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress(transcribe_s=0.5)
        session = RealtimeSession(socket, ingress, None)
        await append(session, np.concatenate([silence(0.5), speech((0.0, 1.2)), silence(1.0)]))
        turn = socket.of("input_audio_buffer.committed")[0]["item_id"]
        await session.handle(_event("conversation.item.delete", item_id=turn))
        await settle(session)
        return socket, ingress

    socket, ingress = asyncio.run(scenario())
    assert socket.of("conversation.item.deleted") and ingress.heard, socket.sent
    assert socket.of("response.created") == [] and ingress.chats == [], ingress.chats


def test_a_refused_truncate_of_the_item_being_written_leaves_its_response_running():
    """A truncate of the item a response was writing ended that response before its audio_end_ms was checked:
    one past the audio sent so far got its error event and the reply was cancelled all the same."""

    async def scenario():
        socket, ingress = Socket(), SpokenSentences(word_s=0.3)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(_event("session.update", session={"turn_detection": None}))
        await session.handle(_say("hello"))
        await session.handle(_event("response.create"))
        await asyncio.sleep(0.45)  # its first sentence spoken (100 ms of audio), the rest on its way
        await session.handle(_event("conversation.item.truncate", item_id=session.response_item.id,
                                    audio_end_ms=99999))
        refused = socket.sent[-1]
        await settle(session)
        return socket, refused

    socket, refused = asyncio.run(scenario())
    assert refused["type"] == "error" and refused["error"]["param"] == "audio_end_ms", refused
    assert socket.of("response.done")[-1]["response"]["status"] == "completed"


@pytest.mark.parametrize("ga", [False, True])
def test_an_assistants_spoken_item_as_the_server_sent_it_can_be_created_again(ga):
    """A client restoring a conversation in a new session sends back the items it was sent; an assistant's
    spoken item (beta content type `audio`, GA `output_audio`, with its `transcript`) was refused ("Input
    should be 'input_text', 'text', 'output_text' or 'input_audio'"), though it is what this server renders."""

    async def scenario():
        socket, ingress = Socket(ga=ga), SpokenSentences()
        session = RealtimeSession(socket, ingress, None)
        await session.handle(_say("hello"))
        await session.handle(_event("response.create"))
        await settle(session)
        sent = socket.of("response.done")[-1]["response"]["output"][0]
        restored_socket = Socket(ga=ga)
        restored = RealtimeSession(restored_socket, ingress, None)
        await restored.handle(_say("hello"))
        played = base64.b64encode(bytes(2 * RATE * 300 // 1000)).decode()  # its 300 ms, as pcm16
        part = {**sent["content"][0], "audio": played}
        await restored.handle(_event("conversation.item.create", item={"type": "message", "role": "assistant",
                                                                       "id": "a1", "content": [part]}))
        for bad in ({"role": "assistant", "content": [{"type": part["type"]}]},
                    {"role": "user", "content": [part]}):
            await restored.handle(_event("conversation.item.create", item={"type": "message", **bad}))
        await restored.handle(_event("conversation.item.truncate", item_id="a1", content_index=0, audio_end_ms=100))
        await restored.handle(_say("go on"))
        await restored.handle(_event("response.create", response={"modalities" if not ga else "output_modalities":
                                                                  ["text"]}))
        await settle(restored)
        return sent, restored_socket, ingress

    sent, socket, ingress = asyncio.run(scenario())
    assert sent["content"][0]["type"] == ("output_audio" if ga else "audio")
    created = [e["item"] for e in socket.sent if e["type"].startswith("conversation.item.") and "item" in e]
    assert created[1]["content"] == sent["content"], created
    assert [e["error"]["param"] for e in socket.of("error")] == ["item.content.0", "item.content"], socket.of("error")
    assert socket.of("conversation.item.truncated")[0]["audio_end_ms"] == 100
    assert ingress.chats[-1] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "One two three."},
                                 {"role": "user", "content": "go on"}], ingress.chats[-1]


@pytest.mark.parametrize("law", ["g711_ulaw", "g711_alaw"])
def test_a_phone_line_session_speaks_g711_both_ways(law):
    """`g711_ulaw`/`g711_alaw` (what Twilio's Media Streams carry) were refused ('Input should be pcm16'), so a
    voice agent on a phone line had to transcode both ways itself. The same speech sent as G.711 at 8 kHz is
    heard as the same turns as pcm16 at 24 kHz, and the reply's audio comes back as G.711 at 8 kHz."""
    from deployments import g711

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress()
        session = RealtimeSession(socket, ingress, None)
        await session.handle(_event("session.update", session={"input_audio_format": law,
                                                               "output_audio_format": law}))
        pcm8k = (resample(np.concatenate([silence(2.0), speech(), silence(1.0)]) / 32768, RATE, 8000) * 32767)
        data = g711.encode(pcm8k.round().astype("<i2"), law)
        for i in range(0, len(data), 160):  # 20 ms frames, as a phone line sends them
            await session.handle(_event("input_audio_buffer.append", audio=base64.b64encode(data[i:i + 160]).decode()))
        await settle(session)
        return socket, ingress

    socket, ingress = asyncio.run(scenario())
    assert socket.of("session.updated")[0]["session"]["input_audio_format"] == law
    # as pcm16 hears them, within 40 ms (test_turns_do_not_depend_on_how_the_audio_is_cut_into_appends: 19956,
    # 20992, 21684, 23680 ms after 20 s of silence; 2 s here)
    heard = turns(socket)[:4]  # measured: 1972, 2976, 3700, 5664 ms
    assert [kind for kind, _ in heard] == ["started", "stopped", "started", "stopped"], heard
    assert all(abs(ms - want) <= 40 for (_, ms), want in zip(heard, (1956, 2992, 3684, 5680), strict=True)), heard
    done = socket.of("response.done")[0]["response"]
    assert done["output_audio_format"] == law and done["status"] == "completed"
    audio = b"".join(base64.b64decode(e["delta"]) for e in socket.of("response.audio.delta"))
    assert len(audio) == len(socket.of("response.audio.delta")) * 800  # 100 ms of speech each, a byte a sample
    assert np.abs(g711.decode(audio, law)).max() <= 64  # the scripted speech is silence: G.711's zero codes


def test_a_g711_commit_holds_every_sample_sent_and_a_clear_leaves_none_behind():
    """The G.711 resampler held back its filter's reach (~4 ms) at a commit: 100 ms sent in five 20 ms phone
    frames was refused ('holds 98 ms; a commit needs at least 100 ms'), each committed turn lost its last
    milliseconds to the next one, and audio cleared away came back at the start of the next turn."""
    from deployments import g711

    def frames(ms: int) -> list[str]:
        data = g711.encode((np.sin(np.arange(8 * ms) / 5) * 8000).astype("<i2"), "g711_ulaw")
        return [_event("input_audio_buffer.append", audio=base64.b64encode(data[i:i + 160]).decode())
                for i in range(0, len(data), 160)]

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress()
        session = RealtimeSession(socket, ingress, None)
        await session.handle(_event("session.update", session={"turn_detection": None,
                                                               "input_audio_format": "g711_ulaw"}))
        for plan in ((100, False), (60, True), (120, False)):  # ms sent, then cleared (else committed)
            for frame in frames(plan[0]):
                await session.handle(frame)
            await session.handle(_event("input_audio_buffer.clear" if plan[1] else "input_audio_buffer.commit"))
            await settle(session)
        return socket, ingress

    socket, ingress = asyncio.run(scenario())
    assert socket.of("error") == [], socket.of("error")
    assert ingress.heard == [0.1, 0.12], ingress.heard  # each turn exactly what was sent for it


def test_g711_matches_the_reference_codec():
    """Every 16-bit sample encodes, and every code decodes, as CPython's audioop (G.711's reference, Sun's g711.c)."""
    audioop = pytest.importorskip("audioop")  # removed in Python 3.13
    from deployments import g711

    samples = np.arange(-32768, 32768, dtype=np.int16)
    codes = bytes(range(256))
    for law, encode, decode in (("g711_ulaw", audioop.lin2ulaw, audioop.ulaw2lin),
                                ("g711_alaw", audioop.lin2alaw, audioop.alaw2lin)):
        assert g711.encode(samples, law) == encode(samples.astype("<i2").tobytes(), 2)
        assert g711.decode(codes, law).astype("<i2").tobytes() == decode(codes, 2)


def test_a_user_item_of_input_audio_is_heard_and_answered_when_asked():
    """conversation.item.create with an input_audio part (a turn recorded whole, sent without the buffer) was
    refused ('Input should be input_text, text or output_text')."""
    clip = speech((0.0, 1.0))
    b64 = base64.b64encode(clip.tobytes()).decode()

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress()
        session = RealtimeSession(socket, ingress, None)
        await session.handle(_event("session.update", session={
            "turn_detection": None, "input_audio_transcription": {"model": "stt"}}))
        for bad in ({"role": "assistant", "content": [{"type": "input_audio", "audio": b64}]},
                    {"role": "user", "content": [{"type": "input_audio", "audio": b64},
                                                 {"type": "input_text", "text": "and this"}]},
                    {"role": "user", "content": [{"type": "input_audio", "audio": "AAA"}]},  # 3 bytes... not base64
                    {"role": "user", "content": [{"type": "input_audio", "audio": ""}]},
                    {"role": "user", "content": [{"type": "input_audio"}]}):
            await session.handle(_event("conversation.item.create", item={"type": "message", **bad}))
        await session.handle(_event("conversation.item.create", item={
            "type": "message", "role": "user", "content": [{"type": "input_audio", "audio": b64}]}))
        await session.handle(_event("response.create", response={"modalities": ["text"]}))
        await settle(session)
        return socket, ingress

    socket, ingress = asyncio.run(scenario())
    errors = [e["error"] for e in socket.of("error")]
    assert [e["param"] for e in errors] == ["item.content", "item.content", "item.content.0.audio",
                                            "item.content.0.audio", "item.content.0"], errors
    created = socket.of("conversation.item.created")[0]["item"]
    assert created["content"] == [{"type": "input_audio", "transcript": None}]
    assert socket.of("conversation.item.input_audio_transcription.completed")[0]["transcript"] == "turn1"
    assert [round(s, 2) for s in ingress.heard] == [1.0] and ingress.chats[-1] == [{"role": "user", "content": "turn1"}]


class OneSpeedTTS(ScriptedIngress):
    """A TTS model that speaks at one speed (as MMS-TTS or Bark: no speaking_rate), and the speeds it was asked."""

    def __init__(self, one_speed: bool):
        super().__init__()
        self.one_speed, self.speeds = one_speed, []

    async def check_speech_speed(self, model: str, speed: float) -> None:
        if self.one_speed:  # as synthesis.check_speed answers
            raise InvalidRequestError(f"model {model!r} speaks at one speed only; speed={speed:g} cannot be "
                                      "honoured: leave speed out or send 1.0", param="speed")

    async def synthesize_stream(self, params):
        self.speeds.append(params.speed)
        async for piece in super().synthesize_stream(params):
            yield piece


@pytest.mark.parametrize("ga", [False, True])
def test_session_speed_is_spoken_at_or_refused_for_a_one_speed_voice(ga):
    """session.update's `speed` (GA: audio.output.speed) was accepted and ignored: every reply at 1.0."""
    update = (lambda speed: {"type": "realtime", "audio": {"output": {"speed": speed}}}) if ga \
        else (lambda speed: {"speed": speed})

    async def scenario(one_speed: bool):
        socket, ingress = Socket(ga=ga), OneSpeedTTS(one_speed)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(_event("session.update", session={**update(1.25), **(
            {} if ga else {"turn_detection": None})}))
        await session.handle(_event("session.update", session=update(2.0)))  # past OpenAI's 1.5
        await session.handle(_say("hello"))
        await session.handle(_event("response.create"))
        await settle(session)
        return socket, ingress

    socket, ingress = asyncio.run(scenario(False))
    param = "session.audio.output.speed" if ga else "session.speed"
    assert [e["error"]["param"] for e in socket.of("error")] == [param]
    updated = socket.of("session.updated")[0]["session"]
    assert (updated["audio"]["output"]["speed"] if ga else updated["speed"]) == 1.25
    assert ingress.speeds and set(ingress.speeds) == {1.25}
    socket, ingress = asyncio.run(scenario(True))
    errors = [e["error"] for e in socket.of("error")]
    assert [e["param"] for e in errors] == [param, param] and "speaks at one speed only" in errors[0]["message"]
    assert set(ingress.speeds) == {1.0}  # the refused update changed nothing


class CallingModel(ScriptedIngress):
    """A model that calls get_weather when tools are offered and no function has answered yet, else says text."""

    async def chat_stream(self, params: ChatParams):
        answered = any(m["role"] == "tool" for m in params.messages)
        if params.tools and not answered:
            await asyncio.sleep(self.word_s)
            yield {"delta": "", "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
            yield {"finish_reason": "tool_calls", "usage": {"prompt_tokens": 5, "completion_tokens": 9}}
            return
        async for chunk in super().chat_stream(params):
            yield chunk


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.mark.parametrize("ga", [False, True])
def test_a_voice_agent_calls_a_function_and_answers_with_its_output(ga):
    """Function calling, the voice agent's way of doing things (book, look up, hang up), was refused by name
    ('tools (function calling) are not supported'). The reply's call is an output item of its own (no message,
    nothing spoken), the client's function_call_output goes into the next prompt as a `tool` message."""

    async def scenario():
        socket, ingress = Socket(ga=ga), CallingModel()
        session = RealtimeSession(socket, ingress, None)
        kind = {"type": "realtime"} if ga else {"turn_detection": None}
        for bad in ({"tools": [{**WEATHER, "parameters": {"type": "string"}}]},
                    {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
                    {"tool_choice": "required"}):
            await session.handle(_event("session.update", session={**kind, **bad}))
        await session.handle(_event("session.update", session={**kind, "tools": [WEATHER], "tool_choice": "auto"}))
        await session.handle(_say("What is the weather in Paris?"))
        await session.handle(_event("response.create"))
        await settle(session)
        await session.handle(_event("conversation.item.create", item={"type": "function_call_output"}))  # no call_id
        await session.handle(_event("conversation.item.create", item={
            "type": "function_call_output", "call_id": "call_1", "output": '{"celsius": 21}'}))
        await session.handle(_event("response.create"))
        await settle(session)
        return socket, ingress

    socket, ingress = asyncio.run(scenario())
    errors = [e["error"]["param"] for e in socket.of("error")]
    assert errors == ["session.tools.0.parameters", "session.tool_choice.name", "session.tool_choice", "item"], errors
    tools = socket.of("session.updated")[-1]["session"]["tools"]
    assert tools == [WEATHER], tools
    first, second = socket.of("response.done")
    assert first["response"]["status"] == "completed"
    assert [(o["type"], o["name"], o["call_id"], o["arguments"]) for o in first["response"]["output"]] == [
        ("function_call", "get_weather", "call_1", '{"city": "Paris"}')]
    done = socket.of("response.function_call_arguments.done")[0]
    assert (done["call_id"], done["name"], done["arguments"], done["output_index"]) == (
        "call_1", "get_weather", '{"city": "Paris"}', 0)
    assert socket.of("response.function_call_arguments.delta")[0]["delta"] == '{"city": "Paris"}'
    assert ingress.calls[0].tools == [{k: v for k, v in WEATHER.items() if k != "type"}]
    assert ingress.calls[0].tool_choice == "auto"
    # the second prompt: the call, then what the function answered
    assert ingress.chats[1][-2:] == [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'}]
    spoken = second["response"]["output"]
    assert [o["type"] for o in spoken] == ["message"] and spoken[0]["content"][0]["transcript"] == "w0 w1 w2 "


def test_the_temperature_a_session_reports_is_the_one_its_responses_sample_at():
    """A session reported OpenAI's default 0.8 and asked the LLM for none, which sampled at its own (1.0)."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress()
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "turn_detection": None, "modalities": ["text"]}}))
        await session.handle(_say("hi"))
        for response in ({}, {"temperature": 0.6}):
            await session.handle(json.dumps({"type": "response.create", "response": response}))
            await settle(session)
        await session.handle(json.dumps({"type": "session.update", "session": {"temperature": 1.1}}))
        await session.handle(json.dumps({"type": "response.create", "response": {}}))
        await settle(session)
        return socket, ingress

    socket, ingress = asyncio.run(scenario())
    assert socket.of("error") == []
    assert [e["session"]["temperature"] for e in socket.of("session.updated")] == [0.8, 1.1]
    assert [call.temperature for call in ingress.calls] == [0.8, 0.6, 1.1]


# -- semantic_vad: a turn ends after a silence as long as its words ask (deployments/semantic_vad.py) ---------
def _semantic(eagerness: str = "auto", create_response: bool = False, **more) -> str:
    return json.dumps({"type": "session.update", "session": {"turn_detection": {
        "type": "semantic_vad", "eagerness": eagerness, "create_response": create_response, **more}}})


def test_semantic_vad_keeps_the_turn_open_across_a_pause_after_words_that_trail_off():
    """Words the LLM does not expect to end ("Set a timer for") wait the eagerness's longest silence (2 s
    for high): the 1 s pause in the fixture's speech is not a turn, and the turn ends where the speech did."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress(transcribe_s=0, closing=1e-9)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(_semantic("high"))
        await append(session, np.concatenate([speech(), silence(1.5)]), pace_s=0.01)
        await settle(session)
        before = (turns(socket), len(socket.of("input_audio_buffer.committed")))
        await append(session, silence(1.0), pace_s=0.01)  # 2.8 s of silence after the speech
        await settle(session)
        return socket, ingress, before

    socket, ingress, before = asyncio.run(scenario())
    assert socket.of("error") == []
    assert before == ([("started", 0)], 0)  # 1.8 s of silence after words that trail off: still listening
    assert turns(socket) == [("started", 0), ("stopped", 3680)]  # one turn; it ends where its speech did
    assert len(socket.of("input_audio_buffer.committed")) == 1
    assert [heard for heard, _ in ingress.weighed] == ["turn1", "turn2"]  # at each pause, the words so far
    assert ingress.heard[-1] > 3.6  # the turn holds both utterances
    # the commit's transcript is the one made at the pause it ended at: no second transcription
    assert len(ingress.heard) == 2
    assert socket.of("conversation.item.input_audio_transcription.completed") == []  # none asked for


def test_semantic_vad_ends_the_turn_at_the_pause_after_finished_words_and_reuses_their_transcript():
    """Words that sound finished end the turn at the first pause (300 ms of silence): two turns, as server
    VAD finds them, each transcribed once (the transcript the pause was weighed on is the turn's), and the
    words after a reply are weighed with that reply (what they answer)."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress(transcribe_s=0, closing=0.5)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "modalities": ["text"], "input_audio_transcription": {"model": "stt"}}}))
        await session.handle(_semantic("low", create_response=True, interrupt_response=False))
        await append(session, np.concatenate([speech(), silence(1.0)]), pace_s=0.01)
        await settle(session)
        return socket, ingress

    socket, ingress = asyncio.run(scenario())
    assert socket.of("error") == []
    assert turns(socket) == [("started", 0), ("stopped", 992), ("started", 1684), ("stopped", 3680)]
    assert [e["transcript"] for e in socket.of("conversation.item.input_audio_transcription.completed")] == [
        "turn1", "turn2"]
    assert len(ingress.heard) == 2
    assert ingress.weighed[0] == ("turn1", None)
    heard, answered = ingress.weighed[1]
    assert heard == "turn2" and answered is not None and answered.startswith("w0")  # the reply to turn 1


@pytest.mark.parametrize(("closing", "eagerness", "wait_s"), [
    (10 ** -5.5, "medium", 2.0),  # halfway between finished (1e-3) and trailing off (1e-8) on a log scale
    (None, "auto", 1.0),  # no score (the template has nothing to score, the LLM is away): a quarter
    (1e-12, "low", 8.0),  # trailing off: the longest wait of low
])
def test_semantic_vad_waits_the_share_of_the_longest_silence_that_the_words_score(closing, eagerness, wait_s):
    async def scenario():
        socket, ingress = Socket(), ScriptedIngress(transcribe_s=0, closing=closing)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(_semantic(eagerness))
        # speech ends at 0.99 s: 0.19 s less silence than the wait, then 0.4 s more
        await append(session, np.concatenate([speech((0.0, 1.2)), silence(wait_s - 0.4)]), pace_s=0.01)
        await settle(session)
        before = len(socket.of("input_audio_buffer.committed"))
        await append(session, silence(0.4), pace_s=0.01)
        await settle(session)
        return socket, before

    socket, before = asyncio.run(scenario())
    assert before == 0 and len(socket.of("input_audio_buffer.committed")) == 1
    assert turns(socket) == [("started", 0), ("stopped", 992)]


def test_semantic_vad_is_shown_in_openais_shape_and_switches_with_server_vad():
    async def scenario(ga: bool):
        socket = Socket(ga=ga)
        session = RealtimeSession(socket, ScriptedIngress(), None)
        detection = {"type": "semantic_vad", "eagerness": "low", "threshold": 0.9}  # no threshold in semantic_vad
        session_fields = ({"type": "realtime", "audio": {"input": {"turn_detection": detection}}} if ga
                          else {"turn_detection": detection})
        await session.handle(json.dumps({"type": "session.update", "session": session_fields}))
        await session.handle(json.dumps({"type": "session.update", "session": (
            {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad"}}}} if ga
            else {"turn_detection": {"type": "server_vad"}})}))
        return socket

    semantic = {"type": "semantic_vad", "eagerness": "low", "create_response": True, "interrupt_response": True}
    server = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
              "create_response": True, "interrupt_response": True}
    beta = asyncio.run(scenario(False))
    assert beta.of("error") == []
    assert [e["session"]["turn_detection"] for e in beta.of("session.updated")] == [semantic, server]
    ga = asyncio.run(scenario(True))
    assert ga.of("error") == []
    assert [e["session"]["audio"]["input"]["turn_detection"] for e in ga.of("session.updated")] == [semantic, server]


def test_a_switch_to_server_vad_during_a_weighed_pause_ends_the_turn_there():
    """Under semantic_vad the detector has heard the pause already; server VAD from then on would never hear
    it again, and the turn would stay open until the next speech."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress(transcribe_s=0, closing=1e-9)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(_semantic("high"))
        await append(session, np.concatenate([speech((0.0, 1.2)), silence(0.6)]), pace_s=0.01)
        await settle(session)
        before = turns(socket)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "turn_detection": {"type": "server_vad", "create_response": False}}}))
        await settle(session)
        return socket, ingress, before

    socket, ingress, before = asyncio.run(scenario())
    assert socket.of("error") == []
    assert before == [("started", 0)]
    assert turns(socket) == [("started", 0), ("stopped", 992)]
    assert len(socket.of("input_audio_buffer.committed")) == 1 and len(ingress.heard) == 1


# -- transcription sessions (GA session.type "transcription", beta intent=transcription) ------------------------
def test_a_ga_transcription_session_transcribes_each_turn_and_answers_none():
    """Live captioning over the Realtime protocol: GA `session.type: transcription` was refused with an error
    event pointing elsewhere."""

    async def scenario():
        socket, ingress = Socket(ga=True), ScriptedIngress()
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "stt", "language": "en"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}}}))
        await append(session, np.concatenate([speech(), silence(1.0)]), pace_s=0.01)
        await settle(session)
        await session.handle(json.dumps({"type": "response.create"}))
        await session.handle(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
        return socket, ingress

    socket, ingress = asyncio.run(scenario())
    updated = socket.of("session.updated")[0]["session"]
    assert updated == {"type": "transcription", "object": "realtime.transcription_session", "id": updated["id"],
                       "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                           "transcription": {"model": "stt", "language": "en", "prompt": None},
                                           "turn_detection": {"type": "server_vad", "threshold": 0.5,
                                                              "prefix_padding_ms": 300, "silence_duration_ms": 500,
                                                              "create_response": True, "interrupt_response": True},
                                           "noise_reduction": None}},
                       "include": None}
    assert turns(socket) == [("started", 0), ("stopped", 992), ("started", 1684), ("stopped", 3680)]
    assert [e["transcript"] for e in socket.of("conversation.item.input_audio_transcription.completed")] == [
        "turn1", "turn2"]
    assert len(socket.of("conversation.item.added")) == 2 and ingress.calls == []  # no LLM call, no response
    assert socket.of("response.created") == []
    errors = [e["error"] for e in socket.of("error")]
    assert [e["param"] for e in errors] == ["type", "session.type"]  # no responses; the type stays
    assert "makes no responses" in errors[0]["message"] and "open a new session" in errors[1]["message"]


def test_a_beta_transcription_session_from_the_urls_intent_speaks_its_own_event_names():
    """OpenAI's beta transcription sessions (`?intent=transcription`) open with transcription_session.created,
    announce no conversation, and are updated with transcription_session.update."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress()
        session = RealtimeSession(socket, ingress, None, intent="transcription")
        await session.announce()
        await session.handle(json.dumps({"type": "transcription_session.update", "session": {
            "input_audio_transcription": {"model": "stt", "prompt": "names: Ada"},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 600}}}))
        await session.handle(json.dumps({"type": "transcription_session.update", "session": {
            "input_audio_transcription": None}}))
        await append(session, np.concatenate([speech((0.0, 1.2)), silence(1.0)]))
        await settle(session)
        return socket

    socket = asyncio.run(scenario())
    kinds = [event["type"] for event in socket.sent]
    assert kinds[0] == "transcription_session.created" and "conversation.created" not in kinds
    created, updated = socket.sent[0]["session"], socket.of("transcription_session.updated")
    assert created["object"] == "realtime.transcription_session" and created["input_audio_transcription"] == {
        "model": None, "language": None, "prompt": None}  # transcribing from the start, with the default STT
    assert len(updated) == 1 and updated[0]["session"]["input_audio_transcription"]["prompt"] == "names: Ada"
    assert updated[0]["session"]["turn_detection"]["silence_duration_ms"] == 600
    assert [e["error"]["param"] for e in socket.of("error")] == ["session.input_audio_transcription"]
    assert [e["transcript"] for e in socket.of("conversation.item.input_audio_transcription.completed")] == ["turn1"]
    assert socket.of("response.created") == []


class CaptionsOnlyIngress(ScriptedIngress):
    """An app that serves an STT model and nothing to answer with (a captioning deployment)."""

    def default_model(self, family: Family) -> str:
        if family is not Family.STT:
            raise ServiceUnavailableError(f"no {family.value} model is configured in serve_config.yaml")
        return "stt"


def test_an_app_without_an_llm_serves_transcription_sessions_and_says_why_it_cannot_answer():
    """The session looked up its LLM when it opened: in an app without one, every socket failed at once."""

    async def scenario(intent: str | None):
        socket = Socket()
        session = RealtimeSession(socket, CaptionsOnlyIngress(), None, intent=intent)
        await session.announce()
        if intent is None:
            await session.handle(json.dumps({"type": "session.update", "session": {
                "modalities": ["text"], "turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}))
        await append(session, np.concatenate([speech((0.0, 1.2)), silence(2.5)]), pace_s=0.01)
        await settle(session)
        return socket

    captions = asyncio.run(scenario("transcription"))
    assert captions.of("error") == []
    assert [e["transcript"] for e in captions.of("conversation.item.input_audio_transcription.completed")] == ["turn1"]
    conversation = asyncio.run(scenario(None))
    assert conversation.sent[0]["session"]["model"] is None
    assert len(conversation.of("input_audio_buffer.committed")) == 1  # semantic_vad unscored: a quarter of 2 s
    [done] = conversation.of("response.done")
    assert done["response"]["status"] == "failed"
    assert "no LLM or VLM" in done["response"]["status_details"]["error"]["message"]


# -- out-of-band responses (conversation: none, a response's own input) ------------------------------------------
def _respond(**response) -> str:
    return json.dumps({"type": "response.create", "response": response})


def test_an_out_of_band_response_answers_its_own_input_and_leaves_the_conversation_as_it_was():
    """Voice agents ask side questions (classify the last turn, summarize) with `conversation: none`: it was
    refused with an error event."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress()
        session = RealtimeSession(socket, ingress, None)
        await session.announce()
        await session.handle(json.dumps({"type": "session.update", "session": {
            "turn_detection": None, "modalities": ["text"], "instructions": "Be kind."}}))
        await session.handle(_say("my order is late", item_id="turn1"))
        await session.handle(_respond(conversation="none", metadata={"purpose": "classify"}, instructions="Label it.",
                                      input=[{"type": "item_reference", "id": "turn1"},
                                             {"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": "complaint or question?"}]}]))
        await settle(session)
        await session.handle(_respond(conversation="none"))  # no input: the conversation is its prompt
        await settle(session)
        await session.handle(_respond())  # the conversation's own response sees no out-of-band reply
        await settle(session)
        return socket, ingress, session

    socket, ingress, session = asyncio.run(scenario())
    assert socket.of("error") == []
    conversation_id = socket.of("conversation.created")[0]["conversation"]["id"]
    first, second, third = (e["response"] for e in socket.of("response.done"))
    assert (first["conversation_id"], first["metadata"]) == (None, {"purpose": "classify"})
    assert second["conversation_id"] is None and third["conversation_id"] == conversation_id
    assert all(r["status"] == "completed" and r["output"][0]["role"] == "assistant" for r in (first, second, third))
    assert ingress.chats[0] == [{"role": "system", "content": "Label it."},
                                {"role": "user", "content": "my order is late"},
                                {"role": "user", "content": "complaint or question?"}]
    assert ingress.chats[1] == ingress.chats[2] == [{"role": "system", "content": "Be kind."},
                                                    {"role": "user", "content": "my order is late"}]
    # only the conversation's response was added to it, and announced as its item
    assert [item.id for item in session.items] == ["turn1", third["output"][0]["id"]]
    assert [e["item"]["id"] for e in socket.of("conversation.item.created")] == ["turn1", third["output"][0]["id"]]


def test_a_response_input_is_checked_before_the_response_starts():
    async def scenario():
        socket = Socket()
        session = RealtimeSession(socket, ScriptedIngress(), None)
        await session.handle(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
        for response in ({"conversation": "none", "input": [{"type": "item_reference", "id": "nope"}]},
                         {"input": [{"type": "message", "role": "user",
                                     "content": [{"type": "input_audio", "audio": "AAAA"}]}]},
                         {"input": [{"type": "message", "role": "user"}]},
                         {"conversation": "conv_other"},
                         {"conversation": "none", "metadata": {f"k{i}": "v" for i in range(17)}}):
            await session.handle(_respond(**response))
        return socket

    socket = asyncio.run(scenario())
    assert [e["error"]["param"] for e in socket.of("error")] == [
        "response.input.0.id", "response.input.0.content", "response.input.0", "response.conversation",
        "response.metadata"]
    assert socket.of("response.created") == []


def test_speech_does_not_cancel_an_out_of_band_response():
    """OpenAI's interrupt_response cancels the response that writes into the conversation, not a side one."""

    async def scenario():
        socket, ingress = Socket(), ScriptedIngress(words=12, word_s=0.1)
        session = RealtimeSession(socket, ingress, None)
        await session.handle(json.dumps({"type": "session.update", "session": {
            "modalities": ["text"], "turn_detection": {"type": "server_vad", "create_response": False}}}))
        await session.handle(_respond(conversation="none", input=[
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "summarize"}]}]))
        await append(session, np.concatenate([speech((0.0, 1.2)), silence(0.8)]), pace_s=0.01)
        await settle(session)
        return socket

    socket = asyncio.run(scenario())
    assert turns(socket)[0][0] == "started"
    [done] = socket.of("response.done")
    assert done["response"]["status"] == "completed"
