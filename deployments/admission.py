"""How much working memory a request needs, and a gate that keeps one replica within its budget.

The estimates are upper bounds built from the model's config and the request's size (tokens,
pixels, samples), not measurements; they only need to be right about orders of magnitude, so that
no combination of requests can drive a replica into the node's OOM killer (which would take every
Ray worker on the node with it). `bench/hostile.py` measures what the worst requests really cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from .errors import RequestTooLargeError

MB = 2**20
MIN_SIZED_BUDGET = 256 * MB  # a budget sized from free memory never goes below this
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


def free_memory() -> tuple[int, str]:
    """Bytes free for working memory where this replica computes, and where: its GPU (cuda:0, the one
    Ray gives it) when torch sees one, else the node's available RAM, narrowed by the container's
    cgroup limit when there is one (MemAvailable counts the host's memory, not the pod's)."""
    torch = sys.modules.get("torch")  # imported by the first model load; never imported here for this
    if torch is not None and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        return int(free), "cuda:0"
    available = _meminfo_available()
    where = "RAM"
    limit = _cgroup_room()
    if limit is not None and limit < available:
        available, where = limit, "the container's memory limit"
    return available, where


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_room() -> int | None:
    """cgroup v2 memory.max - memory.current, or None when unlimited or unknown."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


class MemoryGate:
    """Admits requests while their estimates fit the budget together; others wait, and one goes in when it
    fits and no waiter of lower `priority` is left (among equals, woken in arrival order).

    A hold can grow (`Held.grow`): a chat with images holds their decoded size while they are
    processed, a transcription its samples, and each keeps holding that while it waits for the rest of
    its estimate, so what waiting requests carry stays counted.

    `budget_bytes=None` sizes the budget from free memory (`free_memory`) at the first request, when
    the replica's models are loading or loaded: `fraction` of what is free then, at least 256 MiB.
    """

    def __init__(self, budget_bytes: int | None, name: str = "memory_budget_mb", fraction: float = 0.25,
                 measure: Callable[[], tuple[int, str]] = free_memory):
        self._budget = None if budget_bytes is None else int(budget_bytes)
        self.sized_from = "configured" if budget_bytes is not None else None
        self.fraction = fraction
        self._measure = measure
        self.name = name
        self.in_use = 0
        self.peak = 0
        self._turn = asyncio.Condition()
        self._waiting: list[int] = []  # the priorities of the requests waiting for room
        self._growing: list[Held] = []  # holds waiting to grow, in arrival order

    @property
    def waiting_held(self) -> int:
        """Bytes held by requests that wait to grow (counted in in_use)."""
        return sum(held.amount for held in self._growing)

    @property
    def budget(self) -> int:
        if self._budget is None:
            free, where = self._measure()
            self._budget = max(MIN_SIZED_BUDGET, int(free * self.fraction))
            self.sized_from = f"{self.fraction:g} x {free / MB:,.0f} MiB free in {where} at the first request"
        return self._budget

    def check(self, need: int, what: str, param: str | None = None) -> None:
        """Refuse at once (413) what could never fit, naming the budget and the estimate."""
        if need > self.budget:
            raise RequestTooLargeError(
                f"{what} needs an estimated {need / MB:,.0f} MiB of working memory, more than this replica's "
                f"{self.name}={self.budget / MB:,.0f} MiB{self._how_sized()}; send less (or raise {self.name} "
                "for this family)",
                param=param, code="request_too_large",
            )

    @contextlib.asynccontextmanager
    async def hold(self, need: int, what: str, param: str | None = None, priority: int = 0) -> AsyncIterator[Held]:
        """Until `need` fits beside what the others hold. A waiter goes in as soon as it fits unless one
        of lower `priority` waits (then that one goes first, fitting or not: it is never starved by
        smaller requests behind it)."""
        self.check(need, what, param)
        async with self._turn:
            self._waiting.append(priority)
            try:
                await self._turn.wait_for(
                    lambda: self.in_use + need <= self.budget and not any(p < priority for p in self._waiting))
            finally:  # admitted or cancelled: the others may go now
                self._waiting.remove(priority)
                self._turn.notify_all()
            self._take(need)
        held = Held(self, need, priority)
        try:
            yield held
        finally:
            async with self._turn:
                self.in_use -= held.amount
                self._turn.notify_all()

    async def _grow(self, held: Held, need: int) -> None:
        async with self._turn:
            self._waiting.append(held.priority)
            self._growing.append(held)
            if held.amount:  # the holds waiting to grow may now be all that holds memory: let them look
                self._turn.notify_all()
            try:
                await self._turn.wait_for(lambda: self._may_grow(held, need))
            finally:
                self._waiting.remove(held.priority)
                self._growing.remove(held)
                self._turn.notify_all()
            self._take(need - held.amount)
            held.amount = need

    def _may_grow(self, held: Held, need: int) -> bool:
        if self.in_use - held.amount + need <= self.budget and not any(p < held.priority for p in self._waiting):
            return True
        # Every byte in use is held by requests waiting to grow: nothing will be freed until one of them
        # goes, so the first (by priority, then arrival) goes although it does not fit. In use then
        # stays under budget + this request's estimate (each waiting hold fitted when it was taken).
        first = min(self._growing, key=lambda h: h.priority)  # min keeps the earliest among equals
        return self.in_use == self.waiting_held and held is first

    def _take(self, need: int) -> None:
        self.in_use += need
        self.peak = max(self.peak, self.in_use)

    def _how_sized(self) -> str:
        return "" if self.sized_from in (None, "configured") else f" (sized from free memory: {self.sized_from})"

    def status(self) -> dict[str, Any]:
        """For /health; does not size an unsized budget (that waits for the first request)."""
        budget = None if self._budget is None else round(self._budget / MB, 1)
        return {"budget_mb": budget, "sized_from": self.sized_from or "free memory, at the first request",
                "in_use_mb": round(self.in_use / MB, 1), "peak_mb": round(self.peak / MB, 1),
                "held_while_waiting_mb": round(self.waiting_held / MB, 1)}


class Held:
    """What one request holds in a MemoryGate, from `hold` to the end of its block."""

    def __init__(self, gate: MemoryGate, amount: int, priority: int):
        self._gate = gate
        self.amount = amount
        self.priority = priority

    async def grow(self, need: int, what: str, param: str | None = None) -> None:
        """Hold `need` in all (413 at once if it could never fit): waits as `hold` does, keeping what is
        held meanwhile."""
        self._gate.check(need, what, param)
        if need > self.amount:
            await self._gate._grow(self, need)
