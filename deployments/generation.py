"""Text generation with a loaded transformers model: batched, streamed, bounded in time.

Shared by the LLM and VLM deployments; they differ only in how a batch of chats becomes
model inputs (`encode`).
"""

from __future__ import annotations

import bisect
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from loading import LoadedModel, ModelSpec

from .params import PADDED_KEYS, ChatParams, ChatResult
from .wakeups import batched

# torch's RNG is process-global: seeded sampling must not interleave with another generate.
_SEED_LOCK = threading.Lock()


def generate_kwargs(spec: ModelSpec, loaded: LoadedModel, params: ChatParams, max_new_tokens: int) -> dict[str, Any]:
    tokenizer = loaded.tokenizer
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "max_time": spec.generation_timeout_s,
        "pad_token_id": tokenizer.pad_token_id,
    }
    sampling = sampling_settings(loaded, params)
    kwargs["do_sample"] = sampling["temperature"] > 0
    if kwargs["do_sample"]:
        kwargs.update(sampling)  # top_k 0: none (transformers' own default would be 50)
    if params.stop:
        kwargs["stop_strings"], kwargs["tokenizer"] = params.stop, tokenizer
    return kwargs


def sampling_settings(loaded: LoadedModel, params: ChatParams) -> dict[str, Any]:
    """The request's sampling; what it leaves open comes from the sampling settings the model's
    generation_config.json sets, else OpenAI's defaults (temperature 1, top_p 1, no top_k), as vLLM's.
    Left to transformers, a config without do_sample decoded greedily, so n choices were n copies."""
    given = _configured_sampling(loaded.model.generation_config)
    temperature = params.temperature if params.temperature is not None else given.get("temperature", 1.0)
    if temperature < SAMPLING_EPS:  # greedy: logits / 1e-38 overflow to inf, and sampling them fails
        temperature = 0.0
    top_p = params.top_p if params.top_p is not None else given.get("top_p", 1.0)
    if top_p < SAMPLING_EPS:  # the nucleus is the top token alone: greedy (OpenAI takes top_p 0)
        temperature, top_p = 0.0, 1.0
    top_k = given.get("top_k", 0)  # no OpenAI field sets it: the model's, whatever the request's temperature
    return {"temperature": float(temperature), "top_p": float(top_p), "top_k": int(top_k)}


SAMPLING_EPS = 1e-5  # temperatures below it decode greedily (vLLM's _SAMPLING_EPS)


_CONFIGURED: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _configured_sampling(config: Any) -> dict[str, Any]:
    """temperature, top_p and top_k as a generation config sets them (not transformers' class defaults:
    its top_k 50 is nobody's choice); read once per config."""
    known = _CONFIGURED.get(config)
    if known is None:
        diff = config.to_diff_dict() if hasattr(config, "to_diff_dict") else {}
        known = _CONFIGURED[config] = {key: diff[key] for key in ("temperature", "top_p", "top_k")
                                       if diff.get(key) is not None}
    return known


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def end_token_ids(loaded: LoadedModel) -> set[int]:
    ids = set()
    eos = loaded.model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return ids


