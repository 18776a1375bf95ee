"""The LLM deployment: chat completions for text-only causal language models."""

from __future__ import annotations

from typing import Any

from loading import LoadedModel, ModelSpec

from .chat_server import ChatServer
from .errors import InvalidRequestError
from .params import ChatParams


class LLMServer(ChatServer):
    def encode(self, loaded: LoadedModel, params: ChatParams) -> dict[str, Any]:
        tokenizer = loaded.tokenizer
        if params.prompt is not None:
            return ChatServer.encode_prompt(tokenizer, params)
        messages, tools = ChatServer.template_inputs(tokenizer.chat_template, params)
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return dict(tokenizer(text, return_tensors="pt", add_special_tokens=False))

    def validate(self, spec: ModelSpec, loaded: LoadedModel, params: ChatParams) -> None:
        if params.images:
            raise InvalidRequestError(
                f"model {spec.name!r} is a text-only LLM and cannot read images; send them to a VLM model",
                param="messages",
            )
        if loaded.tokenizer.chat_template is None and params.prompt is None:
            raise InvalidRequestError(
                f"model {spec.name!r} has no chat template, so chat messages cannot be formatted for it",
                param="model",
            )
