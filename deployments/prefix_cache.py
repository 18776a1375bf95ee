"""Prompt prefixes already prefilled: a request that starts with one prefills only the rest.

Chat prompts share their beginnings: the chat template's system turn, an application's system
prompt, and in a conversation every earlier turn (a voice agent resends the whole history each
turn). The decode loop keeps, per model, the KV cache of recent prompts' leading blocks of
`BLOCK_TOKENS` tokens; a new prompt that starts with stored blocks copies their keys and values
into its cache and runs the forward over the tokens after them only.

Blocks are found by chained hashes (each block's hash covers every token before it, as vLLM's
automatic prefix caching does), so one stored prompt also serves any prompt sharing only its first
blocks; a hit is confirmed token by token, so a hash collision costs a miss, never a wrong answer.
Keys are per adapter: a LoRA on the attention projections changes the keys and values. Entries are
evicted least recently used first, to a byte bound per model (`prefix_cache_mb`).

The reused keys and values are the ones the same tokens produced in another batch: equal up to
floating-point rounding of a different batch shape, as any batched serving is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 8  # the granularity of a match: small, since a block costs a dict lookup, not a page

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values [1, kv heads, tokens, head dim]


@dataclass(eq=False)
class Prefix:
    scope: object  # the adapter (None: the base model)
    tokens: tuple[int, ...]
    layers: KV
    hashes: list[int]
    nbytes: int


class PrefixCache:
    """One model's stored prefixes, least recently used first."""

    def __init__(self, max_bytes: int, block: int = BLOCK_TOKENS):
        self.max_bytes = max_bytes
        self.block = block
        self.entries: OrderedDict[int, Prefix] = OrderedDict()
        self.index: dict[int, Prefix] = {}  # chain hash of a prompt's first k blocks -> an entry holding them
        self.bytes = 0

    def usable_blocks(self, tokens: Sequence[int]) -> int:
        """Whole blocks that may come from the cache: at least the prompt's last token is computed,
        since its logits choose the first generated token."""
        return (len(tokens) - 1) // self.block if self.max_bytes > 0 else 0

    def _hashes(self, scope: object, tokens: Sequence[int], blocks: int) -> list[int]:
        chained, out = hash(("prefix", scope)), []
        for i in range(blocks):
            chained = hash((chained, tuple(tokens[i * self.block:(i + 1) * self.block])))
            out.append(chained)
        return out

    def match(self, scope: object, tokens: Sequence[int]) -> tuple[Prefix, int] | None:
        """The stored entry holding the longest run of `tokens`' leading blocks, and that run's length."""
        blocks = self.usable_blocks(tokens)
        if not blocks or not self.index:
            return None
        hashes = self._hashes(scope, tokens, blocks)
        for k in range(blocks, 0, -1):
            entry = self._confirmed(hashes[k - 1], scope, tokens, k * self.block)
            if entry is not None:
                return entry, k * self.block
        return None

    def _confirmed(self, chained: int, scope: object, tokens: Sequence[int], length: int) -> Prefix | None:
        """The entry indexed under `chained` if it really holds `tokens[:length]` (now most recently used)."""
        entry = self.index.get(chained)
        if entry is None or entry.scope != scope or entry.tokens[:length] != tuple(tokens[:length]):
            return None
        self.entries.move_to_end(id(entry))
        return entry

    def add(self, scope: object, tokens: Sequence[int], kv_of: Callable[[int], KV], token_bytes: int) -> None:
        """Store the usable blocks of `tokens`; `kv_of(n)` gives the keys and values of their first n
        tokens (copies: an entry must not keep a whole batch's cache alive), `token_bytes` what one
        token of them takes: of a prompt too long for the bound, the leading blocks that fit are stored
        (checked before anything is copied)."""
        blocks = min(self.usable_blocks(tokens), self.max_bytes // max(1, token_bytes * self.block))
        if not blocks:
            return
        length = blocks * self.block
        hashes = self._hashes(scope, tokens, blocks)
        if self._confirmed(hashes[-1], scope, tokens, length) is not None:
            return
        layers = kv_of(length)
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        if nbytes > self.max_bytes:
            return
        while self.entries and self.bytes + nbytes > self.max_bytes:
            self._evict(next(iter(self.entries.values())))
        entry = Prefix(scope, tuple(tokens[:length]), layers, hashes, nbytes)
        for chained in entry.hashes:
            self.index[chained] = entry  # the newest entry answers for the blocks it shares with older ones
        self.entries[id(entry)] = entry
        self.bytes += nbytes

    def turn_off(self) -> None:
        """Store nothing more and free what is stored."""
        self.max_bytes, self.bytes = 0, 0
        self.entries.clear()
        self.index.clear()

    def _evict(self, entry: Prefix) -> None:
        del self.entries[id(entry)]
        self.bytes -= entry.nbytes
        for chained in entry.hashes:
            if self.index.get(chained) is entry:
                del self.index[chained]


__all__ = ["BLOCK_TOKENS", "Prefix", "PrefixCache"]
