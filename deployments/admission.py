"""How much working memory a request needs, and a gate that keeps one replica within its budget.

The estimates are upper bounds built from the model's config and the request's size (tokens,
pixels, samples), not measurements; they only need to be right about orders of magnitude, so that
no combination of requests can drive a replica into the node's OOM killer (which would take every
Ray worker on the node with it). `bench/hostile.py` measures what the worst requests really cost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from .errors import RequestTooLargeError

MB = 2**20
FLOAT_BYTES = 4  # activations are float32 on CPU; on GPU half of this, so the estimate errs high


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def chat_request_bytes(config: Any, prompt_tokens: int, new_tokens: int, images: int = 0,
                       image_bytes: int = 0, batch: int = 1) -> int:
    """KV cache for the whole sequence, the prefill's activations and attention scores, the logits,
    and (`image_bytes`) the request's images as decoded pixels and processor tensors."""
    text = _text_config(config)
    hidden = int(getattr(text, "hidden_size", 1024))
    heads = int(getattr(text, "num_attention_heads", 16))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    layers = int(getattr(text, "num_hidden_layers", 24))
    inner = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    vocab = int(getattr(text, "vocab_size", 32000))
    total = prompt_tokens + new_tokens
    kv_cache = 2 * layers * kv_heads * head_dim * total * FLOAT_BYTES
    # one layer's prefill at a time: hidden states, MLP, and (worst case, the math attention kernel)
    # a full heads x prompt x prompt score matrix
    prefill = (prompt_tokens * (4 * hidden + 2 * inner) + heads * prompt_tokens * prompt_tokens) * FLOAT_BYTES
    logits = 4 * vocab * FLOAT_BYTES
    vision = images * _vision_bytes(config)
    return batch * (kv_cache + prefill + logits) + vision + image_bytes


def decoded_image_bytes(images: list[bytes]) -> int:
    """Decoded RGB pixels of encoded images (sizes from their headers), as bytes, a float copy and the
    processor's output: what decoding them costs before any resizing."""
    from .media import image_size

    return sum(width * height * 3 * (1 + 2 * FLOAT_BYTES) for width, height in map(image_size, images))


def _vision_bytes(config: Any) -> int:
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return 0
    size = int(getattr(vision, "image_size", 336))
    patch = int(getattr(vision, "patch_size", 14))
    hidden = int(getattr(vision, "hidden_size", 1024))
    heads = int(getattr(vision, "num_attention_heads", 16))
    patches = (size // max(patch, 1)) ** 2 + 1
    return (3 * size * size + patches * 8 * hidden + heads * patches * patches) * FLOAT_BYTES


def transcription_request_bytes(config: Any, samples: int, chunks_per_call: int) -> int:
    """The decoded audio, and one sub-batch of 30 s chunks through the encoder and decoder."""
    d_model = int(getattr(config, "d_model", 1024))
    frames = int(getattr(config, "max_source_positions", 1500))
    mel = int(getattr(config, "num_mel_bins", 80))
    heads = int(getattr(config, "encoder_attention_heads", 16))
    per_chunk = (mel * 2 * frames + frames * 8 * d_model + heads * frames * frames) * FLOAT_BYTES
    return samples * FLOAT_BYTES * 2 + chunks_per_call * per_chunk


def speech_request_bytes(config: Any, chars: int) -> int:
    """VITS-style: ~0.1 s of audio per character at most, with the vocoder's wide upsampling layers."""
    rate = int(getattr(config, "sampling_rate", 16000))
    channels = int(getattr(config, "upsample_initial_channel", 512))
    samples = int(chars * 0.1 * rate) + rate
    return samples * FLOAT_BYTES * (2 + channels // 8)


class MemoryGate:
    """Admits requests while their estimates fit the budget together; others wait in arrival order."""

    def __init__(self, budget_bytes: int, name: str = "memory_budget_mb"):
        self.budget = int(budget_bytes)
        self.name = name
        self.in_use = 0
        self.peak = 0
        self._turn = asyncio.Condition()

    def check(self, need: int, what: str, param: str | None = None) -> None:
        """Refuse at once (413) what could never fit, naming the budget and the estimate."""
        if need > self.budget:
            raise RequestTooLargeError(
                f"{what} needs an estimated {need / MB:,.0f} MiB of working memory, more than this replica's "
                f"{self.name}={self.budget / MB:,.0f} MiB; send less (or raise {self.name} for this family)",
                param=param, code="request_too_large",
            )

    @contextlib.asynccontextmanager
    async def hold(self, need: int, what: str, param: str | None = None) -> AsyncIterator[None]:
        self.check(need, what, param)
        async with self._turn:
            await self._turn.wait_for(lambda: self.in_use + need <= self.budget)
            self.in_use += need
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            async with self._turn:
                self.in_use -= need
                self._turn.notify_all()

    def status(self) -> dict[str, float]:
        return {"budget_mb": round(self.budget / MB, 1), "in_use_mb": round(self.in_use / MB, 1),
                "peak_mb": round(self.peak / MB, 1)}
