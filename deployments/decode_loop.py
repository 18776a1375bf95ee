"""Continuous batching: one decode loop per replica, rows joining and leaving at every step.

A request is prefilled (with whoever else arrived since the last step, as one padded batch) and
its KV cache joins the running batch's cache, left-padded to a common length; from then on every
step is one forward over all running rows of that model. A row leaves as soon as it ends (end token,
stop string, its own max_tokens or time bound, or its caller gone), and the columns that became
padding for every row are trimmed. Rows for different LoRA adapters of one base share steps (PEFT's
`adapter_names`); sampling settings and seeds are per row. Runs on the replica's inference thread.

Images and adapters (`Group.prefill_batches`): PEFT splits each LoRA layer's input by batch row, but a
vision tower's and projector's batch is the images, not the rows (a row has none, one or several). So
when an adapter of the model has layers outside its language model, rows with images are prefilled one
adapter at a time with that adapter switched on; their decode steps (text only) are shared as any row's.

Why ours and not transformers' ContinuousBatchingManager: it serves neither mixed LoRA adapters,
nor image inputs, nor stop strings per request, and it sizes a paged cache up front (its
`transformers serve --continuous-batching` took 14 GB here); bench/RESULTS.md compares the two.
"""

from __future__ import annotations

import inspect
import logging
import queue
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch
from transformers import DynamicCache

from loading import LANGUAGE_MODEL, LoadedModel, ModelSpec, adapted_parts, adapter_layers

from .generation import RowStream, collate, cut_at_stop, end_token_ids, sampling_settings
from .params import PADDED_KEYS, ChatParams, ChatResult
from .prefix_cache import Prefix, PrefixCache
from .row_logits import Entry, RowLogits
from .wakeups import batched

Done = Callable[[ChatResult | BaseException], None]  # called on the loop's thread with the row's outcome
logger = logging.getLogger(__name__)
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


@dataclass
class Row:
    spec: ModelSpec
    params: ChatParams
    done: Done
    adapter: str | None
    sampling: dict[str, Any]
    end_ids: set[int]
    stream: RowStream
    generator: torch.Generator | None
    started: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    hooks: RowLogits | None = None  # logit_bias, penalties, grammar, logprobs: None when none is asked for
    logprobs: list[Entry] = field(default_factory=list)
    pending: Entry | None = None  # the logprob entry of the token just sampled
    error: BaseException | None = None  # a row that failed on its own (finish "error")
    prompt_ids: list[int] | None = None  # a text-only prompt's tokens, set at prefill when a prefix cache is on
    cached_tokens: int = 0  # of them, those whose keys and values came from the prefix cache

    @property
    def limit(self) -> int:
        return self.params.max_new_tokens or self.spec.max_new_tokens

    @property
    def length(self) -> int:
        """Prompt + max_tokens (rows batch within length_ratio of it)."""
        return row_length(self.spec, self.params)

    @property
    def grammar(self) -> Any:
        return self.hooks.grammar if self.hooks is not None else None

    def take(self, token: int, sampled: bool = True) -> None:
        """`token` joins the output (`sampled`: the model chose it; else the server closed a constrained
        reply with it, which has no logprob)."""
        self.tokens.append(token)
        if len(self.tokens) == 1:  # the first token: time to first token, and the request now runs
            self.params.first_token_at = time.monotonic()
            if self.params.running is not None:
                self.params.running()
        entry = None
        if self.hooks is not None:
            self.hooks.taken(token)
            if sampled and self.pending is not None:
                entry = self.pending
                self.logprobs.append(entry)
        self.pending = None
        self.stream.push(token, entry)  # a streamed entry goes out with its token's text


