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
        text = render_chat(processor.apply_chat_template, without_placeholders(processor, messages), tools, params)
        images = [decode_image(data, f"image {i}") for i, data in enumerate(params.images)]
        try:
            return dict(processor(text=[text], images=images or None, return_tensors="pt"))
        except ValueError as exc:  # e.g. the text holds the image placeholder ('<image>') with no image for it
            raise PromptRefused(f"the model's processor refused this request: {exc}") from None


PLACEHOLDER_BREAK = "\u2060"  # WORD JOINER: invisible, and no token of the placeholder's spelling


def without_placeholders(processor: Any, messages: list[dict]) -> list[dict]:
    """The messages with the processor's image (and video) placeholder broken up wherever a client's text
    spells it: the processor counts every `<image>` in the rendered prompt as an image, so a text that
    mentions the tag (an HTML question) was refused, and with an image attached the counts never matched.
    Only image parts make placeholders; /v1/completions' prompts stay as sent (tokens by design)."""
    spelled = [token for token in (getattr(processor, "image_token", None), getattr(processor, "video_token", None))
               if isinstance(token, str) and len(token) > 1]
    if not spelled:
        return messages

    def safe(text: str) -> str:
        for token in spelled:
            text = text.replace(token, token[0] + PLACEHOLDER_BREAK + token[1:])
        return text

    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) and any(token in content for token in spelled):
            message = {**message, "content": safe(content)}
        elif isinstance(content, list):
            message = {**message, "content": [{**part, "text": safe(part["text"])} if isinstance(part.get("text"), str)
                                              else part for part in content]}
        out.append(message)
    return out

