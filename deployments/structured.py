"""Grammar-constrained decoding: JSON schemas and tool-call grammars enforced token by token.

Built on llguidance (Microsoft's grammar engine, also behind vLLM's `guidance` backend and
llama.cpp's): an Earley parser over a byte-level lexer that, per step and per row, computes the set of
tokens that keep the output inside the grammar (~20 µs for a 49k vocabulary). Why it and not
xgrammar or outlines-core (bench/STRUCTURED.md has the figures): it installs as one 3 MB wheel with
no dependencies (xgrammar pulls triton and a TVM runtime; outlines-core is also dependency-free but
compiles a schema into a token DFA up front: 1.5-3.7 s per schema for a 49k vocabulary here, against
1-60 ms), it keeps one small matcher per row (so constrained and free rows share every decode step),
and its matchers copy in ~1 µs, roll back, validate tokens without committing and report forced
bytes: what the budget guard below needs.

The budget guard. A random-weight (or merely verbose) model may never close its JSON before
max_tokens. Every constrained row therefore keeps a *closing*: a shortest-effort sequence of tokens
that completes the grammar from where the row is (found by a greedy depth-first search preferring
`"`, `}`, `]`, `0`, ...; forced bytes are taken whole). A sampled token is kept only if the row can
still close within its budget afterwards; otherwise the row ends with the closing of the state
before it. So a constrained reply always parses and validates; when the budget (or
generation_timeout_s) decided the end, finish_reason is `length`. A request whose schema cannot be
closed within max_tokens at all is a 400 before it starts.

Compiled grammars are cached per (tokenizer, grammar text): a cached one costs a ~1 µs copy per row.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch

from .errors import InvalidRequestError

log = logging.getLogger(__name__)

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: no room for a model to pad with spaces forever
MAX_CLOSING_NODES = 20000  # candidate tokens the closing search of a new request may try
MAX_STEP_NODES = 2000  # ... and a search during a decode step (when the previous closing no longer closes)
MAX_CLOSING_S = 0.25  # wall-time bound of a new request's closing search (a 400 past it)
MAX_STEP_S = 0.02  # ... and of a decode step's (past it the row ends with the closing it has)
LOOKAHEAD = 4  # candidates compared by their greedy completion where the grammar offers a choice
CACHE_SIZE = 256  # compiled grammars kept per replica
# The closing search tries these first: they end a string, an object, an array, or are the shortest value.
CLOSERS = ['"', "}", "]", ",", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "t", "f", "n", "[", "{", ":"]


@dataclass(frozen=True)
class Constraint:
    """What a request constrains its output to (picklable: it crosses from the ingress to a replica)."""

    kind: str  # "json_schema" | "lark"
    source: str  # the schema as JSON text, or a Lark grammar (llguidance dialect)
    param: str  # the request field it came from, for errors
    name: str = ""  # what to call it in messages ("response_format json_schema 'person'")

    def grammar(self) -> str:
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
        return llguidance.LLMatcher.grammar_from_lark(self.source)


def json_schema_constraint(schema: dict | bool, param: str, name: str = "") -> Constraint:
    if schema is True:
        schema = {}  # any JSON value
    return Constraint("json_schema", json.dumps(schema), param, name)  # key order kept: it is the output's


JSON_OBJECT = {"type": "object"}


# --- tokenizers ------------------------------------------------------------------------------------
class Vocabulary:
    """llguidance's view of one HF tokenizer, plus what the closing search needs: the token of each
    closer character and every token ordered by its byte length."""

    def __init__(self, hf_tokenizer: Any, n_vocab: int, end_ids: set[int]):
        import llguidance.hf

        started = time.perf_counter()
        self.n_vocab = n_vocab
        self.end_ids = sorted(end_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=n_vocab, eos_token=self.end_ids or None)
        lengths = np.full((n_vocab,), 1 << 20, dtype=np.int64)
        self.closer_ids: list[int] = []
        by_text: dict[bytes, int] = {}
        for token in range(min(n_vocab, self.tokenizer.vocab_size)):
            if token in end_ids or self.tokenizer.is_special_token(token):
                continue
            data = self.tokenizer.decode_bytes([token])
            if data:
                lengths[token] = len(data)
                by_text.setdefault(data, token)
        self.closer_ids = [by_text[c.encode()] for c in CLOSERS if c.encode() in by_text]
        self.fast_closers = {by_text[c] for c in (b'"', b"}", b"]") if c in by_text}
        self.by_length = np.argsort(lengths, kind="stable")[: int((lengths < 1 << 20).sum())]
        self.words = (n_vocab + 31) // 32
        self.build_s = time.perf_counter() - started

    def closes_fast(self, token: int) -> bool:
        return token in self.fast_closers

    def allowed(self, matcher: llguidance.LLMatcher) -> np.ndarray:
        """The tokens the matcher allows next, as a bool vector of n_vocab. (numpy: torch's small
        element-wise ops cost milliseconds on a busy machine, waking its thread pool.)"""
        words = np.empty((self.words,), dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        return np.unpackbits(words.view(np.uint8), bitorder="little")[: self.n_vocab].view(bool)


_VOCABS: dict[tuple[int, int], tuple[Any, Vocabulary]] = {}
_VOCAB_LOCK = threading.Lock()


def vocabulary(hf_tokenizer: Any, n_vocab: int, end_ids: set[int]) -> Vocabulary:
    """One Vocabulary per tokenizer and logits width, built on first use (~0.1 s per 10k tokens)."""
    key = (id(hf_tokenizer), n_vocab)
    with _VOCAB_LOCK:
        entry = _VOCABS.get(key)
        if entry is None or entry[0] is not hf_tokenizer:
            entry = _VOCABS[key] = (hf_tokenizer, Vocabulary(hf_tokenizer, n_vocab, end_ids))
        return entry[1]


# --- compiling -------------------------------------------------------------------------------------
class GrammarCache:
    """Compiled matchers by (vocabulary, grammar text), least recently used dropped first."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self.entries: OrderedDict[tuple[int, str], llguidance.LLMatcher] = OrderedDict()
        self.closings: dict[tuple[int, str], list[int]] = {}  # a closing of the empty output, per entry
        self.failures: dict[tuple[int, str], int] = {}  # the largest budget no closing was found within
        self.lock = threading.Lock()
        self.stats = {"compiled": 0, "cache_hits": 0, "compile_ms_total": 0.0}

    def matcher(self, vocab: Vocabulary, constraint: Constraint, limits: Any = None
                ) -> tuple[llguidance.LLMatcher, tuple[int, str]]:
        """A fresh matcher for the constraint (a copy of the cached one) and its cache key."""
        grammar = constraint.grammar()
        key = (id(vocab), grammar)
        with self.lock:
            template = self.entries.get(key)
            if template is not None:
                self.entries.move_to_end(key)
                self.stats["cache_hits"] += 1
                return template.deep_copy(), key
        started = time.perf_counter()
        template = llguidance.LLMatcher(vocab.tokenizer, grammar, log_level=0, limits=limits)
        if template.is_error():
            raise grammar_error(constraint, template.get_error())
        # the first mask builds the lexer: part of compiling, not of the first request's first step
        vocab.allowed(template)
        if template.is_error():
            raise grammar_error(constraint, template.get_error())
        elapsed = (time.perf_counter() - started) * 1e3
        with self.lock:
            self.stats["compiled"] += 1
            self.stats["compile_ms_total"] += elapsed
            self.entries[key] = template
            while len(self.entries) > self.size:
                dropped = self.entries.popitem(last=False)[0]
                self.closings.pop(dropped, None)
                self.failures.pop(dropped, None)
        return template.deep_copy(), key


