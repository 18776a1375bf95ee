"""The VLM deployment: chat completions whose messages may carry images."""

from __future__ import annotations

from loading import LoadedModel

from .chat_server import ChatServer
from .params import ChatParams


class VLMServer(ChatServer):
    def encode(self, loaded: LoadedModel, batch: list[ChatParams]):
        processor = loaded.processor
        texts = [processor.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) for p in batch]
        images = [image for p in batch for image in p.images]
        return processor(text=texts, images=images or None, padding=True, return_tensors="pt")
