"""Text generation with a loaded transformers model: batched, streamed, bounded in time.

Shared by the LLM and VLM deployments; they differ only in how a batch of chats becomes
model inputs (`encode`).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import torch

from loading import LoadedModel, ModelSpec

from .errors import InvalidRequestError
from .params import ChatParams, ChatResult

Encode = Callable[[LoadedModel, list[ChatParams]], dict[str, torch.Tensor]]

# torch's RNG is process-global: seeded sampling must not interleave with another generate.
_SEED_LOCK = threading.Lock()


def resolve_max_new_tokens(spec: ModelSpec, requested: int | None) -> int:
    if requested is None:
        return spec.max_new_tokens
    if requested > spec.max_new_tokens:
        raise InvalidRequestError(
            f"max_tokens={requested} exceeds the limit of model {spec.name!r} ({spec.max_new_tokens}; "
            "raise max_new_tokens for it in serve_config.yaml)",
            param="max_tokens",
        )
    return requested


def generate_kwargs(spec: ModelSpec, loaded: LoadedModel, params: ChatParams, max_new_tokens: int) -> dict[str, Any]:
    tokenizer = loaded.tokenizer
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "max_time": spec.generation_timeout_s,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if params.temperature is not None:  # None keeps the model's own generation_config
        kwargs["do_sample"] = params.temperature > 0
        if params.temperature > 0:
            kwargs["temperature"] = params.temperature
    if params.top_p is not None:
        kwargs["top_p"] = params.top_p
    if params.stop:
        kwargs["stop_strings"], kwargs["tokenizer"] = params.stop, tokenizer
    return kwargs


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def _end_token_ids(loaded: LoadedModel) -> set[int]:
    ids = set()
    eos = loaded.model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return ids


def generate_batch(spec: ModelSpec, loaded: LoadedModel, batch: list[ChatParams], encode: Encode) -> list[ChatResult]:
    """One generate call for requests that share a model and sampling settings."""
    limits = [resolve_max_new_tokens(spec, p.max_new_tokens) for p in batch]
    inputs = encode(loaded, batch).to(loaded.model.device)
    kwargs = generate_kwargs(spec, loaded, batch[0], max(limits))
    with _SEED_LOCK, loaded.active() as model, torch.inference_mode():
        if batch[0].seed is not None:
            torch.manual_seed(batch[0].seed)
        output = model.generate(**inputs, **kwargs)
    prompt_len = inputs["input_ids"].shape[1]
    prompt_counts = inputs["attention_mask"].sum(dim=1).tolist()
    end_ids = _end_token_ids(loaded) | {loaded.tokenizer.pad_token_id}
    results = []
    for row, params, limit, prompt_tokens in zip(output, batch, limits, prompt_counts):
        new = row[prompt_len:].tolist()
        ended = False
        for i, token in enumerate(new):
            if token in end_ids:
                new, ended = new[:i], True
                break
        if len(new) > limit:  # a shorter limit than the batch's maximum
            new, ended = new[:limit], False
        text = loaded.tokenizer.decode(new, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, params.stop)
        finish = "stop" if ended or stopped or len(new) < limit else "length"
        results.append(ChatResult(text, int(prompt_tokens), len(new), finish))
    return results


class StreamingGeneration:
    """Runs generate in a worker thread and yields text deltas, holding back partial stop strings."""

    def __init__(self, spec: ModelSpec, loaded: LoadedModel, params: ChatParams, encode: Encode):
        from transformers import TextIteratorStreamer

        self.params = params
        self.limit = resolve_max_new_tokens(spec, params.max_new_tokens)
        self.inputs = encode(loaded, [params]).to(loaded.model.device)
        self.streamer = TextIteratorStreamer(
            loaded.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=spec.generation_timeout_s + 5
        )
        self.kwargs = generate_kwargs(spec, loaded, params, self.limit)
        self.loaded = loaded
        self.prompt_tokens = int(self.inputs["attention_mask"].sum())
        self.completion_tokens = 0
        self.finish_reason = "stop"

    def run(self) -> None:
        """The blocking part: call from a worker thread."""
        try:
            with _SEED_LOCK, self.loaded.active() as model, torch.inference_mode():
                if self.params.seed is not None:
                    torch.manual_seed(self.params.seed)
                output = model.generate(**self.inputs, **self.kwargs, streamer=self.streamer)
            new = output[0][self.inputs["input_ids"].shape[1]:].tolist()
            end_ids = _end_token_ids(self.loaded) | {self.loaded.tokenizer.pad_token_id}
            self.completion_tokens = next((i for i, t in enumerate(new) if t in end_ids), len(new))
            if self.completion_tokens >= self.limit:
                self.finish_reason = "length"
        except BaseException:
            self.streamer.end()  # unblock the reader; the caller re-raises via the future
            raise

    def deltas(self) -> Iterator[str]:
        """Text pieces as they are generated (blocking iterator: read it from a thread)."""
        stops = [s for s in self.params.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        buffer = ""
        for piece in self.streamer:
            buffer += piece
            text, stopped = _cut_at_stop(buffer, stops)
            if stopped:
                if text:
                    yield text
                self.finish_reason = "stop"
                for _ in self.streamer:  # drain: generate stops on its own stop_strings criterion
                    pass
                return
            if len(buffer) > hold:
                yield buffer[: len(buffer) - hold]
                buffer = buffer[len(buffer) - hold:]
        if buffer:
            yield buffer