CACHE = GrammarCache()


def check_grammar(constraint: Constraint) -> None:
    """Whether llguidance can enforce it (no tokenizer needed: the ingress checks before any replica
    works); a 400 naming the part of the schema at fault."""
    try:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(constraint.grammar(), None)
    except (ValueError, TypeError) as exc:
        raise grammar_error(constraint, str(exc)) from None
    if failed:
        raise grammar_error(constraint, messages[0] if messages else "invalid grammar")


def grammar_error(constraint: Constraint, message: str) -> InvalidRequestError:
    where = locate(constraint, message)
    param = constraint.param + (f".{where}" if where else "")
    what = constraint.name or constraint.param
    first = message.strip().splitlines()
    reason = " ".join(line.strip() for line in first[:4])
    return InvalidRequestError(f"{what} cannot be enforced: {reason}" + (f" (at {where})" if where else ""),
                               param=param, code="invalid_schema")


def locate(constraint: Constraint, message: str) -> str:
    """The path inside a JSON schema that an llguidance error is about, when it can be found: the
    node using an unimplemented keyword, a bad `type`, an unparsable `pattern`, a missing `$ref`."""
    if constraint.kind != "json_schema":
        return ""
    try:
        schema = json.loads(constraint.source)
    except ValueError:
        return ""
    needles: list[tuple[str, Any]] = []
    if "Unimplemented keys: " in message:
        try:
            keys = json.loads(message.split("Unimplemented keys: ", 1)[1].splitlines()[0])
            needles += [(key, None) for key in keys]
        except ValueError:
            pass
    if "Invalid type: " in message:
        needles.append(("type", message.split("Invalid type: ", 1)[1].split()[0].strip("'\"")))
    if "regex parse error" in message:
        lines = message.splitlines()
        if len(lines) > 1:
            needles.append(("pattern", lines[1].strip()))
    if "Pointer '" in message:
        needles.append(("$ref", "#" + message.split("Pointer '", 1)[1].split("'", 1)[0]))
    for key, value in needles:
        path = _find(schema, key, value, [])
        if path is not None:
            return ".".join(path)
    return ""


