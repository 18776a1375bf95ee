"""How much working memory a request needs, and a gate that keeps one replica within its budget.

The estimates are upper bounds built from the model's config and the request's size (tokens,
pixels, samples), not measurements; they only need to be right about orders of magnitude, so that
no combination of requests can drive a replica into the node's OOM killer (which would take every
Ray worker on the node with it). `bench/hostile.py` measures what the worst requests really cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import RequestTooLargeError

log = logging.getLogger(__name__)

MB = 2**20
T = TypeVar("T")
MIN_SIZED_BUDGET = 256 * MB  # a budget sized from free memory never goes below this
FLOAT_BYTES = 4  # activations are float32 on CPU; on GPU half of this, so the estimate errs high


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def chat_request_bytes(config: Any, prompt_tokens: int, new_tokens: int, images: int = 0,
                       image_bytes: int = 0, batch: int = 1, padding: float = 1.0) -> int:
    """KV cache for the whole sequence (times `padding`: the most a shared batch's left padding adds, see
    ChatOptions.batch_length_ratio), the prefill's activations and attention scores, the logits, and
    (`image_bytes`) the request's images as decoded pixels and processor tensors."""
    text = _text_config(config)
    hidden = int(getattr(text, "hidden_size", 1024))
    heads = int(getattr(text, "num_attention_heads", 16))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    layers = int(getattr(text, "num_hidden_layers", 24))
    inner = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    vocab = int(getattr(text, "vocab_size", 32000))
    total = prompt_tokens + new_tokens
    kv_cache = int(2 * layers * kv_heads * head_dim * total * FLOAT_BYTES * padding)
    # one layer's prefill at a time: hidden states, MLP, and (worst case, the math attention kernel)
    # a full heads x prompt x prompt score matrix
    prefill = (prompt_tokens * (4 * hidden + 2 * inner) + heads * prompt_tokens * prompt_tokens) * FLOAT_BYTES
    logits = 4 * vocab * FLOAT_BYTES
    vision = images * _vision_bytes(config)
    return batch * (kv_cache + prefill + logits) + vision + image_bytes


def decoded_image_bytes(images: list[bytes], image_processor: Any = None,
                        size_of: Callable[[bytes], tuple[int, int]] | None = None) -> int:
    """Decoded RGB pixels of encoded images (sizes from their headers), as bytes, a float copy and the
    processor's output; at the size the image processor resizes to when that is larger. Its `size` (a
    dict, or transformers' SizeDict) is read two ways:
    - Qwen2-VL's kind (it merges patches: `merge_size`) bounds an image's pixel count: `shortest_edge`
      is min_pixels, so a smaller image is scaled up to that many pixels;
    - otherwise `shortest_edge` is an edge that the short side is scaled up to (CLIP's, LLaVA's), so
      a thin image grows by the square of that factor.
    `size_of` reads an image's (width, height) from its header (the VLM's: in a decoder process)."""
    from .media import image_size

    size = getattr(image_processor, "size", None)
    shortest = size.get("shortest_edge") if size is not None and hasattr(size, "get") else None
    pixel_bounds = getattr(image_processor, "merge_size", None) is not None
    total = 0
    for width, height in map(size_of or image_size, images):
        pixels = width * height
        if shortest and pixel_bounds:
            pixels = max(pixels, int(shortest))
        elif shortest:
            pixels = max(pixels, int(pixels * (shortest / max(1, min(width, height))) ** 2))
        total += pixels * 3 * (1 + 2 * FLOAT_BYTES)
    return total


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


