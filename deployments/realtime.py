"""A Realtime session: the subset of OpenAI's Realtime protocol (beta, `OpenAI-Beta: realtime=v1`) that
a voice agent needs, over one WebSocket, on top of the same deployments as the HTTP routes.

    client audio (pcm16, 24 kHz) --> input buffer --server VAD (vad.TurnDetector)--> committed turn
      --> STT (ingress.transcribe) --> conversation --> LLM + TTS (voice.spoken_reply) --> deltas back

The session holds no replica: every turn is an ordinary call through the ingress's handles, so many
sessions share the families' batches. Everything it holds is bounded (limits.RequestLimits: the
buffer's seconds, one event's bytes, the conversation's items, the session's length). Every failure
is an `error` event in OpenAI's shape (errors.to_error), never a dropped socket. Barge-in: speech
that starts while a response is being made, or `response.cancel`, cancels the response task at once,
which cancels the LLM's stream (its row leaves the batch at the next step) and the TTS (it stops
before its next piece), and ends the response with status `cancelled`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from loading import Family

from . import g711, semantic_vad
from .audio import StreamResampler, resample
from .errors import APIError, ServiceUnavailableError, as_api_error, to_error
from .guard import INLINE_JSON_BYTES, check_json, offered_subprotocols, realtime_subprotocol
from .params import ChatParams, SpeechParams, TranscribeParams, TranscribeResult
from .vad import TurnDetector, VadOptions
from .voice import AudioPiece, ReplyDone, TextDelta, ToolCall, spoken_reply

if TYPE_CHECKING:
    from .ingress import Ingress

log = logging.getLogger(__name__)

RATE = 24000  # pcm16 in and out, as OpenAI's Realtime API
INLINE_DETECT_SAMPLES = RATE  # appends up to a second are detected on the event loop (~10 ms); longer in a thread
MIN_COMMIT_MS = 100  # OpenAI refuses to commit less than this
MAX_RESPONSE_INPUT_ITEMS = 64  # a response's own input (out of band): as many items as a conversation keeps by default


def _asks_beta(headers: Any) -> bool:
    """The client speaks the beta protocol: the `OpenAI-Beta: realtime=v1` header (the openai package's
    beta client), or the `openai-beta.realtime-v1` subprotocol, which browsers send instead (they cannot
    set headers on a WebSocket)."""
    return "realtime=v1" in headers.get("openai-beta", "") or "openai-beta.realtime-v1" in offered_subprotocols(headers)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


# --- what the client may set ---------------------------------------------------------------------

# pcm16 at 24 kHz, or the telephone's G.711 at 8 kHz (g711.py); the session works in pcm16 at 24 kHz inside
AudioFormat = Literal["pcm16", "g711_ulaw", "g711_alaw"]


class TurnDetection(BaseModel):
    """`server_vad`: a turn ends after `silence_duration_ms` of silence. `semantic_vad`: after a silence
    that is longer the less the words heard sound finished (semantic_vad.py), at most 8/4/2 s for
    `eagerness` low/medium (auto)/high; its speech is found with server_vad's defaults."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(default=300, ge=0, le=10000)
    silence_duration_ms: int = Field(default=500, ge=0, le=10000)
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"
    create_response: bool = True
    interrupt_response: bool = True

    @property
    def semantic(self) -> bool:
        return self.type == "semantic_vad"

    def vad(self) -> VadOptions:
        if self.semantic:  # OpenAI's semantic_vad has no VAD knobs: speech is found as server_vad's defaults find it
            return VadOptions(silence_duration_ms=semantic_vad.PAUSE_MS)
        return VadOptions(self.threshold, self.prefix_padding_ms, self.silence_duration_ms)

    def render(self) -> dict:
        """The fields OpenAI's session shows for this type."""
        shown = ({"eagerness"} if self.semantic else {"threshold", "prefix_padding_ms", "silence_duration_ms"})
        return self.model_dump(include={"type", "create_response", "interrupt_response", *shown})


class InputTranscription(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    language: str | None = Field(default=None, pattern=r"^[A-Za-z]{2,3}$")
    prompt: str | None = None


class RealtimeTool(BaseModel):
    """A function the model may call (Realtime's flat shape: name, description, parameters at the top)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class SessionFields(BaseModel):
    """`session.update`'s session (beta names); fields left out keep their values."""

    model_config = ConfigDict(extra="ignore")

    modalities: list[Literal["text", "audio"]] | None = Field(default=None, min_length=1)
    instructions: str | None = None
    voice: str | None = Field(default=None, max_length=64)
    input_audio_format: AudioFormat | None = None
    output_audio_format: AudioFormat | None = None
    input_audio_transcription: InputTranscription | None = None
    turn_detection: TurnDetection | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_response_output_tokens: Annotated[int, Field(ge=1)] | Literal["inf"] | None = None
    speed: float | None = Field(default=None, ge=0.25, le=1.5)  # of the spoken reply, as OpenAI's bounds
    tools: list[RealtimeTool] | None = None
    tool_choice: Any = None  # "auto" | "none" | "required" | {"type": "function", "name": ...}
    # GA's session.type (beta's transcription_session.update sets "transcription"): a transcription session
    # transcribes each turn and makes no responses
    type: Literal["realtime", "transcription"] | None = None


class ResponseFields(BaseModel):
    """`response.create`'s response: per-response overrides."""

    model_config = ConfigDict(extra="ignore")

    modalities: list[Literal["text", "audio"]] | None = Field(default=None, min_length=1)
    instructions: str | None = None
    voice: str | None = Field(default=None, max_length=64)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_output_tokens: Annotated[int, Field(ge=1)] | Literal["inf"] | None = None
    max_response_output_tokens: Annotated[int, Field(ge=1)] | Literal["inf"] | None = None
    tools: list[RealtimeTool] | None = None  # this response's, instead of the session's
    tool_choice: Any = None
    # out of band: "none" leaves the conversation as it is (the response's items are not added to it), and
    # `input` (items, or {"type": "item_reference", "id"}) is its prompt instead of the conversation
    conversation: Literal["auto", "none"] | None = None
    input: list[dict] | None = Field(default=None, max_length=MAX_RESPONSE_INPUT_ITEMS)
    metadata: dict[str, str] | None = None  # echoed in the response: how a client tells its responses apart

    def tools_for(self, session: Session) -> tuple[list[dict], Any]:
        """(tools, tool_choice) this response offers: its own where it sets them, else the session's."""
        return (_tool_dicts(self.tools) if self.tools is not None else session.tools,
                self.tool_choice if self.tool_choice is not None else session.tool_choice)

    @property
    def out_of_band(self) -> bool:
        return self.conversation == "none"

    def refused(self) -> tuple[str, str] | None:
        """(message, param) for an option this server does not serve, or None."""
        metadata = self.metadata or {}
        if len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
            return ("metadata holds at most 16 pairs, keys of at most 64 characters and values of at most 512 "
                    "(OpenAI's bounds)", "response.metadata")
        return None


class ItemContent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # an assistant's spoken part is `audio` (beta) or `output_audio` (GA), as the server's own items render it
    type: Literal["input_text", "text", "output_text", "input_audio", "audio", "output_audio"]
    text: str | None = None
    audio: str | None = None  # input_audio's: base64, in the session's input_audio_format
    transcript: str | None = None  # an assistant's audio part's words, which the LLM reads

    @model_validator(mode="after")
    def _has_its_payload(self) -> ItemContent:
        if self.type == "input_audio" and self.audio is None:
            raise ValueError("an input_audio part needs 'audio': base64 audio in the session's input_audio_format")
        if self.type in SPOKEN_PARTS and self.transcript is None:
            raise ValueError(f"an {self.type} part needs 'transcript': its words, which this server's models read")
        if self.type not in ("input_audio", *SPOKEN_PARTS) and self.text is None:
            raise ValueError(f"a {self.type} part needs 'text'")
        return self


SPOKEN_PARTS = ("audio", "output_audio")


class ConversationItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(default=None, max_length=64)
    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["user", "assistant", "system"] | None = None
    content: list[ItemContent] | None = Field(default=None, min_length=1, max_length=16)
    call_id: str | None = Field(default=None, min_length=1, max_length=64)  # a function call's, and its output's
    name: str | None = Field(default=None, max_length=64)  # function_call
    arguments: str | None = None  # function_call: JSON text
    output: str | None = None  # function_call_output: what the function answered, as text

    def words(self) -> str:
        """A message's text as the LLM reads it: its text parts, and its spoken parts' transcripts."""
        return "".join(part.transcript if part.type in SPOKEN_PARTS else part.text or "" for part in self.content or [])

    def function_item(self) -> Item:
        """A function_call or function_call_output item as the session keeps it."""
        assert self.call_id is not None
        if self.type == "function_call":
            assert self.arguments is not None
            return Item(self.id or _id("item"), "assistant", "", type="function_call", call_id=self.call_id,
                        name=self.name or "", arguments=self.arguments)
        assert self.output is not None
        return Item(self.id or _id("item"), "tool", self.output, type="function_call_output", call_id=self.call_id)

    @model_validator(mode="after")
    def _has_its_fields(self) -> ConversationItem:
        needs = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
                 "function_call_output": ("call_id", "output")}[self.type]
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.type} item needs {', '.join(repr(m) for m in missing)}")
        return self


