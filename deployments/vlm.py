"""The VLM deployment: chat completions whose messages may carry images."""

from __future__ import annotations

from typing import Any

from loading import LoadedModel

from .chat_encoding import encode_prompt, template_inputs
from .chat_server import ChatServer
from .media import decode_image
from .params import ChatParams


class VLMServer(ChatServer):
    def encode(self, loaded: LoadedModel, params: ChatParams) -> dict[str, Any]:
        processor = loaded.processor
        if params.prompt is not None:
            return encode_prompt(loaded.tokenizer, params)
        messages, tools = template_inputs(getattr(processor, "chat_template", None), params)
        text = processor.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        images = [decode_image(data, f"image {i}") for i, data in enumerate(params.images)]
        return dict(processor(text=[text], images=images or None, return_tensors="pt"))