def collate(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Per-request inputs (batch dimension 1 each) as one batch: token rows left-padded (decoder-only
    generate appends on the right), everything else (pixel values, image sizes) concatenated."""
    width = max(row["input_ids"].shape[-1] for row in rows)
    if any(row.keys() != rows[0].keys() for row in rows):  # batches are keyed on their inputs (sampling_key)
        raise ValueError(f"rows with different inputs cannot share a batch: {sorted({k for r in rows for k in r})}")
    out: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if key in PADDED_KEYS:
            fill = pad_id if key == "input_ids" else 0
            out[key] = torch.cat([torch.nn.functional.pad(v, (width - v.shape[-1], 0), value=fill) for v in values])
        else:
            out[key] = torch.cat(values)
    return out


class DropCancelled(StoppingCriteria):
    """Ends a row whose request was cancelled (client gone, ingress timeout) at the next step; generate
    stops once every row has ended. Also the testing hook `debug_step_delay_s`."""

    def __init__(self, batch: list[ChatParams], step_delay_s: float = 0.0):
        self.events = [p.cancelled for p in batch]
        self.step_delay_s = step_delay_s

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        done = [event is not None and event.is_set() for event in self.events]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_batch(spec: ModelSpec, loaded: LoadedModel, batch: list[ChatParams]) -> list[ChatResult]:
    """One generate call for requests that share a model and sampling settings, each already encoded
    on its own (`params.inputs`). Requests with a `sink` (streams) get their text deltas as tokens are
    produced; a cancelled request's row ends at the next step; every request gets its result."""
    limits = [p.max_new_tokens or spec.max_new_tokens for p in batch]
    pad_id = loaded.tokenizer.pad_token_id
    inputs = {k: v.to(loaded.model.device) for k, v in collate([p.inputs for p in batch], pad_id).items()}
    kwargs = generate_kwargs(spec, loaded, batch[0], max(limits))
    kwargs["stopping_criteria"] = StoppingCriteriaList([DropCancelled(batch, spec.debug_step_delay_s)])
    end_ids = end_token_ids(loaded) | {pad_id}
    if any(p.sink for p in batch):
        kwargs["streamer"] = RowStreams(loaded.tokenizer, batch, limits, end_ids)
    with _SEED_LOCK, loaded.active() as model, torch.inference_mode():
        if batch[0].seed is not None:
            torch.manual_seed(batch[0].seed)
        output = model.generate(**inputs, **kwargs)
    prompt_len = inputs["input_ids"].shape[1]
    prompt_counts = inputs["attention_mask"].sum(dim=1).tolist()
    results = []
    for row, params, limit, prompt_tokens in zip(output, batch, limits, prompt_counts, strict=True):
        new, ended = _own_tokens(row[prompt_len:].tolist(), end_ids, limit)
        text, stopped = cut_at_stop(loaded.tokenizer.decode(new, skip_special_tokens=True), params.stop)
        # "stop" only when the model ended its reply or a stop string cut it; a row cut short by
        # generation_timeout_s (generate's max_time) hit a limit, like max_tokens: "length"
        finish = "stop" if ended or stopped else "length"
        if params.cancelled is not None and params.cancelled.is_set():
            finish = "cancelled"  # nobody reads it; the server counts the tokens it did not have to make
        results.append(ChatResult(text, int(prompt_tokens), len(new), finish))
    return results


def _own_tokens(new: list[int], end_ids: set[int], limit: int) -> tuple[list[int], bool]:
    """A row's tokens up to its end token (True) or its own limit, which may be shorter than the batch's."""
    for i, token in enumerate(new[: limit + 1]):
        if token in end_ids:
            return new[:i], True
    return new[:limit], False


class RowStreams(BaseStreamer):
    """Streams every row of a batched generate to its own request.

    transformers' TextIteratorStreamer takes a batch of one, which made each stream a generate call
    of its own (16 concurrent streams: ~0.5 s to the first token while the others ran). This one
    lets streams share a generate call with each other and with plain requests; generate calls
    `put` on its thread with the prompt first, then one token per row per step.
    """

    def __init__(self, tokenizer: Any, batch: list[ChatParams], limits: list[int], end_ids: set[int]):
        self.rows = [RowStream(tokenizer, p.sink, p.stop, limit, end_ids) if p.sink else None
                     for p, limit in zip(batch, limits, strict=True)]

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:  # the prompt
            return
        with batched():  # one wake-up of each event loop per step, not one per streamed row (wakeups.py)
            for row, token in zip(self.rows, value.tolist(), strict=True):
                if row is not None:
                    row.push(token)

    def end(self) -> None:
        """Nothing to flush: the caller sends what is held back from the final text."""


def text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, straight from the Rust tokenizer where that is
    all transformers would do (a fast tokenizer of its own class, no clean-up of spaces): its Python
    wrapper took ~3x the Rust call, and a streamed row decodes twice per token on the inference thread."""
    from transformers import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    kind, rust = type(tokenizer), getattr(tokenizer, "_tokenizer", None)
    if (isinstance(tokenizer, TokenizersBackend) and rust is not None and kind._decode is TokenizersBackend._decode
            and kind.decode is PreTrainedTokenizerBase.decode and not tokenizer.clean_up_tokenization_spaces):
        return lambda ids: rust.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class RowStream:
    """One request's text so far; sends only what can no longer change: nothing past an end token or
    the request's own limit, no half of a multi-byte character, no prefix of a stop string."""

    def __init__(self, tokenizer: Any, sink: Callable[[str], None] | None, stops: list[str], limit: int,
                 end_ids: set[int], entry_sink: Callable[[list], None] | None = None):
        """`sink` None: nobody reads the text as it grows (a reply sent whole); it is decoded at all only
        to find stop strings (two tokenizer calls per token: ~10% of the tiny model's decode loop).
        `entry_sink`: takes the logprob entries of the tokens whose text a `sink` call sends, just before
        that call (the entries of a stop string's tokens are never sent)."""
        self.tokenizer, self.sink, self.limit, self.end_ids = tokenizer, sink, limit, end_ids
        self.entry_sink = entry_sink
        self.decode = text_decoder(tokenizer)
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""  # decoded tokens[:read_offset]
        # Incremental detokenization: each step decodes only a short window, tokens[prefix_offset:],
        # instead of the whole row (a full re-decode grows with the reply and runs on generate's thread).
        self.prefix_offset = self.read_offset = 0
        self.sent = ""
        self.done = False
        self.starts: list[int] = []  # where each token's text begins in `text`
        self.owed: list[tuple[int, Any]] = []  # (start, logprob entry) of tokens whose text is not sent yet

    def push(self, token: int, entry: Any = None) -> None:
        if self.done:
            return
        if token in self.end_ids or len(self.tokens) >= self.limit:
            self.done = True
            return
        self.tokens.append(token)
        self.starts.append(len(self.text))
        if entry is not None and self.entry_sink is not None:
            self.owed.append((len(self.text), entry))
        if self.sink is None and not self.stops:
            return
        decode = self.decode
        prefix = decode(self.tokens[self.prefix_offset:self.read_offset])
        window = decode(self.tokens[self.prefix_offset:])
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return  # a skipped special token, or an incomplete UTF-8 sequence whose next bytes are to come
        self.text += window[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        text, stopped = cut_at_stop(self.text, self.stops)
        if stopped:
            self.done, ready = True, text
        else:
            ready = text[: len(text) - self.hold]
        if self.sink is not None and len(ready) > len(self.sent) and ready.startswith(self.sent):
            try:
                if self.owed:
                    given = [entry for start, entry in self.owed if start < len(ready)]
                    self.owed = self.owed[len(given):]
                    if given:
                        self.entry_sink(given)  # type: ignore[misc]
                self.sink(ready[len(self.sent):])
            except Exception:  # the request went away: the rest of the batch goes on
                self.done = True
            self.sent = ready

    def kept_tokens(self, length: int) -> int:
        """How many tokens the first `length` characters of the text come from (a reply cut at a stop
        string keeps the logprobs of those alone)."""
        return bisect.bisect_left(self.starts, length)
