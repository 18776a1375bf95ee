"""The VLM deployment: chat completions whose messages may carry images."""

from __future__ import annotations

from typing import Any

from loading import LoadedModel

from .chat_encoding import PromptRefused, encode_prompt, render_chat, template_inputs
from .chat_server import ChatServer
from .media import decode_image
from .params import ChatParams


class VLMServer(ChatServer):
    def encode(self, loaded: LoadedModel, params: ChatParams) -> dict[str, Any]:
        processor = loaded.processor
        if params.prompt is not None:
            return encode_prompt(loaded.tokenizer, params)
        messages, tools = template_inputs(getattr(processor, "chat_template", None), params)
        text = render_chat(processor.apply_chat_template, messages, tools)
        images = [decode_image(data, f"image {i}") for i, data in enumerate(params.images)]
        try:
            return dict(processor(text=[text], images=images or None, return_tensors="pt"))
        except ValueError as exc:  # e.g. the text holds the image placeholder ('<image>') with no image for it
            raise PromptRefused(f"the model's processor refused this request: {exc}") from None