@dataclass
class Session:
    modalities: list[str] = field(default_factory=lambda: ["text", "audio"])
    instructions: str = ""
    voice: str = "alloy"
    transcription: InputTranscription | None = None
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    # OpenAI's Realtime default, reported in session.created and used where neither the session nor the
    # response sets one (the chat routes' default, the model's generation_config or 1, is not Realtime's)
    temperature: float = 0.8
    max_output_tokens: int | str = "inf"
    input_audio_format: str = "pcm16"
    output_audio_format: str = "pcm16"
    speed: float = 1.0
    tools: list[dict] = field(default_factory=list)  # RealtimeTool's fields, as chat completions' functions take them
    tool_choice: Any = "auto"

    def render(self, session_id: str, model: str, transcription: bool = False) -> dict:
        if transcription:  # beta's transcription session object (_to_ga writes GA's)
            return {"id": session_id, "object": "realtime.transcription_session", "modalities": ["text"],
                    "input_audio_format": self.input_audio_format,
                    "input_audio_transcription": self.transcription.model_dump() if self.transcription else None,
                    "turn_detection": self.turn_detection.render() if self.turn_detection else None,
                    "input_audio_noise_reduction": None, "include": None}
        return {
            "id": session_id, "object": "realtime.session", "model": model, "modalities": self.modalities,
            "instructions": self.instructions, "voice": self.voice,
            "input_audio_format": self.input_audio_format, "output_audio_format": self.output_audio_format,
            "input_audio_transcription": self.transcription.model_dump() if self.transcription else None,
            "turn_detection": self.turn_detection.render() if self.turn_detection else None,
            "tools": [{"type": "function", **tool} for tool in self.tools], "tool_choice": self.tool_choice,
            "temperature": self.temperature,
            "max_response_output_tokens": self.max_output_tokens, "speed": self.speed,
        }


@dataclass
class Item:
    id: str
    role: str
    text: str
    audio: bool = False  # an input_audio user item, or an assistant item that was spoken
    status: str = "completed"  # an assistant item's, once its response ended (in_progress until then)
    # an assistant item's speech as it was sent: [sentence number, its text, milliseconds of audio]
    spoken: list[list] = field(default_factory=list)
    type: str = "message"  # or function_call (role assistant), function_call_output (role tool)
    call_id: str = ""
    name: str = ""
    arguments: str = ""  # a function_call's; a function_call_output's answer is its `text`

    def add_audio(self, sentence: int, text: str, ms: float) -> None:
        if self.spoken and self.spoken[-1][0] == sentence:
            self.spoken[-1][2] += ms
        else:
            self.spoken.append([sentence, text, ms])

    @property
    def audio_ms(self) -> float:
        return sum(ms for _, _, ms in self.spoken)

    def heard(self, end_ms: float) -> str:
        """The text its first `end_ms` of audio spoke (conversation.item.truncate): the sentences played
        whole, then the played share of the one cut, by characters, back to the end of a word. Text after the
        last sentence spoken is kept only if it has nothing to speak (a trailing symbol): a reply cancelled
        while the TTS was behind the LLM wrote words no one heard."""
        position, elapsed = 0, 0.0
        for _, sentence, ms in self.spoken:
            found = self.text.find(sentence.strip(), position)
            start = found if found >= 0 else position
            end = start + len(sentence.strip())
            if elapsed + ms <= end_ms:
                position, elapsed = end, elapsed + ms
                continue
            cut = start + int(len(sentence.strip()) * max(0.0, end_ms - elapsed) / ms)
            partial = self.text[start:cut]
            if partial and not partial[-1].isspace() and cut < len(self.text) and self.text[cut].isalnum():
                partial = partial[:len(partial) - len(partial.split()[-1])]  # cut inside a word: not said whole
            return (self.text[:start] + partial).rstrip()
        rest = self.text[position:]
        return self.text if not any(c.isalnum() for c in rest) else self.text[:position].rstrip()

    def render(self, status: str | None = None) -> dict:
        status = status or self.status
        if self.type == "function_call":
            return {"id": self.id, "object": "realtime.item", "type": "function_call", "status": status,
                    "call_id": self.call_id, "name": self.name, "arguments": self.arguments}
        if self.type == "function_call_output":
            return {"id": self.id, "object": "realtime.item", "type": "function_call_output", "call_id": self.call_id,
                    "output": self.text}
        if self.role == "user" and self.audio:
            content = [{"type": "input_audio", "transcript": self.text or None}]
        elif self.role == "assistant":
            content = [{"type": "audio", "transcript": self.text} if self.audio
                       else {"type": "text", "text": self.text}]
        else:
            content = [{"type": "input_text", "text": self.text}]
        return {"id": self.id, "object": "realtime.item", "type": "message", "status": status, "role": self.role,
                "content": content}


def _parse(model: type[BaseModel], value: Any, where: str) -> Any:
    """A client event's payload validated; the error names the field as `where.field`."""
    try:
        return model.model_validate(value if value is not None else {})
    except ValidationError as exc:
        _, body, _ = to_error(exc)
        param = f"{where}.{body.error.param}" if body.error.param else where
        raise SessionError(body.error.message.replace(f"'{body.error.param}'", f"'{param}'"), "invalid_value",
                           param) from None