def cache_argument(model: Any) -> str:
    """The name of a model's KV-cache argument: transformers 5.x renames `past_key_values` to `cache`
    model by model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


class Group:
    """The running rows of one model (a base and its adapters count as one) and their KV cache."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cache length]: 1 where a row has a real token
        self.next_tokens: torch.Tensor | None = None  # [rows, 1]: each row's last sampled token

    def forward(self, inputs: dict[str, torch.Tensor], cache: DynamicCache, rows: list[Row],
                one_adapter: bool = False) -> torch.Tensor:
        """One forward of `rows`: each with its own adapter (PEFT's `adapter_names`), or, with
        `one_adapter` or when they all use one, with that adapter switched on: PEFT's per-row path
        costs ~35% more per step on the tiny LoRA model (bench/VOICE_TURNS.md), and a lone
        conversation is the common case."""
        model = self.loaded.model
        kwargs: dict[str, Any] = {self.cache_argument: cache}
        peft = hasattr(model, "peft_config")
        one_adapter = one_adapter or len({row.adapter for row in rows}) == 1
        with self.loaded.lock, torch.inference_mode():
            if peft and one_adapter:
                with replace(self.loaded, adapter_name=rows[0].adapter).active() as active:
                    out = active(**inputs, use_cache=True, logits_to_keep=1, **kwargs)
                return out.logits[:, -1, :].float()
            if peft:
                adapter_layers(model, enabled=True)  # a base-only step may have left them off
                kwargs["adapter_names"] = [row.adapter or BASE_ADAPTER for row in rows]
            try:
                out = model(**inputs, use_cache=True, logits_to_keep=1, **kwargs)
            except BaseException:
                if peft:
                    drop_leaked_adapter_hooks(model)
                raise
        return out.logits[:, -1, :].float()

    def prefill_batches(self, rows: list[Row]) -> list[tuple[list[Row], bool]]:
        """Arriving rows as prefill batches, each with whether it runs under one adapter.

        Rows batch when they carry inputs of the same names (collate pads token rows and concatenates
        pixel values and the like; a row without a kind cannot join rows with it). Rows with images batch
        per adapter when any adapter of the model has layers outside its language model (see the module's
        docstring)."""
        batches: dict[tuple, list[Row]] = {}
        split: bool | None = None
        for row in rows:
            assert row.params.inputs is not None
            kinds, extra = row.params.input_kinds(), row.params.has_non_token_inputs()
            if extra and split is None:
                model = self.loaded.model
                split = hasattr(model, "peft_config") and bool(adapted_parts(model) - {LANGUAGE_MODEL})
            key = (kinds, row.adapter) if extra and split else (kinds,)
            batches.setdefault(key, []).append(row)
        return [(batch, len(key) == 2) for key, batch in batches.items()]

    @cached_property
    def cache_argument(self) -> str:
        """Read once: inspecting the signature cost ~2% of a tiny model's decode step."""
        return cache_argument(self.loaded.model)

    @cached_property
    def step_mask_prepared(self) -> bool:
        """Whether a decode step may hand the model its attention mask ready-made (see step_mask)."""
        return prepared_step_mask_fits(self.loaded.model)

    def step_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of a one-token decode step. For SDPA attention over full-attention layers,
        the 4D boolean mask transformers would build from `mask` (query length 1: only the padding
        columns are off), which it passes through as it is: building it took ~8% of a tiny model's step
        with padded rows. Otherwise the 2D mask, for the model to build its own."""
        return mask[:, None, None, :].bool() if self.step_mask_prepared else mask


class DecodeLoop:
    """Rows of every model this replica serves; `submit` from any thread, `run` on the inference thread."""

    def __init__(self, max_rows: int, stats: dict[str, int], on_step: Callable[[str, int], None] | None = None,
                 computing: Callable[[LoadedModel], AbstractContextManager] | None = None,
                 prefix_cache_bytes: int = 0, length_ratio: float = 2.0):
        self.max_rows = max_rows
        self.length_ratio = length_ratio  # rows batch within this factor of length (ChatOptions.batch_length_ratio)
        self.prefix_cache_bytes = prefix_cache_bytes  # per model; 0: every prompt is prefilled whole
        self.prefixes: weakref.WeakKeyDictionary[Any, PrefixCache] = weakref.WeakKeyDictionary()
        self.stats = stats  # shown in /health: model_calls (prefills + steps), decode_steps, requests, ...
        self.on_step = on_step  # (model, rows) after every decode step: the batch-size metric
        # around each forward of a model: the threads torch computes it with, and the node's CPU turn
        self.computing = computing or (lambda loaded: nullcontext())
        self.pending: queue.SimpleQueue[tuple[ModelSpec, LoadedModel, ChatParams, Done]] = queue.SimpleQueue()
        self.held: list[tuple[ModelSpec, LoadedModel, ChatParams, Done]] = []  # waiting for a place; loop thread only
        self.held_models: set[tuple] = set()  # the kinds of group (base keys) the held rows wait to join
        self.groups: dict[tuple, Group] = {}  # (base key, serial): a model may run several batches
        self.serial = 0
        self.walk_held = False  # set (from any thread) when a request is cancelled: it may be a held row


    @classmethod
    def for_options(cls, options: Any, stats: dict[str, int], on_step: Callable[[str, int], None] | None = None,
                    computing: Callable[[LoadedModel], AbstractContextManager] | None = None) -> DecodeLoop:
        """The loop a chat family's options (ChatOptions) configure: the replica's, and the benchmarks'."""
        return cls(options.max_batch_size, stats, on_step, computing, int(options.prefix_cache_mb * 2**20),
                   options.batch_length_ratio)
    def submit(self, spec: ModelSpec, loaded: LoadedModel, params: ChatParams, done: Done) -> None:
        self.pending.put((spec, loaded, params, done))

    def cancelled(self) -> None:
        """A request was cancelled: if it waits for a place, it is told (and lets go of its memory) at the
        next step, not when a place frees."""
        self.walk_held = True

    def busy(self) -> bool:
        return not self.pending.empty() or bool(self.held) or any(group.rows for group in self.groups.values())

    def run(self, yield_to: Callable[[], bool] | None = None) -> None:
        """Step every model's rows until no row is left and nothing waits; or, as soon as `yield_to()` says
        another call waits for this thread (a generate() batch of a model the loop cannot run, an adapter's
        removal), return after the current step so that it runs next: its rows stay here and the next run
        goes on with them."""
        while self.busy():
            if yield_to is not None and yield_to():
                return
            self._admit()
            for key, group in list(self.groups.items()):
                if group.rows:
                    try:
                        self._step(group)
                    except Exception as exc:  # a failed step fails the rows in it, not the loop
                        for row in group.rows:
                            row.done(exc)
                        group.rows = []
                if not group.rows:
                    del self.groups[key]
                    self.walk_held = True  # a held row may have waited for this batch: it may start its own

    # -- joining ------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Rows for the places free in each model's batch: lower `priority` first, then in arrival order
        (those held back by a full batch before anything that arrived after them)."""
        if self.pending.empty() and self.held and not self.walk_held and not self._place_for_held():
            # every held row's batch is full: none joins at this step, and the queue is not walked (up to
            # max_ongoing_requests rows wait here) unless a request was cancelled since the last walk
            return
        self.walk_held = False  # before the walk: a cancellation during it is seen at the next step
        arrivals: dict[tuple, list[Row]] = {}
        waiting, self.held = self.held, []
        while not self.pending.empty():
            waiting.append(self.pending.get())
        waiting.sort(key=lambda item: item[2].priority)  # stable: arrival order among equals
        held_kinds: set[tuple] = set()
        for spec, loaded, params, done in waiting:
            if params.cancelled is not None and params.cancelled.is_set():  # its caller left while it waited
                self.stats["cancelled_while_waiting"] = self.stats.get("cancelled_while_waiting", 0) + 1
                _tell(done, ChatResult("", 0, 0, "cancelled"))
                continue
            try:  # a request this fails for fails alone: taken from the queue, it must be told, not lost
                base, length = self.group_key(spec, loaded, params), row_length(spec, params)
                key = self._batch_for(base, length, loaded, arrivals)
                if key is None:
                    self.held.append((spec, loaded, params, done))  # a full batch: it joins when a row leaves
                    held_kinds.add(base)
                    continue
                arrivals.setdefault(key, []).append(new_row(spec, loaded, params, done))
            except Exception as exc:
                _tell(done, exc)
        self.stats["waiting_for_place"] = len(self.held)  # /health: rows a full batch keeps waiting now
        self.held_models = held_kinds
        for key, rows in arrivals.items():
            group = self.groups[key]
            with group.loaded.lock:  # no adapter attaches between choosing the batches and running them
                for batch, one_adapter in group.prefill_batches(rows):
                    try:
                        self._prefill(group, batch, one_adapter)
                    except Exception as exc:  # a failed prefill fails its own rows only: when several
                        # shared it, each is prefilled alone, so one bad request fails no other
                        if len(batch) == 1:
                            _tell(batch[0].done, exc)
                            continue
                        for row in batch:
                            try:
                                self._prefill(group, [row], one_adapter)
                            except Exception as own:
                                _tell(row.done, own)

    def _batch_for(self, base: tuple, length: int, loaded: LoadedModel,
                   arrivals: dict[tuple, list[Row]]) -> tuple | None:
        """The batch a row of `length` joins: the first of its kind whose lengths, with it, stay within
        `length_ratio` of each other and which has a place; None (it waits) when such batches are all
        full; a new batch when none takes its length."""
        full = False
        for key, group in self.groups.items():
            if key[0] != base:
                continue
            lengths = [row.length for row in group.rows] + [row.length for row in arrivals.get(key, [])]
            if lengths and max(*lengths, length) > self.length_ratio * min(*lengths, length):
                continue
            if len(lengths) < self.max_rows:
                return key
            full = True
        if full:
            return None
        self.serial += 1
        key = (base, self.serial)
        self.groups[key] = Group(loaded)
        return key

    def _place_for_held(self) -> bool:
        """Whether a held row may find a place: a batch of its kind with a free place, or none at all (a
        batch whose rows all ended is gone). A place of a batch whose lengths it does not fit counts too:
        the walk then admits nothing, which costs a walk."""
        for base in self.held_models:
            groups = [group for key, group in self.groups.items() if key[0] == base]
            if not groups or any(len(group.rows) < self.max_rows for group in groups):
                return True
        return False

    def group_key(self, spec: ModelSpec, loaded: LoadedModel, params: ChatParams) -> tuple:
        """The kind of batch a request's row joins: its model's (a base and its adapters share steps), except
        - an adapter PEFT cannot run beside others in one forward (DoRA, non-LoRA types) has its own;
        - on a model whose rotary factors follow the longest position in the forward (longrope, dynamic
          RoPE: Phi-3-128k's), rows that stay within its original window never share with rows that may
          pass it, so a short request answers as it would alone.
        Within a kind, rows batch within `length_ratio` of each other's prompt + max_tokens (`_batch_for`:
        padding, see ChatOptions.batch_length_ratio)."""
        key: tuple = (id(loaded.model),)
        if loaded.adapter_name is not None and not mixes(loaded.model, loaded.adapter_name):
            key += (loaded.adapter_name,)
        window = rope_window(loaded.config)
        if window is not None:
            key += (row_length(spec, params) > window,)
        return key

    def _prefix_cache(self, loaded: LoadedModel) -> PrefixCache | None:
        if self.prefix_cache_bytes <= 0:
            return None
        # keyed by the weights: attaching a first adapter wraps the model in a PeftModel, and the store of
        # the model before it (still valid for base rows) would otherwise be kept beside a second one
        model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
        store = self.prefixes.get(model)
        if store is None:
            store = self.prefixes[model] = PrefixCache(self.prefix_cache_bytes)
        return store

    def _prefill(self, group: Group, rows: list[Row], one_adapter: bool = False) -> None:
        loaded = group.loaded
        device = loaded.model.device
        pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        store = self._prefix_cache(loaded)
        if store is not None:
            for row in rows:
                row.prompt_ids = text_prompt(row.params)
            if any(row.prompt_ids is None for row in rows):
                store = None  # images (or other inputs) in the batch: prefilled whole, nothing stored
            elif _switches_rope(loaded, rows):
                store = None  # rotary factors of a forward past the original window: its keys fit no other
        hits = [store.match(row.adapter, row.prompt_ids) if store is not None and row.prompt_ids is not None
                else None for row in rows]
        if not any(hits):
            inputs = {k: v.to(device) for k, v in collate([r.params.inputs for r in rows], pad_id).items()}
            cache, reused = DynamicCache(), 0
        else:  # each row: its stored blocks (left-padded to the longest), then the rest of its prompt
            lengths = [hit[1] if hit is not None else 0 for hit in hits]
            inputs = {k: v.to(device) for k, v in collate([
                {key: r.params.inputs[key][:, n:] for key in ("input_ids", "attention_mask")}
                for r, n in zip(rows, lengths, strict=True)
            ], pad_id).items()}
            stored_kv, stored_mask = prefix_batch(hits, lengths)
            for row, n in zip(rows, lengths, strict=True):
                row.cached_tokens = n
            inputs["attention_mask"] = torch.cat([stored_mask.to(inputs["attention_mask"]), inputs["attention_mask"]],
                                                 dim=1)
            cache, reused = DynamicCache(stored_kv), stored_mask.shape[1]
            self.stats["prefix_cache_hits"] = self.stats.get("prefix_cache_hits", 0) + sum(n > 0 for n in lengths)
            self.stats["prefix_tokens_reused"] = self.stats.get("prefix_tokens_reused", 0) + sum(lengths)
        mask = inputs["attention_mask"].to(torch.long)
        for row, row_mask in zip(rows, mask, strict=True):
            row.prompt_tokens = int(row_mask.sum())
        # positions count real tokens only: left padding must not shift a row's rotary positions
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, reused:]
        with self.computing(loaded):
            logits = group.forward(inputs, cache, rows, one_adapter)
        self.stats["model_calls"] += 1
        self.stats["requests"] += len(rows)
        if store is not None:
            try:
                _store_prefixes(store, rows, hits, cache, mask)
            except Exception as exc:  # a cache layout without per-layer keys/values: serve on without the store
                store.turn_off()
                logger.warning("prefix cache off for %s: its KV cache cannot be stored (%r)", loaded.report.name, exc)
        first = self._sample(rows, logits)
        group.cache, group.mask, group.next_tokens = _join(group.cache, group.mask, group.next_tokens,
                                                            cache, mask, first)
        start = len(group.rows)
        group.rows.extend(rows)
        self._settle(group, first, start)

    # -- stepping ------------------------------------------------------------------------------------
    def _step(self, group: Group) -> None:
        assert group.cache is not None and group.mask is not None and group.next_tokens is not None
        if any(row.spec.debug_step_delay_s for row in group.rows):
            time.sleep(max(row.spec.debug_step_delay_s for row in group.rows))
        mask = torch.cat([group.mask, torch.ones_like(group.mask[:, :1])], dim=1)
        positions = (mask.sum(dim=1, keepdim=True) - 1).to(group.next_tokens.device)
        inputs = {"input_ids": group.next_tokens, "attention_mask": group.step_mask(mask.to(group.next_tokens.device)),
                  "position_ids": positions}
        with self.computing(group.loaded):
            logits = group.forward(inputs, group.cache, group.rows)
        group.mask = mask
        self.stats["model_calls"] += 1
        self.stats["decode_steps"] = self.stats.get("decode_steps", 0) + 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group.rows))
        if self.on_step is not None:
            self.on_step(group.loaded.report.name, len(group.rows))
        tokens = self._sample(group.rows, logits)
        group.next_tokens = tokens
        self._settle(group, tokens)

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """One token per row, each with its own settings, random generator and logits processing.
        Plain greedy rows (the common case) take one argmax over the batch, not one each."""
        greedy = [row.hooks is None and row.sampling["temperature"] <= 0 for row in rows]
        if all(greedy):
            return logits.argmax(dim=-1, keepdim=True)
        out = torch.empty((len(rows), 1), dtype=torch.long)
        if any(greedy):
            picked = torch.tensor([i for i, plain in enumerate(greedy) if plain], dtype=torch.long)
            out[picked, 0] = logits[picked.to(logits.device)].argmax(dim=-1).cpu()
        for i, row in enumerate(rows):
            hooks = row.hooks
            if greedy[i]:
                continue
            try:
                if hooks is None:
                    token = sample_token(logits[i], row.sampling, row.generator)
                else:
                    token = sample_token(hooks.process(logits[i]), row.sampling, row.generator)
                    row.pending = hooks.entry(logits[i], token)
            except Exception as exc:  # this row's sampling, grammar or bias failed: it ends alone
                row.error, token = exc, next(iter(row.end_ids), 0)
            out[i, 0] = token
        return out.to(logits.device)

    def _settle(self, group: Group, tokens: torch.Tensor, start: int = 0) -> None:
        """Record the new token of each row from `start` on (all rows after a step, the joining ones
        after a prefill); finish and remove the rows that ended."""
        keep = list(range(start))
        now = time.monotonic()
        with batched():  # the rows' deltas and results reach each event loop as one call (wakeups.py)
            for i, token in enumerate(tokens[:, 0].tolist(), start=start):
                row = group.rows[i]
                try:
                    row.finish = row.finish or self._advance(row, token, now)
                except Exception as exc:  # a callback of this row failed: it leaves, the others go on
                    row.error, row.finish = exc, "error"
                if row.finish is None:
                    keep.append(i)
                else:
                    self._finish(row)
        if len(keep) < len(group.rows):
            index = torch.tensor(keep, dtype=torch.long)
            group.rows = [group.rows[i] for i in keep]
            if not keep:
                group.cache = group.mask = group.next_tokens = None
                return
            assert group.cache is not None and group.mask is not None and group.next_tokens is not None
            group.cache.batch_select_indices(index.to(group.next_tokens.device))
            group.mask, group.next_tokens = group.mask[index], group.next_tokens[index]
            _trim(group)

    @staticmethod
    def _advance(row: Row, token: int, now: float) -> str | None:
        cancelled = row.params.cancelled
        if cancelled is not None and cancelled.is_set():
            return "cancelled"
        if row.error is not None:
            return "error"
        if token in row.end_ids:
            return "stop"
        if row.grammar is not None:
            return _advance_constrained(row, token, now)
        row.take(token)
        text, stopped = cut_at_stop(row.stream.text, row.params.stop) if row.params.stop else ("", False)
        if stopped:
            return "stop"
        if len(row.tokens) >= row.limit or now - row.started > row.spec.generation_timeout_s:
            return "length"  # its own max_tokens, or generation_timeout_s: a limit, not the model's end
        return None

    def _finish(self, row: Row) -> None:
        if row.finish == "cancelled":  # tokens made for a caller that left: shows how soon its row left
            self.stats["cancelled_tokens"] = self.stats.get("cancelled_tokens", 0) + len(row.tokens)
        grammar = row.grammar
        if grammar is not None and grammar.forced_closes:
            self.stats["grammar_forced_closes"] = self.stats.get("grammar_forced_closes", 0) + 1
        if row.finish == "error" and row.error is not None:
            _tell(row.done, row.error)
            return
        try:
            text, _ = cut_at_stop(row.stream.tokenizer.decode(row.tokens, skip_special_tokens=True), row.params.stop)
        except Exception as exc:  # told to this row alone: the batch's other rows are settled after it
            _tell(row.done, exc)
            return
        logprobs = None
        if row.params.logprobs:
            logprobs = row.logprobs
            kept, stopped = cut_at_stop(row.stream.text, row.params.stop)
            if stopped:  # the tokens of the stop string are not in the reply: nor are their logprobs
                logprobs = logprobs[: row.stream.kept_tokens(len(kept))]
        # completion_tokens counts every token made, the stop string's too: they were computed
        result = ChatResult(text, row.prompt_tokens, len(row.tokens), row.finish or "stop",
                            logprobs=logprobs,  # type: ignore[arg-type]
                            cached_tokens=row.cached_tokens)
        _tell(row.done, result)


def _tell(done: Done, outcome: ChatResult | BaseException) -> None:
    try:
        done(outcome)
    except Exception:  # the caller's future is gone: nothing to tell
        pass


def prepared_step_mask_fits(model: Any) -> bool:
    """A ready 4D mask is what transformers' SDPA path builds for a one-token step only when every layer
    attends to the whole cache: sliding-window or chunked layers need masks of their own."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    if text is None or getattr(text, "_attn_implementation", None) != "sdpa":
        return False
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(text, "sliding_window", None) is None and getattr(text, "attention_chunk_size", None) is None


