"""The LLM deployment: chat completions for text-only causal language models."""

from __future__ import annotations

from typing import Any

from loading import LoadedModel, ModelSpec

from .chat_encoding import encode_text_chat
from .chat_server import ChatServer
from .errors import InvalidRequestError
from .params import ChatParams


class LLMServer(ChatServer):
    def encode(self, loaded: LoadedModel, params: ChatParams) -> dict[str, Any]:
        return encode_text_chat(loaded.tokenizer, params)

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