def speech_request_bytes(config: Any, chars: int, speed: float = 1.0) -> int:
    """VITS-style: ~0.1 s of audio per character at most at speed 1 (1/speed times that slower), with the
    vocoder's wide upsampling layers."""
    rate = int(getattr(config, "sampling_rate", 16000))
    channels = int(getattr(config, "upsample_initial_channel", 512))
    samples = int(chars * 0.1 * rate / max(speed, 1e-3)) + rate
    return samples * FLOAT_BYTES * (2 + channels // 8)


def free_memory(device: str | None = None) -> tuple[int, str]:
    """Bytes free for working memory where this replica computes, and where: the GPU its models are on
    (`device`, e.g. "cuda:0"; None while none is loaded: cuda:0, the one Ray gives it, when torch sees one),
    else the node's available RAM, narrowed by the container's cgroup limit when there is one (MemAvailable
    counts the host's memory, not the pod's). A model on the CPU is measured in RAM whatever GPU is visible,
    and a GPU that cannot be opened (the load then fell back to the CPU) is not asked: asking raised at every
    request, a 500 for a model that loaded."""
    torch = sys.modules.get("torch")  # imported by the first model load; never imported here for this
    on_gpu = device.startswith("cuda") if device else torch is not None and torch.cuda.is_available()
    if torch is not None and on_gpu:
        where = device or "cuda:0"
        try:
            free, _ = torch.cuda.mem_get_info(torch.device(where).index or 0)
            return int(free), where
        except RuntimeError as exc:
            log.warning("cannot read free memory of %s (%s); sizing the budget from RAM", where,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
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


async def to_thread_held(fn: Callable[..., T], *args: Any) -> T:
    """`asyncio.to_thread` for work done while a request holds memory in a gate (decoding its images,
    resampling its audio, compiling its grammar). A thread cannot be stopped: if the caller is cancelled
    (its client left), the cancellation waits here until the work has ended, so the hold is released
    only when the memory is. Otherwise a client that sends and hangs up at once could stack up the
    thread pool's worth of decodes the gate no longer counts."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await settle(work)
        raise


async def settle(work: asyncio.Future, bound_s: float | None = None) -> None:
    """Wait for `work` to end (at most `bound_s`), whatever cancellations come meanwhile: a cancelled
    request calls this before its memory hold is released, for work that goes on without it (a thread,
    a model call that drops its row at the next step)."""
    loop = asyncio.get_running_loop()
    deadline = None if bound_s is None else loop.time() + bound_s
    while not work.done():
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            return  # something is wrong with the work (the health check says so); nothing is gained by waiting
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([work], timeout=left)
    if not work.cancelled():
        work.exception()  # retrieved: its outcome no longer matters to anyone


class MemoryGate:
    """Admits requests while their estimates fit the budget together; others wait. Of the waiters at the
    most urgent (lowest) `priority`, the first to arrive of those that fit goes in; a waiter never goes
    while one of lower priority waits, fitting or not, so larger urgent requests are not starved by
    smaller ones behind them.

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
        self._waiters: list[_Waiter] = []  # in arrival order
        self._next: _Waiter | None = None  # the waiter that goes in now (`_choose`), if any

    @property
    def waiting_held(self) -> int:
        """Bytes held by requests that wait to grow (counted in in_use)."""
        return sum(w.held.amount for w in self._waiters if w.held is not None)

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
        """Until `need` fits beside what the others hold and it is this request's turn (see the class)."""
        self.check(need, what, param)
        held = Held(self, 0, priority)
        await self._wait(_Waiter(priority, need, None), held)
        try:
            yield held
        finally:
            async with self._turn:
                self.in_use -= held.amount
                self._choose()

    async def _grow(self, held: Held, need: int) -> None:
        await self._wait(_Waiter(held.priority, need, held), held)

    async def _wait(self, waiter: _Waiter, held: Held) -> None:
        """Queue `waiter` until `_choose` picks it, then make `held` hold its whole need."""
        async with self._turn:
            self._waiters.append(waiter)
            self._choose()
            try:
                await self._turn.wait_for(lambda: self._next is waiter)
            except BaseException:  # cancelled while waiting, chosen or not: it takes nothing more
                self._waiters.remove(waiter)
                self._choose()
                raise
            self._waiters.remove(waiter)
            self._take(waiter.need - held.amount)
            held.amount = waiter.need
            self._choose()

    def _choose(self) -> None:
        """Pick the waiter that goes in now and wake the waiters to look (called after every change).

        Of the waiters at the most urgent priority, the first that fits. When none does and every byte in
        use is held by requests waiting to grow, nothing will be freed until one of them goes, so the
        first grower (by priority, then arrival) goes although it does not fit; in use then stays under
        the budget plus its estimate (each waiting hold fitted when it was taken)."""
        self._next = None
        if self._waiters:
            urgent = min(w.priority for w in self._waiters)
            self._next = next((w for w in self._waiters if w.priority == urgent and self._fits(w)), None)
            growers = [w for w in self._waiters if w.held is not None]
            if self._next is None and growers and self.in_use == self.waiting_held:
                self._next = min(growers, key=lambda w: w.priority)  # min keeps the earliest among equals
        self._turn.notify_all()

    def _fits(self, waiter: _Waiter) -> bool:
        holding = waiter.held.amount if waiter.held is not None else 0
        return self.in_use - holding + waiter.need <= self.budget

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


@dataclass(eq=False)
class _Waiter:
    priority: int
    need: int  # bytes it holds in all once in
    held: Held | None  # a hold waiting to grow (what it holds meanwhile is in use); None for a new hold


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