class SessionError(Exception):
    """A client event that cannot be served: becomes an `error` event; the session goes on."""

    def __init__(self, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass
class Pause:
    """semantic_vad: where a turn's speech paused, and what weighing its words found so far."""

    at: int  # the stream sample (24 kHz) where the speech paused
    task: asyncio.Task = field(init=False)  # transcribes the turn so far, then scores its words
    transcript: TranscribeResult | None = None  # the turn's, if it ends at this pause
    wait: int | None = None  # samples of silence after which the turn ends, once scored


class RealtimeSession:
    def __init__(self, websocket: WebSocket, ingress: Ingress, model: str | None, intent: str | None = None):
        self.ws, self.ingress, self.limits = websocket, ingress, ingress.limits
        # the beta protocol is the one spoken; the GA one is translated at the edges
        self.ga = not _asks_beta(websocket.headers)
        self.id = _id("sess")
        self.llm = _chat_model(ingress)  # None in an app with no LLM or VLM: transcription sessions work all the same
        self.requested_model = model
        self.config = Session()
        # a transcription session (the URL's intent=transcription, or session.type): turns are transcribed,
        # never answered
        self.transcribing = intent == "transcription"
        if self.transcribing:
            self.config.transcription = InputTranscription()
        self.items: list[Item] = []
        self.conversation_id = _id("conv")
        self.prompt_from: str | None = None  # the oldest item prompts show (older ones outgrew the context)
        # the input buffer: pcm16 samples at 24 kHz, and where its first sample is in the session's stream
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.buffer_start = 0
        self.streamed = 0  # samples appended in the whole session
        self.detector: TurnDetector | None = None
        self.vad_input = StreamResampler(RATE, 16000)  # what the detector hears, resampled as one stream
        self.g711_in = StreamResampler(g711.RATE, RATE)  # G.711 input to the session's 24 kHz, as one stream
        self.detector_origin = 0  # the stream sample the detector's first sample is
        self._detect_from(self.config.turn_detection)
        self.speech_start: int | None = None  # stream sample where the current speech began
        self.speech_item: str | None = None
        self.pause: Pause | None = None  # semantic_vad: the turn's speech paused, its words being weighed
        self._turn_lock = asyncio.Lock()  # appends and a weighed pause's end change the turn one at a time
        self.response: asyncio.Task | None = None
        self.response_id: str | None = None  # the id of `response`, for response.cancel's response_id
        self.response_item: Item | None = None  # the assistant item `response` writes
        self.response_out_of_band = False  # `response` writes nothing into the conversation (speech does not stop it)
        self.response_started = False  # its task ran: it will send response.done however it ends
        self.response_closing = False  # it is sending its closing events: a cancel waits for them
        self.respond_after = False  # a turn was transcribed while a response ran: answer it next
        self.cancel_reason = "client_cancelled"
        self.transcriptions: set[asyncio.Task] = set()
        self._send_lock = asyncio.Lock()
        self._closed = False

    # -- sending -------------------------------------------------------------------------------------
    async def send(self, type_: str, **fields: Any) -> None:
        if self._closed:
            return
        if self.ga:  # a content part keeps its type: GA's is "text" | "audio" there, as beta's
            type_ = GA_NAMES.get(type_, type_)
            fields = {key: value if key == "part" else _to_ga(value) for key, value in fields.items()}
        message = json.dumps({"type": type_, "event_id": _id("event"), **fields})
        async with self._send_lock:
            try:
                await self.ws.send_text(message)
            except (WebSocketDisconnect, RuntimeError):  # the client is gone: stop sending
                self._closed = True

    async def send_error(self, message: str, code: str | None, param: str | None = None,
                         kind: str = "invalid_request_error", event_id: str | None = None) -> None:
        if self.ga and param:  # the field as the GA client wrote it, not its beta twin it was translated to
            ga_param = _ga_param(param)
            message, param = message.replace(param, ga_param), ga_param
        await self.send("error", error={"type": kind, "code": code, "message": message, "param": param,
                                        "event_id": event_id})

    async def send_exception(self, exc: BaseException, event_id: str | None = None) -> None:
        """Any exception in OpenAI's error shape (errors.to_error), as an `error` event."""
        _, body, _ = to_error(exc)
        error = body.error
        await self.send_error(error.message, error.code, error.param, error.type, event_id)

    # -- the session -------------------------------------------------------------------------------------
    def _rendered(self) -> dict:
        return self.config.render(self.id, self.llm, transcription=self.transcribing)

    def _session_event(self, kind: str) -> str:
        """`session.created`/`updated`; beta's transcription session has events of its own name."""
        return f"transcription_session.{kind}" if self.transcribing and not self.ga else f"session.{kind}"

    async def announce(self) -> None:
        """The session's opening events: its configuration, its conversation, and the model that answers."""
        model = self.requested_model
        await self.send(self._session_event("created"), session=self._rendered())
        if not self.transcribing:  # a transcription session has no conversation to announce (as OpenAI's)
            await self.send("conversation.created", conversation={"id": self.conversation_id,
                                                                  "object": "realtime.conversation"})
        if model and model not in (self.llm,) and not self.transcribing:
            try:
                self.llm = self.ingress.spec(model, Family.LLM, Family.VLM).name
                await self.send("session.updated", session=self._rendered())
            except Exception as exc:  # an OpenAI model name: say which model answers instead
                await self.send_exception(exc)

    async def run(self) -> None:
        await self.announce()
        deadline = time.monotonic() + self.limits.max_realtime_session_s
        try:
            while not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    await self.send_error(
                        f"the session reached max_realtime_session_s={self.limits.max_realtime_session_s:g} s; "
                        "open a new one", "session_expired")
                    break
                try:
                    message = await asyncio.wait_for(self.ws.receive(), remaining)
                except asyncio.TimeoutError:
                    continue
                if message["type"] == "websocket.disconnect":
                    self._closed = True
                    break
                await self.handle(message["text"] if message.get("text") is not None else message.get("bytes") or b"")
        finally:
            client_left = self._closed  # stop() sets it too: read first, or the server never closes its side
            await self.stop()
            if self.ws.application_state == WebSocketState.CONNECTED and not client_left:
                with contextlib.suppress(Exception):
                    await self.ws.close(1000)

    async def stop(self) -> None:
        tasks = [t for t in [self.response, *self.transcriptions] if t is not None and not t.done()]
        if self.pause is not None:
            tasks.append(self.pause.task)
        self._closed = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, data: str | bytes) -> None:
        """One client event: a text frame, or a binary one holding UTF-8 JSON."""
        limit = self.limits.max_realtime_event_bytes
        if _utf8_bytes(data, limit) > limit:
            await self.send_error(
                f"the event is larger than max_realtime_event_bytes={limit:,} bytes (of UTF-8); send audio in "
                "smaller appends", "event_too_large")
            return
        event_id = None
        try:
            # the structure checks of an HTTP body (guard.check_json): depth, huge integers, lone surrogates;
            # a large event off the event loop, as the guard parses a large body (a 4 MiB append: ~20 ms)
            event = (check_json(data, self.limits) if len(data) <= INLINE_JSON_BYTES
                     else await asyncio.to_thread(check_json, data, self.limits))
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise SessionError("an event is a JSON object with a string 'type'", "invalid_event", "type")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            if self.ga:
                event = _from_ga(event)
            handler = HANDLERS.get(event["type"])
            if handler is None:
                raise SessionError(f"unsupported event type {event['type'][:64]!r}; supported: "
                                   f"{', '.join(sorted(HANDLERS))}", "unknown_event", "type")
            await handler(self, event)
        except SessionError as exc:
            await self.send_error(exc.message, exc.code, exc.param, event_id=event_id)
        except ValidationError as exc:
            await self.send_exception(exc, event_id)
        except Exception as exc:
            await self.send_exception(exc, event_id)

    # -- client events ---------------------------------------------------------------------------------
    async def session_update(self, event: dict) -> None:
        fields = _parse(SessionFields, event.get("session"), "session")
        config = self.config
        sent = event.get("session") or {}
        # every check first: a refused update changes nothing
        transcribing = self.transcribing if fields.type is None else fields.type == "transcription"
        if transcribing != self.transcribing and (self.items or self.response is not None):
            raise SessionError(f"session.type cannot become {fields.type!r}: this session has a conversation "
                               "already; open a new session of that type", "invalid_value", "session.type")
        if transcribing and "input_audio_transcription" in sent and fields.input_audio_transcription is None:
            raise SessionError("a transcription session transcribes every turn: input_audio_transcription cannot "
                               "be null", "invalid_value", "session.input_audio_transcription")
        self._check_text_length(fields.instructions, "session.instructions")
        if fields.input_audio_transcription is not None:  # tokenized at every turn in the STT replica
            self._check_text_length(fields.input_audio_transcription.prompt,
                                    "session.input_audio_transcription.prompt")
        tools = _tool_dicts(fields.tools) if fields.tools is not None else config.tools
        tool_choice = fields.tool_choice if fields.tool_choice is not None else config.tool_choice
        if fields.tools is not None or fields.tool_choice is not None:
            self._tool_features(tools, tool_choice, "session")  # refused now, not at every response
        if fields.input_audio_transcription is not None and fields.input_audio_transcription.model:
            self.ingress.spec(fields.input_audio_transcription.model, Family.STT,
                              param="session.input_audio_transcription.model")
        if fields.input_audio_transcription is not None and fields.input_audio_transcription.language:
            await self._check_language(fields.input_audio_transcription)
        if fields.speed is not None and fields.speed != 1.0:
            await self._check_speed(fields.speed)
        if fields.instructions is not None:
            config.instructions = fields.instructions
        self.transcribing = transcribing
        if transcribing and config.transcription is None:
            config.transcription = InputTranscription()
        if fields.input_audio_format is not None and fields.input_audio_format != config.input_audio_format:
            self.g711_in = StreamResampler(g711.RATE, RATE)  # a new stream from here
        config.tools, config.tool_choice = tools, tool_choice
        for name in ("modalities", "voice", "temperature", "input_audio_format", "output_audio_format", "speed"):
            if getattr(fields, name) is not None:
                setattr(config, name, getattr(fields, name))
        if fields.max_response_output_tokens is not None:
            config.max_output_tokens = fields.max_response_output_tokens
        if "input_audio_transcription" in sent:
            config.transcription = fields.input_audio_transcription
        if "turn_detection" in sent:
            async with self._turn_lock:  # not while a weighed pause ends its turn
                config.turn_detection = fields.turn_detection
                if fields.turn_detection is not None and self.detector is not None:
                    # VAD stays on: the detector hears on, a turn under way included, with the new knobs
                    # (clients send their whole session, this turn_detection too, with any update)
                    self.detector.options = fields.turn_detection.vad()
                    if self.pause is not None and not fields.turn_detection.semantic:
                        await self._end_turn(self.pause.at)  # server_vad from here: the pause heard ends the turn
                else:
                    self._drop_pause()
                    self._detect_from(fields.turn_detection)
                    self.speech_start = None
        await self.send(self._session_event("updated"), session=self._rendered())

    async def transcription_session_update(self, event: dict) -> None:
        """Beta's update of a transcription session (input_audio_format, input_audio_transcription,
        turn_detection): session.update's, the session made (or kept) a transcription one."""
        session = event.get("session")
        if session is not None and not isinstance(session, dict):
            raise SessionError("'session' must be an object", "invalid_value", "session")
        await self.session_update({**event, "session": {**(session or {}), "type": "transcription"}})

    def _tool_features(self, tools: list[dict], choice: Any, where: str) -> dict[str, Any]:
        """The chat request fields that `tools` and `choice` make (the grammar of a forced call among them),
        checked as /v1/chat/completions checks its own: an error names `<where>.tools...` / `.tool_choice`."""
        from .protocol import ChatCompletionRequest
        from .routes.chat import chat_features

        if isinstance(choice, dict):  # Realtime's {"type": "function", "name"}: chat's names the function within
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        try:
            body = ChatCompletionRequest.model_validate({
                "model": self.llm or "-", "messages": [{"role": "user", "content": "-"}], "tool_choice": choice,
                "tools": [{"type": "function", "function": tool} for tool in tools] or None})
            features = chat_features(body, self.limits)
        except (ValidationError, APIError) as exc:
            _, error, _ = to_error(exc)
            param = (error.error.param or "tools").replace(".function", "")
            raise SessionError(error.error.message.replace(".function.", "."), error.error.code or "invalid_value",
                               f"{where}.{param}") from None
        return {key: value for key, value in features.items() if key in ("constraint", "tools", "tool_choice",
                                                                           "parallel_tool_calls")}

    def _check_text_length(self, text: str | None, param: str) -> None:
        """A text field the session keeps is bounded as the HTTP routes bound theirs: a 3.9 M-character
        transcription prompt was taken and tokenized at each turn (62.7 s and +1.2 GB in the STT replica)."""
        limit = self.limits.max_form_field_chars
        if text is not None and len(text) > limit:
            raise SessionError(f"{param.rsplit('.', 1)[-1]} has {len(text)} characters; at most "
                               f"max_form_field_chars={limit}", "string_above_max_length", param)

    async def _check_language(self, asked: InputTranscription) -> None:
        """A language the STT model does not know is refused as /v1/audio/transcriptions refuses it, not
        taken and then fail every turn (unanswered). Where it cannot be checked now (the model still loading:
        Realtime calls do not wait), the update goes through."""
        model = asked.model or self.ingress.default_model(Family.STT)
        try:
            await self.ingress.check_transcription_language(model, asked.language)
        except Exception as exc:
            error = as_api_error(exc)
            if error.param == "language":
                raise SessionError(error.message, error.code or "invalid_value",
                                   "session.input_audio_transcription.language") from None

    async def _check_speed(self, speed: float) -> None:
        """A speed the TTS model cannot speak at is refused now, as /v1/audio/speech refuses it, not taken and
        then fail every spoken response. Where it cannot be checked (the model still loading), it goes through."""
        try:
            await self.ingress.check_speech_speed(self.ingress.default_model(Family.TTS), speed)
        except Exception as exc:
            error = as_api_error(exc)
            if error.param == "speed":
                raise SessionError(error.message, error.code or "invalid_value", "session.speed") from None

    def _detect_from(self, detection: TurnDetection | None) -> None:
        """A new detector (or none) that hears the stream from its current sample on."""
        self.detector = TurnDetector(detection.vad()) if detection else None
        self.vad_input = StreamResampler(RATE, 16000)
        self.detector_origin = self.streamed

    async def append(self, event: dict) -> None:
        audio, fmt = event.get("audio"), self.config.input_audio_format
        if not isinstance(audio, str):
            shown = "pcm16 (24 kHz mono)" if fmt == "pcm16" else f"{fmt} (8 kHz mono)"
            raise SessionError(f"input_audio_buffer.append needs 'audio': base64 {shown}", "invalid_value", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise SessionError("'audio' is not valid base64", "invalid_value", "audio") from None
        if fmt != "pcm16":
            pcm = self.g711_in.feed(g711.decode(data, fmt).astype(np.float32))
            samples = _int16(pcm)
        elif len(data) % 2:
            raise SessionError("'audio' must be 16-bit samples (an even number of bytes)", "invalid_value", "audio")
        else:
            samples = np.frombuffer(data, dtype="<i2")
        async with self._turn_lock:  # a weighed pause may end the turn meanwhile (semantic_vad)
            await self._append(samples)

    async def _append(self, samples: np.ndarray) -> None:
        limit = int(self.limits.max_realtime_buffer_seconds * RATE)
        if self.detector is not None and self.speech_start is None:
            # server VAD, no speech under way: the oldest audio makes room, so a session that listens to
            # silence never fills up, and a commit takes all that is kept (speech the detector missed too)
            self._drop_before(self.streamed + len(samples) - limit)
        if self.buffered + len(samples) > limit and len(samples) <= limit and self.speech_start is not None:
            # server VAD, mid-speech (a long talk, steady noise): the turn so far is committed, so the
            # buffer never fills and locks the session; the speech goes on into the next turn
            await self._end_turn(self.streamed)
            if self.detector is not None:
                self.detector.reset()
        if self.buffered + len(samples) > limit:
            raise SessionError(
                f"the input audio buffer would hold {(self.buffered + len(samples)) / RATE:.1f} s; at most "
                f"max_realtime_buffer_seconds={self.limits.max_realtime_buffer_seconds:g} s (commit or clear it)",
                "input_audio_buffer_full", "audio")
        self.buffer.append(samples)
        self.buffered += len(samples)
        self.streamed += len(samples)
        if self.detector is not None:
            await self._detect(samples)
            await self._end_if_paused_long_enough()

    async def _detect(self, samples: np.ndarray) -> None:
        assert self.detector is not None
        # resampling and the VAD model take ~10 ms per second of audio: a long append (up to ~59 s in one
        # event) runs in a thread, so it does not hold up every other request of the ingress (0.5-0.8 s
        # before). Events are handled one at a time, so the detector is never fed twice at once.
        if len(samples) <= INLINE_DETECT_SAMPLES:
            turns = self._turns(samples)
        else:
            turns = await asyncio.to_thread(self._turns, samples)
        for turn in turns:
            at = self.detector_origin + turn.sample * RATE // 16000  # stream sample, 24 kHz
            if turn.kind == "started" and self.pause is not None:
                self._drop_pause()  # semantic_vad: the user goes on after a pause; the same turn continues
            elif turn.kind == "started":
                self.speech_start, self.speech_item = at, _id("item")
                # the turn begins at its padded start: the silence kept before it (up to the bound) would
                # otherwise leave the buffer full, and the turn's next append would commit it cut short
                self._drop_before(self._padded_start(at))
                # OpenAI's audio_start_ms is where the committed audio will begin: the padding included
                await self.send("input_audio_buffer.speech_started",
                                audio_start_ms=self._padded_start(at) * 1000 // RATE, item_id=self.speech_item)
                detection = self.config.turn_detection
                active = self.response is not None and not self.response.done() and not self.response_out_of_band
                if active and detection and detection.interrupt_response:  # OpenAI's: the conversation's response
                    await self.cancel_response("turn_detected")
            elif self.speech_start is not None and self.config.turn_detection and self.config.turn_detection.semantic:
                self._weigh_pause(at)
            elif self.speech_start is not None:
                await self._end_turn(at)

    # -- semantic_vad: a pause ends the turn once its silence is as long as its words ask (semantic_vad.py) --
    def _weigh_pause(self, at: int) -> None:
        """The turn's speech paused at stream sample `at`: transcribe the turn so far and score its words."""
        assert self.speech_start is not None
        self._drop_pause()
        audio = self._take(self._padded_start(self.speech_start), at)
        last = self.items[-1] if self.items else None  # a reply the user answers gives the words their sense
        answered = last.text if last is not None and last.role == "assistant" and last.type == "message" else None
        self.pause = Pause(at)
        self.pause.task = asyncio.ensure_future(self._score_pause(self.pause, audio, answered))

    async def _score_pause(self, pause: Pause, audio: np.ndarray, answered: str | None) -> None:
        probability = None
        try:
            pause.transcript = await self._heard(audio)
            if self.llm is not None:  # no LLM in the app: the turn ends after the unscored wait
                probability = await self.ingress.end_of_turn(self.llm, pause.transcript.text, answered)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # unscored: the turn ends after the unscored wait; its commit reports failures
            log.info("semantic_vad could not weigh a pause: %s", exc)
        detection = self.config.turn_detection
        eagerness = detection.eagerness if detection else "auto"
        pause.wait = int(semantic_vad.wait_s(probability, eagerness) * RATE)
        async with self._turn_lock:  # the silence since may already be long enough
            await self._end_if_paused_long_enough()

    async def _end_if_paused_long_enough(self) -> None:
        pause, detection = self.pause, self.config.turn_detection
        if pause is None or detection is None:
            return
        silence = self.streamed - pause.at
        longest = int(semantic_vad.LONGEST_WAIT_S[detection.eagerness] * RATE)
        if silence >= longest or (pause.wait is not None and silence >= pause.wait):
            await self._end_turn(pause.at)

    def _drop_pause(self) -> None:
        """The pause weighed is over (speech again, a clear, a commit, VAD off): its weighing is not needed."""
        if self.pause is not None:
            self.pause.task.cancel()
            self.pause = None

    def _turns(self, samples: np.ndarray) -> list:
        assert self.detector is not None
        return list(self.detector.feed(self.vad_input.feed(samples.astype(np.float32) / 32768.0)))

    def _padded_start(self, at: int) -> int:
        """Where a turn whose speech starts at stream sample `at` begins: prefix_padding_ms before it."""
        detection = self.config.turn_detection
        pad = (detection.vad().prefix_padding_ms if detection else 300) * RATE // 1000
        return max(self.buffer_start, at - pad)

    async def _end_turn(self, at: int) -> None:
        """Server VAD: the speech that began at `speech_start` ended at stream sample `at`; commit it. A pause
        weighed at `at` (semantic_vad) has transcribed this very audio: its transcript is the turn's."""
        start = self.speech_start
        assert start is not None
        pause, self.pause = self.pause, None
        heard = pause.transcript if pause is not None and pause.at == at else None
        if pause is not None and pause.task is not asyncio.current_task():
            pause.task.cancel()  # its score is no longer needed (its transcript, if any, is taken above)
        await self.send("input_audio_buffer.speech_stopped", audio_end_ms=at * 1000 // RATE, item_id=self.speech_item)
        detection = self.config.turn_detection
        answer = bool(detection and detection.create_response) and not self.transcribing
        await self._commit(self._padded_start(start), at, self.speech_item or _id("item"), auto_respond=answer,
                           heard=heard)
        self.speech_start = None

    def _take(self, begin: int, end: int) -> np.ndarray:
        audio = np.concatenate(self.buffer) if self.buffer else np.zeros(0, dtype=np.int16)
        return audio[max(0, begin - self.buffer_start):max(0, end - self.buffer_start)]

    def _drop_before(self, sample: int) -> None:
        """Forget the audio before stream sample `sample`, appended piece by piece (no copy of the rest:
        a listening session at its bound drops a little at every append)."""
        while self.buffer and sample > self.buffer_start:
            head = self.buffer[0]
            cut = min(len(head), sample - self.buffer_start)
            if cut == len(head):
                self.buffer.pop(0)
            else:
                self.buffer[0] = head[cut:]
            self.buffered -= cut
            self.buffer_start += cut

    async def commit(self, event: dict) -> None:
        async with self._turn_lock:
            await self._commit_buffer()

    async def _commit_buffer(self) -> None:
        self._end_g711_stream()
        if self.buffered * 1000 // RATE < MIN_COMMIT_MS:
            raise SessionError(f"the input audio buffer holds {self.buffered * 1000 // RATE} ms; a commit needs at "
                               f"least {MIN_COMMIT_MS} ms", "input_audio_buffer_commit_empty")
        self._drop_pause()
        await self._commit(self.buffer_start, self.streamed, self.speech_item or _id("item"), auto_respond=False)
        self.speech_start = None
        if self.detector is not None:
            self.detector.reset()

    async def _commit(self, begin: int, end: int, item_id: str, auto_respond: bool,
                      heard: TranscribeResult | None = None) -> None:
        audio = self._take(begin, end)
        self._drop_before(end)
        if end >= self.streamed:
            self.buffer, self.buffered, self.buffer_start = [], 0, self.streamed
        item = Item(item_id, "user", "", audio=True)
        previous = self._add(item)
        self.speech_item = None
        await self.send("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        await self.send("conversation.item.created", previous_item_id=previous, item=item.render())
        task = asyncio.ensure_future(self._transcribe(item, audio, auto_respond, heard))
        self.transcriptions.add(task)
        task.add_done_callback(self.transcriptions.discard)

    async def _heard(self, audio: np.ndarray) -> TranscribeResult:
        """The session's STT model's transcript of `audio` (pcm16 at 24 kHz)."""
        config = self.config.transcription
        model = (config.model if config and config.model else None) or self.ingress.default_model(Family.STT)
        samples = resample(audio.astype(np.float32) / 32768.0, RATE, 16000)
        return await self.ingress.transcribe(TranscribeParams(
            model=self.ingress.spec(model, Family.STT).name, audio=samples, sample_rate=16000,
            language=config.language if config else None, prompt=config.prompt if config else None))

    async def _transcribe(self, item: Item, audio: np.ndarray, auto_respond: bool,
                          heard: TranscribeResult | None = None) -> None:
        config = self.config.transcription
        try:
            result = heard if heard is not None else await self._heard(audio)
            item.text = result.text
            if config is not None:
                await self.send("conversation.item.input_audio_transcription.delta", item_id=item.id,
                                content_index=0, delta=result.text)
                await self.send("conversation.item.input_audio_transcription.completed", item_id=item.id,
                                content_index=0, transcript=result.text,
                                usage={"type": "duration", "seconds": round(len(audio) / RATE, 3)})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _, body, _ = to_error(exc)
            error = body.error
            if config is not None:
                await self.send("conversation.item.input_audio_transcription.failed", item_id=item.id,
                                content_index=0, error=error.model_dump())
            else:  # no transcription events were asked for, yet the client must learn why no answer comes
                await self.send_error(f"the turn {item.id} could not be transcribed, so it is not answered: "
                                      f"{error.message}", error.code, error.param, error.type)
            return
        if not auto_respond:
            return
        if item not in self.items:
            return  # the client deleted the turn while it was heard: there is nothing to answer
        if self.speech_start is not None:
            return  # the user speaks again: the next turn's answer covers this one too
        if self.response is not None and not self.response.done():
            self.respond_after = True  # answered when the response in progress ends
            return
        self._start_response(ResponseFields())

    def _end_g711_stream(self) -> None:
        """A commit by the client ends its G.711 stream: what the resampler still holds back (its filter's
        reach, ~4 ms) joins the buffer, and the next append starts a stream of its own. Held back, 100 ms of
        G.711 committed was refused as 98 ms, and each turn's last milliseconds began the next one."""
        tail = self.g711_in.flush()
        self.g711_in = StreamResampler(g711.RATE, RATE)
        if tail.size:
            samples = _int16(tail)
            self.buffer.append(samples)
            self.buffered += len(samples)
            self.streamed += len(samples)

    async def clear(self, event: dict) -> None:
        async with self._turn_lock:
            await self._clear()

    async def _clear(self) -> None:
        self.g711_in = StreamResampler(g711.RATE, RATE)  # what it held back is cleared too
        self.buffer, self.buffered, self.buffer_start = [], 0, self.streamed
        self._drop_pause()
        self.speech_start = None
        if self.detector is not None:
            self.detector.reset()
        await self.send("input_audio_buffer.cleared")

    async def item_create(self, event: dict) -> None:
        raw = event.get("item")
        if not isinstance(raw, dict):
            raise SessionError("conversation.item.create needs an 'item'", "invalid_value", "item")
        parsed = _parse(ConversationItem, raw, "item")
        if parsed.type != "message":
            await self._function_item_create(parsed, event.get("previous_item_id"))
            return
        audio = self._item_audio(parsed)
        spoken_ms = self._spoken_ms(parsed)
        text = parsed.words()
        if len(text) > self.limits.max_form_field_chars:
            raise SessionError(f"the item has {len(text)} characters; at most max_form_field_chars="
                               f"{self.limits.max_form_field_chars}", "string_above_max_length", "item.content")
        self._check_new_id(parsed.id)
        at = self._insert_at(event.get("previous_item_id"))
        item = Item(parsed.id or _id("item"), parsed.role, text, audio=audio is not None or spoken_ms is not None)
        if spoken_ms:
            item.spoken = [[0, text, spoken_ms]]  # what a later truncate cuts
        previous = self._add(item, at)
        await self.send("conversation.item.created", previous_item_id=previous, item=item.render())
        if audio is not None:  # heard as a committed turn is (its transcription events), never answered unasked
            task = asyncio.ensure_future(self._transcribe(item, audio, auto_respond=False))
            self.transcriptions.add(task)
            task.add_done_callback(self.transcriptions.discard)

    def _spoken_ms(self, item: ConversationItem) -> float | None:
        """An assistant's spoken item (a conversation restored from the items this server sent): the
        milliseconds of its `audio` in the session's output_audio_format (0 without it), or None for another
        item. Its words are its `transcript`."""
        parts = [part for part in item.content or [] if part.type in SPOKEN_PARTS]
        if not parts:
            return None
        if item.role != "assistant" or len(item.content or []) > 1:
            raise SessionError(f"an {parts[0].type} part is an assistant's whole item (a user's audio is "
                               "input_audio): send it alone, in an assistant item", "invalid_value", "item.content")
        try:
            data = base64.b64decode(parts[0].audio or "", validate=True)
        except (binascii.Error, ValueError):
            raise SessionError("item.content[0].audio is not valid base64", "invalid_value",
                               "item.content.0.audio") from None
        pcm16 = self.config.output_audio_format == "pcm16"
        return len(data) / (2 * RATE if pcm16 else g711.RATE) * 1000

    def _check_new_id(self, item_id: str | None) -> None:
        """A client's id for a new item must be one the conversation has not."""
        if item_id is not None and any(item.id == item_id for item in self.items):
            raise SessionError(f"the conversation has an item {item_id!r} already; give the new item another id, "
                               "or leave 'id' out for one the server makes", "invalid_value", "item.id")

    async def _function_item_create(self, parsed: ConversationItem, previous_item_id: Any) -> None:
        """A function call (a history the client replays) or a function's output (what the client's code
        answered a call with: the next response reads it as a `tool` message)."""
        text = parsed.output if parsed.type == "function_call_output" else parsed.arguments
        assert text is not None and parsed.call_id is not None
        if len(text) > self.limits.max_form_field_chars:
            field_name = "output" if parsed.type == "function_call_output" else "arguments"
            raise SessionError(f"item.{field_name} has {len(text)} characters; at most max_form_field_chars="
                               f"{self.limits.max_form_field_chars}", "string_above_max_length", f"item.{field_name}")
        self._check_new_id(parsed.id)
        at = self._insert_at(previous_item_id)
        item = parsed.function_item()
        previous = self._add(item, at)
        await self.send("conversation.item.created", previous_item_id=previous, item=item.render())

    def _item_audio(self, item: ConversationItem) -> np.ndarray | None:
        """An item's input_audio as the session's pcm16 at 24 kHz (a user's turn sent whole, not through the
        buffer), or None; bounded as the buffer is (max_realtime_buffer_seconds)."""
        parts = [part for part in item.content if part.type == "input_audio"]
        if not parts:
            return None
        if item.role != "user" or len(item.content) > 1:
            raise SessionError("an input_audio part is a user's whole item: send it alone, in a user item",
                               "invalid_value", "item.content")
        try:
            data = base64.b64decode(parts[0].audio or "", validate=True)
        except (binascii.Error, ValueError):
            raise SessionError("item.content[0].audio is not valid base64", "invalid_value",
                               "item.content.0.audio") from None
        fmt = self.config.input_audio_format
        if fmt != "pcm16":
            resampler = StreamResampler(g711.RATE, RATE)
            pcm = np.concatenate([resampler.feed(g711.decode(data, fmt).astype(np.float32)), resampler.flush()])
            samples = _int16(pcm)
        elif len(data) % 2:
            raise SessionError("item.content[0].audio must be 16-bit samples (an even number of bytes)",
                               "invalid_value", "item.content.0.audio")
        else:
            samples = np.frombuffer(data, dtype="<i2")
        seconds, limit = len(samples) / RATE, self.limits.max_realtime_buffer_seconds
        if not samples.size or seconds > limit:
            raise SessionError(f"item.content[0].audio holds {seconds:.1f} s of {fmt}; it must hold some, and at most "
                               f"max_realtime_buffer_seconds={limit:g} s", "invalid_value", "item.content.0.audio")
        return samples

    def _item(self, event: dict) -> Item:
        """The item an event's `item_id` names (an error event naming it when there is none)."""
        item_id = event.get("item_id")
        if not isinstance(item_id, str):
            raise SessionError(f"{event['type']} needs 'item_id', the id of an item of this conversation",
                               "invalid_value", "item_id")
        for item in self.items:
            if item.id == item_id:
                return item
        raise SessionError(f"item_id {item_id[:64]!r} is no item of this conversation", "item_not_found", "item_id")

    async def _stop_writing(self, item: Item) -> None:
        """A truncate or delete of the item the response in progress writes ends that response first (the
        client says the user heard only so much, or wants it gone: the rest must not be made)."""
        if item is self.response_item and self.response is not None and not self.response.done():
            await self.cancel_response("client_cancelled")

    async def item_truncate(self, event: dict) -> None:
        """What the user heard of an assistant's spoken item (a client that stopped its playback at a barge-in):
        its transcript is cut to what its first `audio_end_ms` said, so later prompts hold only what was heard.
        OpenAI's models keep the heard audio instead; ours read text, so the words heard stay."""
        item = self._item(event)
        if item.role != "assistant" or not item.audio:
            raise SessionError(f"item {item.id!r} is not an assistant's audio item; only those can be truncated",
                               "invalid_value", "item_id")
        if event.get("content_index", 0) != 0:
            raise SessionError(f"content_index {str(event.get('content_index'))[:32]} does not exist: the item has one "
                               "content part, index 0", "invalid_value", "content_index")
        end_ms = event.get("audio_end_ms")
        if not isinstance(end_ms, int) or isinstance(end_ms, bool) or end_ms < 0:
            raise SessionError("audio_end_ms must be a whole number of milliseconds, 0 or more: how much of the "
                               "item's audio was played", "invalid_value", "audio_end_ms")
        # checked before the response writing it is ended: a refused truncate changes nothing (the audio sent
        # so far is all a client can have played, and it only grows)
        if end_ms > round(item.audio_ms):
            raise SessionError(f"audio_end_ms={end_ms} is past the end of item {item.id!r}'s audio "
                               f"({round(item.audio_ms)} ms)", "invalid_value", "audio_end_ms")
        await self._stop_writing(item)
        item.text = item.heard(end_ms)
        item.spoken = [[0, item.text, float(end_ms)]]  # what is left is what was heard
        await self.send("conversation.item.truncated", item_id=item.id, content_index=0, audio_end_ms=end_ms)

    async def item_delete(self, event: dict) -> None:
        item = self._item(event)
        await self._stop_writing(item)
        if item in self.items:  # (the cancelled response left it there)
            index = self.items.index(item)
            self.items.remove(item)
            if self.prompt_from == item.id:  # prompts started at it: they start at the item after it now
                self.prompt_from = self.items[index].id if index < len(self.items) else None
        await self.send("conversation.item.deleted", item_id=item.id)

    async def item_retrieve(self, event: dict) -> None:
        item = self._item(event)
        await self.send("conversation.item.retrieved", item=item.render())

    def _prompt_items(self) -> list[Item]:
        """The items a response shows the LLM: those from where the last response had to start (the
        older ones were left out to fit its context), and every system item."""
        start = next((i for i, item in enumerate(self.items) if item.id == self.prompt_from), 0)
        return [item for i, item in enumerate(self.items) if i >= start or item.role == "system"]

    def _shorter(self, history: list[Item]) -> list[Item] | None:
        """`history` with the oldest half of its items left out, up to its last user item and keeping
        system items (the client's standing instructions); None when nothing more can go. Later
        responses start from there (no retries every turn); the items stay in the conversation."""
        last_user = max((i for i, item in enumerate(history) if item.role == "user"), default=len(history) - 1)
        droppable = [item for item in history[:last_user] if item.role != "system"]
        if not droppable:
            return None
        gone = {id(item) for item in droppable[:(len(droppable) + 1) // 2]}
        kept = [item for item in history if id(item) not in gone]
        self.prompt_from = next((item.id for item in kept if item.role != "system"), None)  # None: from the start
        return kept

    def _insert_at(self, previous_item_id: Any) -> int:
        """Where conversation.item.create puts its item: after `previous_item_id` ('root': first; none: last)."""
        if previous_item_id is None:
            return len(self.items)
        if previous_item_id == "root":
            return 0
        for index, item in enumerate(self.items):
            if item.id == previous_item_id:
                return index + 1
        shown = previous_item_id[:64] if isinstance(previous_item_id, str) else previous_item_id
        raise SessionError(f"previous_item_id {shown!r} is no item of this conversation; give the id of one, "
                           "'root' for the start, or leave it out to add the item at the end", "invalid_value",
                           "previous_item_id")

    def _add(self, item: Item, at: int | None = None) -> str | None:
        """Put `item` at index `at` (None: the end); the id of the item now before it."""
        self.items.insert(len(self.items) if at is None else at, item)
        while len(self.items) > self.limits.max_realtime_items:  # the oldest go first (not the new one)
            self.items.remove(self.items[1] if self.items[0] is item else self.items[0])
        index = self.items.index(item)
        return self.items[index - 1].id if index else None

    async def response_create(self, event: dict) -> None:
        if self.transcribing:
            raise SessionError("a transcription session makes no responses: it transcribes each turn; open a "
                               "Realtime session (session.type 'realtime') for answers", "invalid_value", "type")
        if self.response is not None and not self.response.done():
            raise SessionError("a response is in progress; cancel it (response.cancel) or wait for response.done",
                               "conversation_already_has_active_response")
        fields = _parse(ResponseFields, event.get("response"), "response")
        refused = fields.refused()
        if refused is not None:
            raise SessionError(refused[0], "unsupported", refused[1])
        self._check_text_length(fields.instructions, "response.instructions")
        if fields.tools is not None or fields.tool_choice is not None:
            self._tool_features(*fields.tools_for(self.config), "response")
        prompt = self._response_input(fields.input) if fields.input is not None else None
        self._start_response(fields, prompt)

    def _response_input(self, entries: list[dict]) -> list[Item]:
        """A response's own input: items written out (text messages, function calls and their outputs), or
        references to items of the conversation ({"type": "item_reference", "id"}); none is added to it."""
        items = []
        for i, raw in enumerate(entries):
            where = f"response.input.{i}"
            if raw.get("type") == "item_reference":
                ref = raw.get("id")
                found = next((item for item in self.items if item.id == ref), None) if isinstance(ref, str) else None
                if found is None:
                    raise SessionError(f"{where} refers to {str(ref)[:64]!r}, which is no item of this conversation",
                                       "item_not_found", f"{where}.id")
                items.append(found)
                continue
            parsed = _parse(ConversationItem, raw, where)
            if parsed.type != "message":
                item = parsed.function_item()
            else:
                assert parsed.role is not None and parsed.content is not None
                if any(part.type == "input_audio" for part in parsed.content):
                    raise SessionError(f"{where} holds input_audio, which a response's own input does not transcribe: "
                                       "create the item in the conversation (it is transcribed) and refer to it with "
                                       '{"type": "item_reference", "id": ...}', "invalid_value", f"{where}.content")
                item = Item(parsed.id or _id("item"), parsed.role, parsed.words())
            self._check_text_length(item.text or item.arguments, f"{where}.content")
            items.append(item)
        return items

    async def response_cancel(self, event: dict) -> None:
        named = event.get("response_id")
        if named is not None and not isinstance(named, str):
            raise SessionError("response_id must be a string: the id of the response to cancel", "invalid_value",
                               "response_id")
        active = self.response is not None and not self.response.done()
        if named is not None and (not active or named != self.response_id):
            # a cancel for a response that has ended must not cancel the next one
            now = f"the response in progress is {self.response_id}" if active else "no response is in progress"
            raise SessionError(f"response {named[:64]!r} is not in progress ({now}); nothing was cancelled",
                               "response_cancel_not_active", "response_id")
        if not active:
            raise SessionError("no response is in progress", "response_cancel_not_active")
        await self.cancel_response("client_cancelled")

    async def cancel_response(self, reason: str) -> None:
        """Stop the response at once (LLM and TTS); it ends with response.done, status cancelled."""
        task = self.response
        if task is None or task.done():
            return
        if reason != "client_cancelled":
            self.respond_after = False  # the user spoke again: the next turn's answer covers the waiting one too
        if not self.response_started:
            await asyncio.sleep(0)  # let it start (response.created), so that it can end with response.done
        if not self.response_closing:
            self.cancel_reason = reason
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    # -- a response ----------------------------------------------------------------------------------------
    def _start_response(self, fields: ResponseFields, prompt: list[Item] | None = None) -> None:
        """`prompt`: the response's own input (out of band), else the conversation."""
        self.response_started = self.response_closing = False
        self.response_id = _id("resp")
        self.response_out_of_band = fields.out_of_band
        self.response = asyncio.ensure_future(self._respond(fields, self.response_id, prompt))

    async def _respond(self, fields: ResponseFields, response_id: str, prompt: list[Item] | None = None) -> None:
        config = self.config
        in_conversation = not fields.out_of_band  # its items join the conversation (with conversation.item events)
        modalities = fields.modalities or config.modalities
        spoken = "audio" in modalities
        voice = fields.voice or config.voice
        output_format = config.output_audio_format  # as the response starts: its audio is of one format
        limit = next((value for value in (fields.max_output_tokens, fields.max_response_output_tokens)
                      if value is not None), config.max_output_tokens)
        item = Item(_id("item"), "assistant", "", audio=spoken, status="in_progress")
        self.response_item = item
        outputs: list[Item] = []  # the response's output items in order: its message, its function calls
        base = {"response_id": response_id}
        where = {**base, "item_id": item.id, "output_index": 0, "content_index": 0}
        status, details, usage, text = "completed", None, {}, ""
        opened = 0  # 1: its output item was announced (output_item.added), 2: its content part too
        tools, tool_choice = fields.tools_for(config)

        async def open_message() -> None:
            nonlocal opened
            where["output_index"] = len(outputs)
            outputs.append(item)
            previous = self._add(item) if in_conversation else None
            opened = 1  # sent whole even if a cancel lands (shield), so that its .done event closes it
            await asyncio.shield(self.send("response.output_item.added", output_index=where["output_index"],
                                           item=item.render("in_progress"), **base))
            if in_conversation:
                await self.send("conversation.item.created", previous_item_id=previous,
                                item=item.render("in_progress"))
            part = {"type": "audio", "transcript": ""} if spoken else {"type": "text", "text": ""}
            opened = 2
            await asyncio.shield(self.send("response.content_part.added", part=part, **where))

        async def function_call(call: dict) -> None:
            """A call the model made: an output item of its own, announced and closed at once (it comes whole)."""
            function = call["function"]
            called = Item(_id("item"), "assistant", "", type="function_call", call_id=call["id"],
                          name=function["name"], arguments=function["arguments"])
            index = len(outputs)
            outputs.append(called)
            previous = self._add(called) if in_conversation else None
            on = {**base, "item_id": called.id, "output_index": index, "call_id": called.call_id}
            await asyncio.shield(self.send("response.output_item.added", output_index=index,
                                           item=called.render("in_progress"), **base))
            if in_conversation:
                await self.send("conversation.item.created", previous_item_id=previous,
                                item=called.render("in_progress"))
            await self.send("response.function_call_arguments.delta", delta=called.arguments, **on)
            await self.send("response.function_call_arguments.done", name=called.name, arguments=called.arguments,
                            **on)
            await self.send("response.output_item.done", output_index=index, item=called.render(), **base)

        def response(status_: str, output: list, usage_: dict | None = None, details_: Any = None) -> dict:
            return {"id": response_id, "object": "realtime.response", "status": status_, "status_details": details_,
                    "output": output, "conversation_id": self.conversation_id if in_conversation else None,
                    "modalities": modalities, "voice": voice, "output_audio_format": output_format,
                    "metadata": fields.metadata, "usage": usage_}

        self.response_started = True
        try:
            # shielded: a cancel landing now still lets the client see the response it then sees end
            await asyncio.shield(self.send("response.created", response=response("in_progress", [])))
            if self.transcriptions:  # the user's last words are still being transcribed; a cancel of the
                # response must not cancel them (shield): their items get their transcripts all the same
                await asyncio.gather(*(asyncio.shield(t) for t in self.transcriptions), return_exceptions=True)
            instructions = fields.instructions if fields.instructions is not None else config.instructions
            if self.llm is None:
                raise ServiceUnavailableError("this app serves no LLM or VLM model to answer with: add one to "
                                              "serve_config.yaml, or open a transcription session "
                                              "(?intent=transcription)")
            llm = self.ingress.spec(self.llm)
            # capped at the model's max_new_tokens, not refused ("inf" and OpenAI's 4096 mean "all it may"),
            # and asked for: the prompt must leave the reply that room, or the oldest items are left out (as
            # OpenAI's truncation keeps room for the output), not the reply cut to what is left
            capped = limit == "inf" or int(limit) >= llm.max_new_tokens
            max_new: int | None = llm.max_new_tokens if capped else int(limit)
            temperature = fields.temperature if fields.temperature is not None else config.temperature

            features = self._tool_features(tools, tool_choice, "response" if fields.tools is not None else "session")

            async def ask(history: list[Item]) -> ChatParams:
                return await self.ingress.chat_params(
                    llm, _messages(instructions, history), 0.0, max_new_tokens=max_new, temperature=temperature,
                    priority=self.ingress.voice_priority(llm), **features)

            history = prompt if prompt is not None else self._prompt_items()
            chat = await ask(history)
            if not tools:  # with tools the reply may be calls only: its message is opened at its first text
                await open_message()
            tts = self.ingress.default_model(Family.TTS)
            speech = SpeechParams(model=tts, text="", voice=voice, speed=config.speed) if spoken else None
            while True:
                reply_events = spoken_reply(self.ingress, chat, speech, self.ingress._tts_chars(),
                                             self.ingress.config.ingress.voice_first_piece_chars)
                try:
                    async with contextlib.aclosing(reply_events) as reply:
                        async for piece in reply:
                            if isinstance(piece, ToolCall):
                                await function_call(piece.call)
                                continue
                            if isinstance(piece, (TextDelta, AudioPiece)) and opened < 2:
                                await open_message()
                            if isinstance(piece, TextDelta):
                                text += piece.text
                                item.text = text
                                kind = "response.audio_transcript.delta" if spoken else "response.text.delta"
                                await self.send(kind, delta=piece.text, **where)
                            elif isinstance(piece, AudioPiece):
                                waveform, rate = piece.speech.waveform, piece.speech.sample_rate
                                item.add_audio(piece.sentence, piece.text, len(waveform) / rate * 1000)
                                data = _encoded(waveform, rate, output_format)
                                await self.send("response.audio.delta", delta=base64.b64encode(data).decode(),
                                                **where)
                            elif isinstance(piece, ReplyDone):
                                usage = _usage(piece)
                                if piece.finish_reason == "length":
                                    status, details = "incomplete", {"type": "incomplete",
                                                                     "reason": "max_output_tokens"}
                    break
                except Exception as exc:
                    error = as_api_error(exc)  # mapped once: an unexpected error is logged once
                    too_long = error.code == "context_length_exceeded" and not text
                    # a response's own input is its client's to fit: the conversation's truncation is not for it
                    shorter = self._shorter(history) if too_long and prompt is None else None
                    if shorter is not None:
                        history = shorter  # OpenAI's truncation 'auto': the oldest items are left out of the prompt
                    elif too_long and capped and max_new is not None:
                        max_new = None  # not even the newest turn leaves the model's limit: the reply gets what fits
                    else:
                        raise error from None
                    chat = await ask(history)
        except asyncio.CancelledError:
            status, details = "cancelled", {"type": "cancelled", "reason": self.cancel_reason}
        except Exception as exc:
            _, body, _ = to_error(exc)
            status, details = "failed", {"type": "failed", "error": body.error.model_dump()}
            await self.send_exception(exc)
        item.text = text
        self.response_closing = True  # from here on a cancel waits for response.done instead
        item_status = item.status = "completed" if status == "completed" else "incomplete"
        # what was opened is closed however the response ended: OpenAI sends these .done events "also when a
        # Response is interrupted, incomplete, or cancelled", and clients mark the item done by them
        if opened == 2 and spoken:
            await self.send("response.audio.done", **where)
            await self.send("response.audio_transcript.done", transcript=text, **where)
            await self.send("response.content_part.done", part={"type": "audio", "transcript": text}, **where)
        elif opened == 2:
            await self.send("response.text.done", text=text, **where)
            await self.send("response.content_part.done", part={"type": "text", "text": text}, **where)
        if opened:
            await self.send("response.output_item.done", output_index=where["output_index"],
                            item=item.render(item_status), **base)
        output = [out.render(item_status if out is item else None) for out in outputs
                  if out in self.items or not in_conversation]
        await self.send("response.done", response=response(status, output, usage, details))
        reason, self.cancel_reason = self.cancel_reason, "client_cancelled"
        # a turn that waited for this response is answered now, also when the client cancelled this one
        # (response.cancel stops a response, not the user's next turn); not when the session is ending
        if self.respond_after and not self._closed and (status != "cancelled" or reason == "client_cancelled"):
            self.respond_after = False
            self._start_response(ResponseFields())


def _chat_model(ingress: Ingress) -> str | None:
    """The model that answers unless the session asks for another: the app's first LLM, else its first VLM."""
    for family in (Family.LLM, Family.VLM):
        try:
            return ingress.default_model(family)
        except ServiceUnavailableError:
            continue
    return None


def _messages(instructions: str, items: list[Item]) -> list[dict]:
    """The LLM's prompt: the instructions, then the conversation. An item with no text is left out (a
    response that failed, or was cut before its first word, said nothing: shown as the assistant saying
    "(silence)", the model imitates it), except a user's turn of audio with no words in it: "(silence)"."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    for i in items:
        if i.type == "function_call":  # calls in a row are one assistant turn, as chat completions write them
            call = {"id": i.call_id, "type": "function",
                    "function": {"name": i.name, "arguments": _arguments(i.arguments)}}
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif i.type == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": i.call_id, "content": i.text})
        elif i.text or (i.role == "user" and i.audio):
            messages.append({"role": i.role, "content": i.text or "(silence)"})
    if not any(m["role"] == "user" for m in messages):
        messages.append({"role": "user", "content": "(silence)"})
    return messages


def _tool_dicts(tools: list[RealtimeTool]) -> list[dict]:
    """Realtime's tools as chat completions' functions take them (name, description, parameters)."""
    return [tool.model_dump(exclude={"type"}, exclude_none=True) for tool in tools]


def _int16(samples: np.ndarray) -> np.ndarray:
    """Resampled G.711 input as the session's pcm16 samples."""
    return np.clip(samples.round(), -32768, 32767).astype("<i2")


def _arguments(text: str) -> Any:
    """A call's arguments as chat templates take them (a mapping; text that is not a JSON object stays text),
    as protocol.ChatMessage.to_dict gives a chat completion's."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _encoded(waveform: Any, rate: int, fmt: str) -> bytes:
    """A piece of speech as the session's output format: pcm16 at 24 kHz, or G.711 at 8 kHz."""
    samples = np.nan_to_num(np.asarray(waveform, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    samples = resample(samples, rate, RATE if fmt == "pcm16" else g711.RATE)
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    return pcm.tobytes() if fmt == "pcm16" else g711.encode(pcm, fmt)


def _usage(done: ReplyDone) -> dict:
    prompt, completion = done.usage.get("prompt_tokens", 0), done.usage.get("completion_tokens", 0)
    return {"total_tokens": prompt + completion, "input_tokens": prompt, "output_tokens": completion,
            "input_token_details": {"text_tokens": prompt, "audio_tokens": 0, "cached_tokens": 0},
            "output_token_details": {"text_tokens": completion, "audio_tokens": 0}}


# --- the GA protocol (client.realtime.connect), translated to and from the beta one at the edges ---------

GA_NAMES = {
    "response.text.delta": "response.output_text.delta", "response.text.done": "response.output_text.done",
    "response.audio.delta": "response.output_audio.delta", "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
    "conversation.item.created": "conversation.item.added",
}
# the GA protocol's audio formats, by the beta names the session keeps
_GA_FORMATS = {"pcm16": {"type": "audio/pcm", "rate": RATE}, "g711_ulaw": {"type": "audio/pcmu"},
               "g711_alaw": {"type": "audio/pcma"}}


def _to_ga(value: Any) -> Any:
    """Server event payloads in GA shape: sessions, output content types, output_modalities."""
    if isinstance(value, list):
        return [_to_ga(v) for v in value]
    if not isinstance(value, dict):
        return value
    if value.get("object") == "realtime.transcription_session":
        return {"type": "transcription", "object": value["object"], "id": value["id"],
                "audio": {"input": {"format": _GA_FORMATS[value["input_audio_format"]],
                                    "transcription": value["input_audio_transcription"],
                                    "turn_detection": value["turn_detection"], "noise_reduction": None}},
                "include": None}
    if value.get("object") == "realtime.session":
        return {"type": "realtime", "object": "realtime.session", "id": value["id"], "model": value["model"],
                "output_modalities": ["audio"] if "audio" in value["modalities"] else ["text"],
                "instructions": value["instructions"], "max_output_tokens": value["max_response_output_tokens"],
                "tools": value["tools"], "tool_choice": value["tool_choice"],
                "audio": {"input": {"format": _GA_FORMATS[value["input_audio_format"]],
                                    "transcription": value["input_audio_transcription"],
                                    "turn_detection": value["turn_detection"]},
                          "output": {"format": _GA_FORMATS[value["output_audio_format"]], "voice": value["voice"],
                                     "speed": value["speed"]}}}
    out = {key: _to_ga(v) for key, v in value.items()}
    if out.get("type") == "audio" and "transcript" in out:
        out["type"] = "output_audio"
    elif out.get("type") == "text" and "text" in out:
        out["type"] = "output_text"
    if out.get("object") == "realtime.response":
        out["output_modalities"] = out.pop("modalities", None)
    return out


# beta field -> where a GA event has it (the longest prefix first: errors name the GA client's own field)
_GA_PARAMS = (
    ("session.input_audio_transcription", "session.audio.input.transcription"),
    ("session.turn_detection", "session.audio.input.turn_detection"),
    ("session.input_audio_format", "session.audio.input.format"),
    ("session.output_audio_format", "session.audio.output.format"),
    ("session.voice", "session.audio.output.voice"),
    ("session.speed", "session.audio.output.speed"),
    ("session.modalities", "session.output_modalities"),
    ("session.max_response_output_tokens", "session.max_output_tokens"),
    ("response.modalities", "response.output_modalities"),
    ("response.voice", "response.audio.output.voice"),
)


def _ga_param(param: str) -> str:
    for beta, ga in _GA_PARAMS:
        if param == beta or param.startswith(beta + "."):
            return ga + param[len(beta):]
    return param


def _object(value: Any, param: str) -> dict:
    """A GA event's nested object, absent as {}; anything but an object is the client's error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SessionError(f"{param} must be an object", "invalid_value", param)
    return value


def _beta_format(fmt: Any) -> str | None:
    """The beta name of a GA audio format object, or None (pcm16's rate, if given, must be 24 kHz; G.711's 8)."""
    if not isinstance(fmt, dict):
        return None
    for beta_name, known in _GA_FORMATS.items():
        rate = known.get("rate", g711.RATE)
        if fmt.get("type") == known["type"] and fmt.get("rate", rate) == rate:
            return beta_name
    return None


def _from_ga(event: dict) -> dict:
    """A GA client event as its beta twin (session and response shapes)."""
    if event.get("type") == "session.update" and isinstance(event.get("session"), dict):
        ga, beta = event["session"], {}
        if ga.get("type") not in (None, "realtime", "transcription"):
            shown = json.dumps(ga["type"])[:64]
            raise SessionError(f"session.type {shown} is not supported: 'realtime' (a conversation) or "
                               "'transcription' (each turn transcribed, none answered)", "invalid_value",
                               "session.type")
        if ga.get("type") is not None:
            beta["type"] = ga["type"]
        if "output_modalities" in ga:
            beta["modalities"] = ga["output_modalities"]
        for key in ("instructions", "tools", "tool_choice"):
            if key in ga:
                beta[key] = ga[key]
        if "max_output_tokens" in ga:
            beta["max_response_output_tokens"] = ga["max_output_tokens"]
        audio = _object(ga.get("audio"), "session.audio")
        given = _object(audio.get("input"), "session.audio.input")
        output = _object(audio.get("output"), "session.audio.output")
        for key, beta_key in (("transcription", "input_audio_transcription"), ("turn_detection", "turn_detection")):
            if key in given:
                beta[beta_key] = given[key]
        for side, name, fmt_key in ((given, "input", "input_audio_format"), (output, "output", "output_audio_format")):
            if side.get("format") is None:
                continue
            fmt = side["format"]
            beta_name = _beta_format(fmt)
            if beta_name is None:
                shown = json.dumps(fmt)[:200]
                raise SessionError(f"session.audio.{name}.format {shown} is not supported; this server's audio is "
                                   f'{{"type": "audio/pcm", "rate": {RATE}}} (pcm16, 24 kHz, mono), or G.711 at 8 kHz: '
                                   '{"type": "audio/pcmu"} or {"type": "audio/pcma"}', "invalid_value",
                                   f"session.audio.{name}.format")
            beta[fmt_key] = beta_name
        for key in ("voice", "speed"):
            if key in output:
                beta[key] = output[key]
        return {**event, "session": beta}
    if event.get("type") == "response.create" and isinstance(event.get("response"), dict):
        ga = dict(event["response"])
        if "output_modalities" in ga:
            ga["modalities"] = ga.pop("output_modalities")
        audio = _object(ga.get("audio"), "response.audio")
        voice = _object(audio.get("output"), "response.audio.output").get("voice")
        if voice is not None:
            ga["voice"] = voice
        return {**event, "response": ga}
    return event


HANDLERS = {
    "session.update": RealtimeSession.session_update,
    "transcription_session.update": RealtimeSession.transcription_session_update,
    "input_audio_buffer.append": RealtimeSession.append,
    "input_audio_buffer.commit": RealtimeSession.commit,
    "input_audio_buffer.clear": RealtimeSession.clear,
    "conversation.item.create": RealtimeSession.item_create,
    "conversation.item.truncate": RealtimeSession.item_truncate,
    "conversation.item.delete": RealtimeSession.item_delete,
    "conversation.item.retrieve": RealtimeSession.item_retrieve,
    "response.create": RealtimeSession.response_create,
    "response.cancel": RealtimeSession.response_cancel,
}


async def refuse(websocket: WebSocket, exc: Exception, close_code: int) -> None:
    """Accept, say why in an `error` event, close: a client sees the reason, not a failed handshake."""
    _, body, _ = to_error(exc)
    await websocket.accept(subprotocol=realtime_subprotocol(websocket.headers))  # browsers fail a handshake without it
    error = body.error
    await websocket.send_text(json.dumps({"type": "error", "event_id": _id("event"), "error": {
        "type": error.type, "code": error.code, "message": error.message, "param": error.param, "event_id": None}}))
    await websocket.close(close_code)


def _utf8_bytes(data: str | bytes, limit: int) -> int:
    """An event's size in UTF-8 bytes, as max_realtime_event_bytes counts it (limit + 1 for a text event
    whose characters alone pass the limit: each is at least one byte, no need to encode it to know)."""
    if isinstance(data, bytes):
        return len(data)
    if len(data) > limit:
        return limit + 1
    if 4 * len(data) <= limit:  # a character is at most 4 bytes
        return len(data)
    return len(data.encode("utf-8", "surrogatepass"))
