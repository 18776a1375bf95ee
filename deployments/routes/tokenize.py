"""vLLM's tokenizer routes for the LLM and VLM families: POST /tokenize (a text, or messages rendered as a
chat completion renders them), POST /detokenize, GET /tokenizer_info. At the root, as vLLM serves them
(lm-evaluation-harness's remote tokenizer strips `/v1/completions` off its base_url to find them); the
family replica that holds the tokenizer answers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from ..limits import check_chat, check_generation_features, check_template_kwargs
from ..params import TokenizerQuery
from ..tokenize_protocol import (
    MODEL_DOC,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
)
from .chat import check_object_parameters, check_unique_names
from .common import ERRORS, IngressDep, WaitDep

router = APIRouter(tags=["tokenizer"], responses=ERRORS)


@router.post("/tokenize", summary="A text's or a chat's tokens, as the model counts them")
async def tokenize(body: TokenizeRequest, ingress: IngressDep, wait_s: WaitDep) -> TokenizeResponse:
    spec = ingress.tokenizer_model(body.model)
    if isinstance(body, TokenizeChatRequest):
        check_chat(len(body.messages), [], ingress.limits)
        check_template_kwargs(body.chat_template_kwargs, ingress.limits)
        tools = [tool.function.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
        schemas = [(f"tools.{i}.function.parameters", t["parameters"]) for i, t in enumerate(tools or [])
                   if t.get("parameters") is not None]
        check_generation_features(len(tools or []), 0, schemas, ingress.limits)
        check_unique_names(tools or [])  # refused as a chat with these tools is: its count would be no chat's
        check_object_parameters(tools or [])
        # tools render as a chat completion's do with tool_choice auto (required and named render the same)
        params = await ingress.chat_params(spec, body.to_messages(), wait_s, tools=tools,
                                           tool_choice="auto" if tools else "none",
                                           add_generation_prompt=body.generation_prompt(),
                                           continue_final_message=body.continue_final_message,
                                           template_kwargs=body.chat_template_kwargs)
    else:
        params = await ingress.chat_params(spec, [], wait_s, prompt=body.prompt,
                                           add_special_tokens=body.add_special_tokens)
    result = await ingress.tokenize(params, body.return_token_strs)
    return TokenizeResponse(count=len(result.tokens), max_model_len=result.max_model_len, tokens=result.tokens,
                            token_strs=result.token_strs)


@router.post("/detokenize", summary="The text of token ids")
async def detokenize(body: DetokenizeRequest, ingress: IngressDep, wait_s: WaitDep) -> DetokenizeResponse:
    spec = ingress.tokenizer_model(body.model)
    return DetokenizeResponse(prompt=await ingress.detokenize(TokenizerQuery(spec.name, wait_s, body.tokens)))


@router.get("/tokenizer_info", summary="The tokenizer's configuration (special tokens, chat template)")
async def tokenizer_info(ingress: IngressDep, wait_s: WaitDep,
                         model: Annotated[str | None, Query(description=MODEL_DOC)] = None) -> TokenizerInfoResponse:
    spec = ingress.tokenizer_model(model)
    info: dict[str, Any] = await ingress.tokenizer_info(TokenizerQuery(spec.name, wait_s))
    return TokenizerInfoResponse(**info)
