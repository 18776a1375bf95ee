"""POST /v1/chat/completions: LLM and VLM chats, plain or streamed."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from loading import Family

from ..limits import check_chat
from ..protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    UsageInfo,
)
from ..sse import chat_events, prepend
from .common import ERRORS, IngressDep, WaitDep

router = APIRouter(tags=["chat"], responses=ERRORS)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "A chat.completion, or with `stream: true` chat.completion.chunk events"}},
)
async def create_chat_completion(body: ChatCompletionRequest, ingress: IngressDep, wait_s: WaitDep):
    check_chat(len(body.messages), body.stop_list(), ingress.limits)
    spec = ingress.spec(body.model, Family.LLM, Family.VLM)
    params = await ingress.chat_params(
        spec, body.to_messages(), wait_s, max_new_tokens=body.requested_max_tokens(),
        temperature=body.temperature, top_p=body.top_p, stop=body.stop_list(), seed=body.seed,
    )
    if body.stream:
        chunks = ingress.chat_stream(params)
        first = await chunks.__anext__()  # errors before the first chunk are plain HTTP errors
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(chat_events(body.model, prepend(first, chunks), include_usage),
                                 media_type="text/event-stream")
    result = await ingress.chat(params)
    usage = UsageInfo(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                      total_tokens=result.prompt_tokens + result.completion_tokens)
    return ChatCompletionResponse(
        model=body.model, usage=usage,
        choices=[ChatCompletionChoice(index=0, message=ChatCompletionMessage(content=result.text),
                                      finish_reason=result.finish_reason)],
    )