def drop_leaked_adapter_hooks(model: Any) -> None:
    """Remove the `adapter_names` hooks that a PEFT forward which raised left on its layers.

    PEFT (0.21; huggingface/peft#3475) removes them only when the forward returns, so after an error
    (out of memory, a bad input) every later call of the shared base would still run with that batch's
    adapter names: a ValueError on another batch size, the wrong adapters on the same one."""
    import functools

    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, functools.partial) and "adapter_names" in (hook.keywords or {}):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


def row_length(spec: ModelSpec, params: ChatParams) -> int:
    """Prompt + max_tokens: the most cache a request's row can take."""
    assert params.inputs is not None
    return params.prompt_length + (params.max_new_tokens or spec.max_new_tokens)


def mixes(model: Any, adapter: str) -> bool:
    """Whether rows of `adapter` can share a forward with other adapters' rows (PEFT's `adapter_names`):
    LoRA without DoRA only; PEFT refuses the others ('Cannot pass `adapter_names` when DoRA is enabled')."""
    config = getattr(model, "peft_config", {}).get(adapter)
    lora = config is not None and getattr(config, "peft_type", None) == "LORA"
    return lora and not getattr(config, "use_dora", False)


def rope_window(config: Any) -> int | None:
    """The original context of a model whose rotary factors switch on the longest position in a forward
    (transformers' longrope and dynamic RoPE), else None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if not (isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("longrope", "dynamic")):
        return None
    return int(rope.get("original_max_position_embeddings") or getattr(text, "original_max_position_embeddings", None)
               or getattr(text, "max_position_embeddings", 0)) or None


def _switches_rope(loaded: LoadedModel, rows: list[Row]) -> bool:
    """Whether this prefill's longest prompt passes the original window of a model whose rotary factors
    follow the longest position in a forward (longrope, dynamic RoPE). Its keys were rotated with factors
    of that length, so they are neither stored nor built on: a prefix cache shared with forwards within the
    window would give a short request another answer than it gets alone."""
    window = rope_window(loaded.config)
    return window is not None and max(row.params.prompt_length for row in rows) > window


def new_row(spec: ModelSpec, loaded: LoadedModel, params: ChatParams, done: Done) -> Row:
    end_ids = end_token_ids(loaded)
    limit = params.max_new_tokens or spec.max_new_tokens
    stream = RowStream(loaded.tokenizer, params.sink, params.stop, limit, end_ids, params.logprob_sink)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(params.seed % 2**63)
    row = Row(spec, params, done, loaded.adapter_name, sampling_settings(loaded, params), end_ids, stream, generator)
    if RowLogits.needed(params):
        row.hooks = RowLogits(params, params.grammar)
    return row


def _advance_constrained(row: Row, token: int, now: float) -> str | None:
    """A row with a grammar: the token is kept only if the reply can still be closed within max_tokens
    after it; otherwise, and when max_tokens or generation_timeout_s is reached, the row ends with the
    grammar's closing (structured.py), so its output always parses."""
    grammar = row.grammar
    try:
        forced = grammar.advance(token, row.limit - len(row.tokens) - 1)
    except Exception as exc:
        row.error = exc
        return "error"
    if forced is not None:  # the token would leave no closing within max_tokens: end with the closing
        for closing in forced:
            row.take(closing, sampled=False)
        # nothing to close (complete tool calls, the model starting one more that cannot fit): nothing cut
        return "length" if forced else "stop"
    row.take(token)
    if grammar.stopped:
        return "stop"  # nothing but the end token could follow
    if len(row.tokens) >= row.limit or now - row.started > row.spec.generation_timeout_s:
        for closing in grammar.close():
            row.take(closing, sampled=False)
        return "length"
    return None


