"""The VLM deployment: chat completions whose messages may carry images."""

from __future__ import annotations

from typing import Any

from loading import LoadedModel

from .chat_server import ChatServer
from .params import ChatParams


class VLMServer(ChatServer):
    def encode(self, loaded: LoadedModel, params: ChatParams) -> dict[str, Any]:
        processor = loaded.processor
        text = processor.apply_chat_template(params.messages, add_generation_prompt=True, tokenize=False)
        return dict(processor(text=[text], images=params.images or None, return_tensors="pt"))
