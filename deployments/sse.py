"""Server-sent event streams in OpenAI's chunk format."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

from pydantic import BaseModel

from .errors import error_sse_event
from .protocol import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChoiceLogprobs,
    DeltaMessage,
    ToolCallDelta,
    UsageInfo,
    new_completion_id,
)

DONE = "data: [DONE]\n\n"

T = TypeVar("T")


async def chat_events(model: str, chunks: AsyncIterator[tuple[int, dict]], include_usage: bool,
                      choices: int = 1) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: role, deltas (content, tool calls, logprobs), finish_reason per choice,
    optional usage (the prompt once, every choice's completion), [DONE]. `chunks` are (choice index,
    item) pairs from ChatServer.chat_stream, interleaved. A failure after the 200 was sent is reported
    in-band as an error event (errors.error_sse_event)."""
    completion_id, created = new_completion_id(), int(time.time())

    def event(parts: list, usage: UsageInfo | None = None) -> str:
        chunk = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=parts, usage=usage)
        return f"data: {with_null_usage(chunk.model_dump_json(exclude_none=True), include_usage and usage is None)}\n\n"

    # Each string yielded is one write to the socket, and one more segment for HAProxy and the client to
    # handle: the role chunks go out with the first delta, a finish_reason with what follows it.
    held = [event([ChatCompletionChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
            for index in range(choices)]
    prompt_tokens, completion_tokens, cached_tokens = 0, 0, 0
    try:
        async for index, item in chunks:
            if "delta" in item:
                calls = [ToolCallDelta.model_validate(call) for call in item.get("tool_calls") or []]
                delta = DeltaMessage(content=item["delta"] if item["delta"] or not calls else None,
                                     tool_calls=calls or None)
                logprobs = ChoiceLogprobs(content=item["logprobs"]) if item.get("logprobs") else None
                yield "".join(held) + event([ChatCompletionChunkChoice(index=index, delta=delta, logprobs=logprobs)])
                held = []
                continue
            held.append(event([ChatCompletionChunkChoice(index=index, delta=DeltaMessage(),
                                                         finish_reason=item["finish_reason"])]))
            if not prompt_tokens:
                prompt_tokens, cached_tokens = item["usage"]["prompt_tokens"], item["usage"].get("cached_tokens", 0)
            completion_tokens += item["usage"]["completion_tokens"]
        if include_usage:
            held.append(event([], UsageInfo.counted(prompt_tokens, completion_tokens, cached_tokens)))
    except Exception as exc:  # headers are sent: report the failure in-band, then end the stream
        held.append(error_sse_event(exc))
    yield "".join(held) + DONE


def with_null_usage(chunk_json: str, null_usage: bool) -> str:
    """A chunk's JSON with `"usage": null`, as OpenAI writes every chunk before the usage one when
    `stream_options.include_usage` is on (without it the key is left out)."""
    return chunk_json[:-1] + ',"usage":null}' if null_usage else chunk_json


async def merged(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """(index, item) from several streams as each produces them; closing it closes them all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[dict]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, _ENDED))
        except BaseException as exc:
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(streams)
        while running:
            index, item = await queue.get()
            if item is _ENDED:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]


_ENDED = object()


async def prepend(first: T, rest: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    yield first
    async for item in rest:
        yield item


def event(model: BaseModel) -> str:
    """One server-sent event carrying a model as JSON (OpenAI's audio events: `data:` lines only)."""
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


async def guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Events from `events`, and a failure after the 200 was sent as an in-band error event."""
    try:
        async for item in events:
            yield item
    except Exception as exc:  # headers are sent: report the failure in-band, then end the stream
        yield error_sse_event(exc)