def sample_token(logits: torch.Tensor, sampling: dict[str, Any], generator: torch.Generator | None) -> int:
    temperature = sampling["temperature"]
    if temperature <= 0:
        return int(logits.argmax())
    scores = logits / temperature
    if sampling["top_k"] > 0:
        kth = torch.topk(scores, min(sampling["top_k"], scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling["top_p"] < 1.0:
        ordered, index = torch.sort(scores, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) > sampling["top_p"]  # keep the first past top_p
        scores = scores.scatter(0, index, ordered.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def text_prompt(params: ChatParams) -> list[int] | None:
    """A prompt's tokens when it is tokens alone (the prefix cache's key); None with images and the like."""
    inputs = params.inputs or {}
    if set(inputs) <= {"input_ids", "attention_mask"} and "input_ids" in inputs and inputs["input_ids"].shape[0] == 1:
        return inputs["input_ids"][0].tolist()
    return None


def prefix_batch(hits: list[tuple[Prefix, int] | None], lengths: list[int]) -> tuple[list, torch.Tensor]:
    """The stored blocks of a prefill batch's rows as one cache: each row's keys and values left-padded
    to the longest run reused (a row without a hit: all padding), and the mask [rows, longest]."""
    longest = max(lengths)
    first = next(hit for hit in hits if hit is not None)[0]
    mask = torch.zeros((len(hits), longest), dtype=torch.long)
    layers = []
    for layer, (keys, values) in enumerate(first.layers):
        shape = (len(hits), keys.shape[1], longest, keys.shape[3])
        batch_keys, batch_values = keys.new_zeros(shape), values.new_zeros(shape)
        for row, (hit, n) in enumerate(zip(hits, lengths, strict=True)):
            if hit is not None:
                batch_keys[row, :, longest - n:] = hit[0].layers[layer][0][0, :, :n]
                batch_values[row, :, longest - n:] = hit[0].layers[layer][1][0, :, :n]
                mask[row, longest - n:] = 1
        layers.append((batch_keys, batch_values))
    return layers, mask


def _store_prefixes(store: PrefixCache, rows: list[Row], hits: list[tuple[Prefix, int] | None], cache: DynamicCache,
                    mask: torch.Tensor) -> None:
    """Keep the leading blocks of the prompts just prefilled, unless their hit covered them all."""
    token_bytes = sum(layer.keys[0, :, 0].nbytes + layer.values[0, :, 0].nbytes for layer in cache.layers)
    for i, (row, hit) in enumerate(zip(rows, hits, strict=True)):
        if row.prompt_ids is None or (hit is not None and hit[1] >= store.usable_blocks(row.prompt_ids) * store.block):
            continue
        columns = mask[i].nonzero().squeeze(-1).to(cache.layers[0].keys.device)  # the row's real tokens

        def kv_of(length: int, i: int = i, columns: torch.Tensor = columns) -> list:
            taken = columns[:length]
            return [(layer.keys[i:i + 1].index_select(2, taken), layer.values[i:i + 1].index_select(2, taken))
                    for layer in cache.layers]

        store.add(row.adapter, row.prompt_ids, kv_of, token_bytes)


def _join(cache: DynamicCache | None, mask: torch.Tensor | None, tokens: torch.Tensor | None,
          new_cache: DynamicCache, new_mask: torch.Tensor, new_tokens: torch.Tensor):
    """The running batch plus newly prefilled rows: caches and masks left-padded to one length."""
    if cache is None or mask is None or tokens is None:
        return new_cache, new_mask, new_tokens
    length = max(mask.shape[1], new_mask.shape[1])
    for old, new in zip(cache.layers, new_cache.layers, strict=True):
        old.keys = torch.cat([_pad_left(old.keys, length), _pad_left(new.keys, length)], dim=0)
        old.values = torch.cat([_pad_left(old.values, length), _pad_left(new.values, length)], dim=0)
    mask = torch.cat([_pad_left(mask, length, dim=1), _pad_left(new_mask, length, dim=1)], dim=0)
    return cache, mask, torch.cat([tokens, new_tokens], dim=0)


def _pad_left(tensor: torch.Tensor, length: int, dim: int = -2) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _trim(group: Group) -> None:
    """Drop the leading columns that are padding for every remaining row."""
    assert group.mask is not None and group.cache is not None
    used = group.mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else 0
    if start > 0:
        group.mask = group.mask[:, start:]
        for layer in group.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, start:, :], layer.values[:, :, start:, :]


__all__ = ["DecodeLoop", "PADDED_KEYS"]
