"""The voice agent's reply, streamed: the LLM's text as it is generated, each sentence spoken while the
LLM writes the next. Used by /v1/audio/chat and by the Realtime endpoint; the LLM and the TTS are
called through the ingress's handles like every HTTP route (no session holds a replica).

    LLM deltas --> SentenceStream --> sentences queue --> TTS (one streamed call per sentence) --> audio
          \\-----------------------------------------------------------------------------> text deltas

Closing the iterator (client gone, barge-in, response.cancel) cancels both at once: the LLM's row
leaves its batch at the next step, the TTS stops before its next piece.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .params import ChatParams, SpeechParams, SpeechResult
from .text_split import SentenceStream

if TYPE_CHECKING:
    from .ingress import Ingress


@dataclass
class TextDelta:
    text: str


@dataclass
class AudioPiece:
    speech: SpeechResult
    text: str  # the sentence (or clause) it speaks
    sentence: int = 0  # which of the reply's spoken sentences (a sentence's speech may come in several pieces)


@dataclass
class ToolCall:
    call: dict  # a whole call, as a chat stream's tool_calls delta: id, type, function {name, arguments}


@dataclass
class ReplyDone:
    text: str
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens (LLM), tts_tokens


ReplyEvent = TextDelta | AudioPiece | ToolCall | ReplyDone
_END = object()


async def spoken_reply(ingress: Ingress, chat: ChatParams, speech: SpeechParams | None,
                       max_chars: int = 400, first_chars: int | None = None) -> AsyncGenerator[ReplyEvent, None]:
    """TextDelta... and AudioPiece... interleaved as they are made, then ReplyDone. `speech` is the
    template of each sentence's TTS call (model, voice, speed); None: text only. An error of the LLM
    or the TTS ends the iterator with that error (the other side is cancelled)."""
    out: asyncio.Queue = asyncio.Queue()
    sentences: asyncio.Queue = asyncio.Queue()
    splitter = SentenceStream(max_chars=max_chars, first_chars=first_chars)
    tts_tokens = 0
    chat = replace(chat, spoken=True)  # streamed at the family's voice_stream_interval_ms

    async def generate() -> None:
        text, finish, usage = "", "stop", {}
        try:
            async with contextlib.aclosing(ingress.chat_stream(chat)) as chunks:
                async for chunk in chunks:
                    for call in chunk.get("tool_calls") or []:  # a call is never spoken
                        await out.put(ToolCall(call))
                    if chunk.get("delta"):
                        text += chunk["delta"]
                        await out.put(TextDelta(chunk["delta"]))
                        for sentence in splitter.feed(chunk["delta"]):
                            await sentences.put(sentence)
                    if "finish_reason" in chunk:
                        finish, usage = chunk["finish_reason"], dict(chunk.get("usage") or {})
            rest = splitter.flush()
            if rest:
                await sentences.put(rest)
        finally:
            await sentences.put(_END)
        await out.put(ReplyDone(text, finish, usage))

    async def speak() -> None:
        nonlocal tts_tokens
        spoken = 0
        while (sentence := await sentences.get()) is not _END:
            if speech is None or not any(c.isalnum() for c in sentence):
                continue
            spoken += 1
            params = SpeechParams(model=speech.model, text=sentence, voice=speech.voice, speed=speech.speed,
                                  wait_s=speech.wait_s)
            try:
                async with contextlib.aclosing(ingress.synthesize_stream(params)) as pieces:
                    async for piece in pieces:
                        tts_tokens += piece.tokens
                        await out.put(AudioPiece(piece, sentence, spoken))
            except Exception as exc:
                if _nothing_to_say(exc):  # a sentence of symbols only: skip it, speak the rest
                    continue
                raise

    async def run(work: Any) -> None:
        try:
            await work
            await out.put(_END)
        except Exception as exc:  # to the consumer, which raises it and cancels the other side
            await out.put(_Failed(exc))

    tasks = [asyncio.ensure_future(run(generate())), asyncio.ensure_future(run(speak()))]
    try:
        finished, done_event = 0, None
        while finished < len(tasks):
            item = await out.get()
            if item is _END:
                finished += 1
            elif isinstance(item, _Failed):
                raise item.error
            elif isinstance(item, ReplyDone):
                done_event = item
            else:
                yield item
        assert done_event is not None
        done_event.usage["tts_tokens"] = tts_tokens
        yield done_event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Failed:
    error: Exception


def _nothing_to_say(exc: BaseException) -> bool:
    from .errors import InvalidRequestError, as_api_error

    error = exc if isinstance(exc, InvalidRequestError) else as_api_error(exc)
    return error.status == 400 and error.param == "input"


async def drain(events: AsyncGenerator[ReplyEvent, None]) -> tuple[ReplyDone, list[Any]]:
    """Run a reply to its end: (its ReplyDone, its audio pieces' waveforms)."""
    waves, done = [], None
    async for item in events:
        if isinstance(item, AudioPiece):
            waves.append(item.speech)
        elif isinstance(item, ReplyDone):
            done = item
    assert done is not None
    return done, waves
