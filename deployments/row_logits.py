"""Per-row logits processing in the decode loop: logit_bias, presence/frequency penalties, the grammar
mask, and the logprobs of what was sampled. Each row carries its own; rows without any share the
plain path (no copy of their logits).

Logprobs are the model's own: log-softmax of its raw logits (before temperature, penalties, bias or
the grammar mask), as OpenAI reports them; `top_logprobs` are the most likely tokens under the same
distribution, so a constrained row may list tokens its grammar did not allow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from .params import ChatParams

T = TypeVar("T")

Entry = tuple[int, float, list[tuple[int, float]]]  # token, its logprob, the top alternatives


class RowLogits:
    def __init__(self, params: ChatParams, grammar: Any = None):
        self.grammar = grammar
        self.presence = float(params.presence_penalty or 0.0)
        self.frequency = float(params.frequency_penalty or 0.0)
        bias = params.logit_bias or {}
        self.bias_ids = torch.tensor(list(bias), dtype=torch.long) if bias else None
        self.bias_values = torch.tensor(list(bias.values()), dtype=torch.float32) if bias else None
        self.top = params.top_logprobs if params.logprobs else None
        self.counts: dict[int, int] = {}

    @staticmethod
    def needed(params: ChatParams) -> bool:
        return bool(params.grammar is not None or params.logprobs or params.presence_penalty
                    or params.frequency_penalty or params.logit_bias)

    def process(self, raw: torch.Tensor) -> torch.Tensor:
        """The scores to sample from."""
        scores = raw
        if self.bias_ids is not None:
            scores = scores.clone()
            ids = self.bias_ids.to(scores.device)
            scores[ids] += self.bias_values.to(scores.device)  # type: ignore[union-attr]
        if self.counts and (self.presence or self.frequency):
            scores = scores.clone() if scores is raw else scores
            ids = torch.tensor(list(self.counts), dtype=torch.long, device=scores.device)
            counts = torch.tensor(list(self.counts.values()), dtype=torch.float32, device=scores.device)
            scores[ids] -= self.presence + self.frequency * counts
        if self.grammar is not None:
            scores = self.grammar.mask(scores)
        return scores

    def entry(self, raw: torch.Tensor, token: int) -> Entry | None:
        """The sampled token's logprob (and the top alternatives), with `logprobs`."""
        if self.top is None:
            return None
        logprobs = torch.log_softmax(raw.float(), dim=-1).cpu().numpy()
        top: list[tuple[int, float]] = []
        if self.top:
            best = np.argpartition(-logprobs, self.top)[: self.top]
            best = best[np.argsort(-logprobs[best], kind="stable")]
            top = [(int(t), float(logprobs[t])) for t in best]
        return token, float(logprobs[token]), top

    def taken(self, token: int) -> None:
        """A token became part of the output (penalties count it)."""
        self.counts[token] = self.counts.get(token, 0) + 1


# --- logprob entries as OpenAI's JSON --------------------------------------------------------------
_BYTE_DECODER: dict[str, int] | None = None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character each byte is written as -> the byte."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
            list(range(ord("®"), ord("ÿ") + 1))
        codes, extra = list(printable), 0
        for byte in range(256):
            if byte not in printable:
                printable.append(byte)
                codes.append(256 + extra)
                extra += 1
        _BYTE_DECODER = {chr(code): byte for byte, code in zip(printable, codes, strict=True)}
    return _BYTE_DECODER


def token_bytes(tokenizer: Any, token: int, first: bool = False) -> bytes:
    """A token's own bytes (a byte-level token may hold part of a UTF-8 character). `first`: the reply's
    first token, whose word-initial space a SentencePiece decoder drops from the reply's text."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str):
        decoder = _byte_decoder()
        if piece and all(ch in decoder for ch in piece) and _is_byte_level(tokenizer):
            return bytes(decoder[ch] for ch in piece)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        if piece.startswith(METASPACE) and token not in special_ids(tokenizer):
            # Llama-2, Mistral, Phi-3: "▁world" is " world" mid-reply; decode([token]) alone dropped the space,
            # and the entries' bytes no longer joined to the reply's text
            text = piece.replace(METASPACE, " ")
            if first and not tokenizer.decode([token]).startswith(" "):
                text = text[1:]  # a decoder that strips the text's leading space (Llama-2's) strips it here
            return text.encode("utf-8")
    return tokenizer.decode([token]).encode("utf-8", errors="replace")


METASPACE = "\u2581"  # SentencePiece's word boundary, "▁"


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The tokenizer's special ids (asked for every logprob entry)."""
    return kept_on(tokenizer, "_modelfleet_special_ids",
                    lambda: frozenset(getattr(tokenizer, "all_special_ids", ()) or ()))


def kept_on(tokenizer: Any, name: str, compute: Callable[[], T]) -> T:
    """`compute()`, worked out once per tokenizer and kept on it as `name` (where it takes attributes): it goes
    with its tokenizer, and a tokenizer loaded after another's unload does not find the other's figure."""
    cached = getattr(tokenizer, name, None)
    if cached is None:
        cached = compute()
        with contextlib.suppress(AttributeError):
            setattr(tokenizer, name, cached)
    return cached


def _is_byte_level(tokenizer: Any) -> bool:
    def byte_level() -> bool:
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        return decoder is not None and type(decoder).__name__ == "ByteLevel"

    return kept_on(tokenizer, "_modelfleet_byte_level", byte_level)


def as_openai(tokenizer: Any, entries: list[Entry], start: int = 0) -> list[dict]:
    """[{"token", "logprob", "bytes", "top_logprobs": [...]}] for the chat API; `start`: the reply's position
    of the first entry (a stream's later chunks)."""
    def one(token: int, logprob: float, first: bool) -> dict:
        data = token_bytes(tokenizer, token, first)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": max(logprob, -9999.0),
                "bytes": list(data)}  # -9999 for "impossible", as OpenAI writes it (JSON has no -inf)

    return [{**one(token, logprob, start + i == 0), "top_logprobs": [one(t, lp, start + i == 0) for t, lp in top]}
            for i, (token, logprob, top) in enumerate(entries)]
