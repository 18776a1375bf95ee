"""POST /v1/chat/completions: LLM and VLM chats, plain or streamed; structured output, tool calls,
logprobs, penalties and `n` choices (each its own row of the replica's decode loop)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from loading import Family

from ..errors import InvalidRequestError
from ..limits import check_chat, check_choices, check_generation_features, check_template_kwargs
from ..params import ChatParams, ChatResult
from ..protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    NamedToolChoice,
    ToolCall,
    UsageInfo,
)
from ..sse import chat_events, merged, prepend
from ..structured import Constraint, check_grammar, json_schema_constraint
from ..tools import call_constraint
from .common import ERRORS, IngressDep, WaitDep, all_or_cancelled, first_items

router = APIRouter(tags=["chat"], responses=ERRORS)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    response_model_exclude_none=False,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "A chat.completion, or with `stream: true` chat.completion.chunk events"}},
)
async def create_chat_completion(body: ChatCompletionRequest, ingress: IngressDep, wait_s: WaitDep):
    check_chat(len(body.messages), body.stop_list(), ingress.limits)
    check_choices(body.n, ingress.limits)
    check_template_kwargs(body.chat_template_kwargs, ingress.limits)
    spec = ingress.spec(body.model, Family.LLM, Family.VLM)
    features = chat_features(body, ingress.limits)
    params = await ingress.chat_params(
        spec, body.to_messages(), wait_s, max_new_tokens=body.requested_max_tokens(),
        max_tokens_param="max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
        temperature=body.temperature, top_p=body.top_p, stop=body.stop_list(), seed=body.seed,
        priority=body.priority, template_kwargs=body.chat_template_kwargs, **features,
    )
    choices = fan_out(params, body.n)
    if body.stream:
        streams = [ingress.chat_stream(p) for p in choices]
        firsts = await first_items(streams)  # errors before the first chunk: HTTP errors
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        items = merged([prepend(first, rest) for first, rest in zip(firsts, streams, strict=True)])
        return StreamingResponse(chat_events(body.model, items, include_usage, len(choices)),
                                 media_type="text/event-stream")
    results: list[ChatResult] = await all_or_cancelled(ingress.chat(p) for p in choices)
    prompt_tokens = results[0].prompt_tokens
    completion_tokens = sum(r.completion_tokens for r in results)
    usage = UsageInfo.counted(prompt_tokens, completion_tokens, results[0].cached_tokens)
    return ChatCompletionResponse(model=body.model, usage=usage,
                                  choices=[choice(i, result) for i, result in enumerate(results)])


def choice(index: int, result: ChatResult) -> ChatCompletionChoice:
    calls = [ToolCall.model_validate(call) for call in result.tool_calls] if result.tool_calls else None
    content = result.content if calls else result.text
    logprobs = ChoiceLogprobs(content=result.logprobs) if result.logprobs is not None else None
    return ChatCompletionChoice(index=index, message=ChatCompletionMessage(content=content, tool_calls=calls),
                                finish_reason=result.finish_reason, logprobs=logprobs)  # type: ignore[arg-type]


def fan_out(params: ChatParams, n: int) -> list[ChatParams]:
    """`n` choices as `n` requests, each sampled on its own (a given seed becomes seed, seed+1, ...)."""
    if n == 1:
        return [params]
    return [dataclasses.replace(params, seed=None if params.seed is None else params.seed + i) for i in range(n)]


def chat_features(body: ChatCompletionRequest, limits: Any) -> dict[str, Any]:
    """The request's structured output, tools, logprobs and logits settings as ChatParams fields, each
    checked here (400 naming the field) before any replica is asked."""
    tools = [tool.function.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    names = [tool["name"] for tool in tools or []]
    check_unique_names(tools or [])
    choice: Any = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidRequestError(f"tool_choice names function {choice.function.name!r}, which is not in "
                                      f"tools ({', '.join(names) or 'none given'})", param="tool_choice.function.name")
        choice = {"name": choice.function.name}
    elif choice == "required" and not tools:
        raise InvalidRequestError("tool_choice 'required' needs tools", param="tool_choice")
    schemas: list[tuple[str, object]] = []
    constraint: Constraint | None = None
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        constraint = json_schema_constraint({"type": "object"}, "response_format", "response_format json_object")
    elif rf is not None and rf.type == "json_schema" and rf.json_schema is not None:
        schema = rf.json_schema.schema_
        schemas.append(("response_format.json_schema.schema", schema))
        constraint = json_schema_constraint(schema, "response_format.json_schema.schema",
                                            f"response_format json_schema {rf.json_schema.name!r}")
    for i, tool in enumerate(tools or []):
        if tool.get("parameters") is not None:
            schemas.append((f"tools.{i}.function.parameters", tool["parameters"]))
    check_generation_features(len(tools or []), len(body.logit_bias or {}), schemas, limits)
    forced_calls = tools and (choice == "required" or isinstance(choice, dict))
    if constraint is not None and tools and choice != "none":
        raise InvalidRequestError(
            "response_format with tools: a reply here is either tool calls or constrained text; send "
            "tool_choice 'none' to get the format, or leave response_format out to call tools",
            param="response_format")
    if forced_calls:
        assert tools is not None
        for i, tool in enumerate(tools):  # each function's parameters, named by their place in the request
            if tool.get("parameters") is not None and (choice == "required" or choice["name"] == tool["name"]):
                check_grammar(json_schema_constraint(tool["parameters"], f"tools.{i}.function.parameters",
                                                     f"the parameters of tool {tool['name']!r}"))
        constraint = call_constraint(tools, choice, body.parallel_tool_calls is not False)
    check_object_parameters(tools or [])  # after the schema checks above
    if constraint is not None:
        check_grammar(constraint)
        if body.stop_list():
            raise InvalidRequestError("stop cannot be combined with a constrained reply (response_format, or "
                                      "tool_choice required/named): a stop sequence would cut what the grammar "
                                      "guarantees", param="stop")
    return {
        "constraint": constraint, "tools": tools, "tool_choice": choice,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "logprobs": bool(body.logprobs), "top_logprobs": body.top_logprobs or 0,
        "presence_penalty": body.presence_penalty or 0.0, "frequency_penalty": body.frequency_penalty or 0.0,
        "logit_bias": {int(k): float(v) for k, v in body.logit_bias.items()} if body.logit_bias else None,
    }


def check_unique_names(tools: list[dict]) -> None:
    """A call names its function: two tools of one name could not be told apart."""
    names = [tool["name"] for tool in tools]
    if len(set(names)) < len(names):
        raise InvalidRequestError("two tools have the same function name", param="tools")


def check_object_parameters(tools: list[dict]) -> None:
    """A call's arguments are an object: each function's parameters must be a schema of one."""
    for i, tool in enumerate(tools):
        parameters = tool.get("parameters")
        if parameters is not None and (not isinstance(parameters, dict)
                                       or parameters.get("type", "object") != "object"):
            raise InvalidRequestError(f"the parameters of tool {tool['name']!r} must be a JSON Schema of type "
                                      "'object' (a call's arguments are an object)",
                                      param=f"tools.{i}.function.parameters")
