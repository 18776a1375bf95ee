"""Server-sent event streams in OpenAI's chunk format."""

from __future__ import annotations

import time
from typing import AsyncIterator

from pydantic import BaseModel

from .errors import error_sse_event
from .protocol import ChatCompletionChunk, ChatCompletionChunkChoice, DeltaMessage, UsageInfo, new_completion_id

DONE = "data: [DONE]\n\n"


async def chat_events(model: str, chunks: AsyncIterator[dict], include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: role, content deltas, finish_reason, optional usage, [DONE]. A failure
    after the 200 was sent is reported in-band as an error event (errors.error_sse_event)."""
    completion_id, created = new_completion_id(), int(time.time())

    def event(choices: list, usage: UsageInfo | None = None) -> str:
        chunk = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    yield event([ChatCompletionChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))])
    try:
        async for item in chunks:
            if "delta" in item:
                yield event([ChatCompletionChunkChoice(index=0, delta=DeltaMessage(content=item["delta"]))])
                continue
            yield event([ChatCompletionChunkChoice(index=0, delta=DeltaMessage(), finish_reason=item["finish_reason"])])
            if include_usage:
                u = item["usage"]
                yield event([], UsageInfo(total_tokens=u["prompt_tokens"] + u["completion_tokens"], **u))
    except Exception as exc:  # headers are sent: report the failure in-band, then end the stream
        yield error_sse_event(exc)
    yield DONE


async def prepend(first: dict, rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
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
