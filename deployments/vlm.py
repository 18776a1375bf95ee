"""The VLM deployment: chat completions whose messages may carry images."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from loading import LoadedModel, ModelSpec

from .chat_encoding import PromptRefused, encode_prompt, render_chat, template_inputs
from .chat_server import ChatServer
from .isolated import IsolatedPool, WorkerCrashed, WorkerError, WorkerOutOfMemory, WorkerTimedOut
from .media import decode_image, image_refusal
from .options import ChatOptions
from .params import ChatParams


class VLMServer(ChatServer):
    def __init__(self, specs: list[ModelSpec], options: ChatOptions):
        super().__init__(specs, options)
        # Pillow's decoders (C) parse client bytes: in processes of their own, a crash costs one request
        self.image_decoders = IsolatedPool(memory_limit_mb=options.image_decode_memory_mb,
                                           memory_setting="image_decode_memory_mb")
        self.image_decoders.prestart()
        self.image_decode_timeout_s = options.image_decode_timeout_s

    def image_size(self, data: bytes) -> tuple[int, int]:
        return tuple(in_worker(self.image_decoders, "image_size", data, "an image", self.image_decode_timeout_s))

    def encode(self, loaded: LoadedModel, params: ChatParams) -> dict[str, Any]:
        return encode_vlm_chat(loaded, params, self._decode)

    def _decode(self, data: bytes, what: str) -> Image.Image:
        return decode_in_worker(self.image_decoders, data, what, self.image_decode_timeout_s)


def encode_vlm_chat(loaded: LoadedModel, params: ChatParams,
                    decode: Callable[[bytes, str], Image.Image] = decode_image) -> dict[str, Any]:
    """A VLM's inputs (batch dimension 1), its images decoded by `decode` (the replica's: in a decoder process;
    by default in this one, as tests and in-process benchmarks use it)."""
    processor = loaded.processor
    if params.prompt is not None:
        return encode_prompt(loaded.tokenizer, params)
    messages, tools = template_inputs(getattr(processor, "chat_template", None), params)
    text = render_chat(processor, without_placeholders(processor, messages), tools, params)
    images = [decode(data, f"image {i}") for i, data in enumerate(params.images)]
    try:
        return dict(processor(text=[text], images=images or None, return_tensors="pt"))
    except ValueError as exc:  # e.g. the text holds the image placeholder ('<image>') with no image for it
        raise PromptRefused(f"the model's processor refused this request: {exc}") from None


def decode_in_worker(pool: IsolatedPool, data: bytes, what: str, timeout_s: float) -> Image.Image:
    """One image's pixels, decoded by a worker of `pool`; every way it can fail is this request's 400."""
    return Image.fromarray(in_worker(pool, "decode_image", data, what, timeout_s))


def in_worker(pool: IsolatedPool, task: str, data: bytes, what: str, timeout_s: float) -> Any:
    """`task` on one image in a worker of `pool`; every way it can fail is this request's 400."""
    try:
        return pool.run(task, data, timeout_s=timeout_s)
    except (WorkerError, WorkerCrashed, WorkerTimedOut, WorkerOutOfMemory) as exc:
        raise image_refusal(exc, what, f"decoding {what}", "image_decode_timeout_s", "messages") from None


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