def _find(node: Any, key: str, value: Any, path: list[str]) -> list[str] | None:
    if isinstance(node, dict):
        if key in node and (value is None or node[key] == value or (isinstance(value, str) and node[key] == value)):
            return path + [key]
        items = node.items()
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return None
    for name, child in items:
        if name in ("enum", "const", "default", "examples"):
            continue
        found = _find(child, key, value, path + [str(name)])
        if found is not None:
            return found
    return None


# --- one row ---------------------------------------------------------------------------------------
class RowGrammar:
    """One request's matcher: masks its logits, follows its tokens and keeps its closing."""

    def __init__(self, vocab: Vocabulary, matcher: llguidance.LLMatcher, constraint: Constraint):
        self.vocab, self.matcher, self.constraint = vocab, matcher, constraint
        self.closing: list[int] = []
        self.forced_closes = 0

    def start(self, budget: int, key: Any = None) -> None:
        """Find a closing of the empty output that fits in `budget` (cached with the grammar); a 400 if
        there is none, or none was found within MAX_CLOSING_NODES / MAX_CLOSING_S."""
        cached = CACHE.closings.get(key) if key is not None else None
        what = self.constraint.name or self.constraint.param
        if cached is not None and len(cached) > budget:
            cached = None  # found under a larger budget, perhaps not the shortest: search within this one
        if cached is None and key is not None and CACHE.failures.get(key, -1) >= budget:
            closing = None  # searched before, with at least this budget
        else:
            closing = cached if cached is not None else self.find_closing(budget, MAX_CLOSING_NODES, MAX_CLOSING_S)
        if closing is None:
            if key is not None:
                CACHE.failures[key] = max(budget, CACHE.failures.get(key, -1))
            raise InvalidRequestError(
                f"no complete output for {what} was found within max_tokens={budget} (searched at most "
                f"{MAX_CLOSING_NODES} steps / {MAX_CLOSING_S:g} s): raise max_tokens, or simplify the schema "
                "(fewer optional properties, smaller minLength / minItems / repetitions)", param="max_tokens",
                code="invalid_schema")
        if key is not None and len(closing) <= len(CACHE.closings.get(key) or closing):
            CACHE.closings[key] = closing
        self.closing = closing

    @property
    def stopped(self) -> bool:
        return self.matcher.is_stopped()

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        allowed = self.vocab.allowed(self.matcher)
        width = scores.shape[-1]
        if width > allowed.shape[0]:  # logits wider than the tokenizer: padding ids, never allowed
            allowed = np.concatenate([allowed, np.zeros(width - allowed.shape[0], dtype=bool)])
        if scores.device.type == "cpu":  # in numpy: see Vocabulary.allowed
            values = scores.numpy().copy()
            values[~allowed[:width]] = -np.inf
            return torch.from_numpy(values)
        return scores.masked_fill(torch.from_numpy(~allowed[:width]).to(scores.device), float("-inf"))

    def advance(self, token: int, room: int) -> list[int] | None:
        """Take `token` if the row can still close in `room` tokens after it and return None; else leave
        the matcher as it was and return the closing to end with instead."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar refused token {token}: {self.matcher.get_error()}")
        old = self.closing
        if old and old[0] == token:
            self.closing = old[1:]  # the rest of the closing still closes
            return None
        if old and len(old) <= room and self._closes(self.matcher, old):
            return None  # e.g. one more character inside a string: the same closing still closes
        closing = self._greedy(self.matcher, room, [0, time.monotonic() + MAX_STEP_S])  # cheap; enough mostly
        if closing is None:
            closing = self.find_closing(room, MAX_STEP_NODES, MAX_STEP_S)
        if closing is None:
            self.matcher.rollback(1)
            self.forced_closes += 1
            return self.close()
        self.closing = closing
        return None

    def close(self) -> list[int]:
        """The tokens that complete the output from here (the matcher follows them)."""
        closing, self.closing = self.closing, []
        if closing:
            self.matcher.consume_tokens(closing)
        return closing

    @staticmethod
    def _closes(matcher: llguidance.LLMatcher, tokens: list[int]) -> bool:
        trial = matcher.deep_copy()
        return trial.consume_tokens(tokens) and trial.is_accepting()

    def find_closing(self, budget: int, max_nodes: int = MAX_CLOSING_NODES, max_s: float = MAX_CLOSING_S
                     ) -> list[int] | None:
        """A short token sequence that completes the grammar from the current state within `budget`
        tokens, or None. Depth-first; at each node the closers first (a string closes at once), and
        where the grammar offers a real choice (an object key, an enum value) the candidates ordered by
        the length of a greedy completion after each; forced bytes taken whole; bounded in nodes and time."""
        if self.matcher.is_accepting():
            return []
        counter: list[float] = [0, time.monotonic() + max_s]
        stack: list[tuple[llguidance.LLMatcher, list[int], Any]] = []
        state: tuple[llguidance.LLMatcher, list[int]] | None = (self.matcher.deep_copy(), [])
        while True:
            if state is not None:
                matcher, path = state
                state = None
                forced = matcher.compute_ff_tokens()
                if forced:
                    if len(path) + len(forced) > budget or not matcher.consume_tokens(forced):
                        continue
                    path = path + forced
                if matcher.is_accepting():
                    return path
                if len(path) >= budget:
                    continue
                stack.append((matcher, path, iter(self._ordered(matcher, budget - len(path), counter, max_nodes))))
            if not stack or _spent(counter, max_nodes):
                return None
            matcher, path, candidates = stack[-1]
            for branch, token in candidates:
                state = (branch, path + [token])
                break
            else:
                stack.pop()

    def _ordered(self, matcher: llguidance.LLMatcher, budget: int, counter: list[float], max_nodes: int) -> Any:
        """(matcher after token, token) for the candidate tokens, best first."""
        valid = []
        for token in self._candidates(matcher):
            counter[0] += 1
            branch = matcher.deep_copy()
            if branch.consume_token(token):
                valid.append((branch, token))
            if len(valid) >= LOOKAHEAD or _spent(counter, max_nodes):
                break
        # `"`, `}` or `]` first: usually nothing is shorter. The others stay as fallbacks (the `"` may
        # open a string a minLength makes long, where an integer or null branch closes at once).
        fast = [item for item in valid if self.vocab.closes_fast(item[1])]
        rest = [item for item in valid if not self.vocab.closes_fast(item[1])]
        if len(rest) > 1:
            lengths, best = {}, budget
            for branch, token in rest:
                rollout = self._greedy(branch, best, counter)  # stops once longer than the best so far
                lengths[token] = len(rollout) if rollout is not None else 1 << 30
                best = min(best, lengths[token])
            rest.sort(key=lambda item: lengths[item[1]])
        return fast + rest

    def _greedy(self, matcher: llguidance.LLMatcher, budget: int, counter: list[float]) -> list[int] | None:
        """A completion taking the first valid candidate at every step (no backtracking)."""
        trial, path = matcher.deep_copy(), []
        while not trial.is_accepting():
            forced = trial.compute_ff_tokens()
            if forced:
                if not trial.consume_tokens(forced):
                    return None
                path += forced
            else:
                token = next(self._candidates(trial, check=True), None)
                counter[0] += 1
                if counter[0] % 64 == 0 and time.monotonic() > counter[1]:
                    return None
                if token is None or not trial.consume_token(token):
                    return None
                path.append(token)
            if len(path) > budget:
                return None
        return path

    def _candidates(self, matcher: llguidance.LLMatcher, check: bool = False) -> Any:
        """Closer tokens the matcher takes (checked one by one, cheaply), then the shortest others."""
        tried = []
        for token in self.vocab.closer_ids:
            if matcher.validate_tokens([token]) == 1:
                tried.append(token)
                yield token
        allowed = self.vocab.allowed(matcher)
        for token in self.vocab.by_length[allowed[self.vocab.by_length]][:8].tolist():
            if token not in tried:
                yield token


def _spent(counter: list[float], max_nodes: int) -> bool:
    """A search's [nodes, deadline] past either bound."""
    return counter[0] > max_nodes or time.monotonic() > counter[1]


def compile_row(constraint: Constraint, hf_tokenizer: Any, n_vocab: int, end_ids: set[int], budget: int,
                limits: Any = None) -> RowGrammar:
    """A request's grammar ready for its row: compiled (or copied from the cache) and checked to close
    within `budget` tokens. Errors are 400s naming the request field."""
    vocab = vocabulary(hf_tokenizer, n_vocab, end_ids)
    matcher, key = CACHE.matcher(vocab, constraint, limits)
    row = RowGrammar(vocab, matcher, constraint)
    row.start(budget, key)
    return row
