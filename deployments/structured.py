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
that completes the grammar from where the row is (found by a depth-first search whose moves are
followed by greedy completions preferring `"`, `}`, `]`, `0`, ..., and which spells a sample of each
`pattern` / `format` inside strings; forced bytes are taken whole). A sampled token is kept only if
the row can still close within its budget afterwards; otherwise the row ends with the closing of the
state before it. So a constrained reply always parses and validates; when the budget (or
generation_timeout_s) decided the end, finish_reason is `length`. A request is a 400 before it starts
only when an exhaustive search proves no output fits max_tokens; a search cut by its bounds proves
nothing, and such a row is served unguarded (max_tokens may cut it, as any reply).

Compiled grammars are cached per (tokenizer, grammar text): a cached one costs a ~1 µs copy per row.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from typing import Any

import llguidance
import numpy as np
import torch

from .errors import InvalidRequestError

log = logging.getLogger(__name__)

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: no room for a model to pad with spaces forever
MAX_CLOSING_NODES = 10000  # candidate tokens the closing search of a new request may try
MAX_PROOF_NODES = 4000  # ... and the exhaustive search that may prove no closing fits (the only 400)
MAX_STEP_NODES = 2000  # ... and a search during a decode step (when the previous closing no longer closes)
# The searches' time bounds are CPU seconds of the searching thread (search_clock), not wall time: on a loaded
# machine (other processes, or the event loop holding the GIL) a wall bound cut a search after a third of its
# work, and a request an idle server guards was served unguarded (a tool call cut into raw text by max_tokens).
MAX_CLOSING_S = 0.25  # backstop of a new request's search (past it: served without a guard, never cached)
MAX_STEP_S = 0.02  # ... and of a decode step's (past it the row ends with the closing it has)
search_clock = time.thread_time
MAX_HINT = 8192  # bytes of a pattern's sample the search spells whole
# ... and of the longest run of spaces it spells for a minLength. Runs of thousands, validated at every node (and
# hints longer in tokens than the budget, which never fit), made a search that cannot close (minLength 3000 in
# max_tokens 32) end at its time bound, so on every request, instead of at its node bound once (remembered)
MAX_RUN = 256
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
        self.serial = next(_VOCAB_SERIALS)  # the grammar cache's key: unlike id(), never that of a later one
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
        self.closer_set = set(self.closer_ids)
        self.texts = sorted(by_text)  # every token's bytes: the fewest tokens that can spell some bytes
        self.text_set = set(by_text)
        self.longest = max(map(len, self.texts), default=1)
        self.fast_closers = {by_text[c] for c in (b'"', b"}", b"]") if c in by_text}
        self.by_length = np.argsort(lengths, kind="stable")[: int((lengths < 1 << 20).sum())]
        self.lengths = lengths  # bytes per token
        self.words = (n_vocab + 31) // 32
        self.build_s = time.perf_counter() - started

    def min_tokens(self, data: bytes) -> int:
        """The fewest tokens whose bytes begin with `data` (the last may run past it): a lower bound on
        any closing that must write `data` first."""
        n, none = len(data), 1 << 30
        fewest = [0] + [none] * n  # tokens that spell data[:i] exactly
        best = none
        for i in range(n):
            if fewest[i] + 1 >= best:
                continue
            for j in range(i + 1, min(n, i + self.longest) + 1):
                piece = data[i:j]
                if j < n and piece in self.text_set:
                    fewest[j] = min(fewest[j], fewest[i] + 1)
                elif j == n:  # a token that starts with the rest
                    at = bisect.bisect_left(self.texts, piece)
                    if at < len(self.texts) and self.texts[at].startswith(piece):
                        best = min(best, fewest[i] + 1)
        return min(best, fewest[n])

    def closes_fast(self, token: int) -> bool:
        return token in self.fast_closers

    def allowed(self, matcher: llguidance.LLMatcher) -> np.ndarray:
        """The tokens the matcher allows next, as a bool vector of n_vocab. (numpy: torch's small
        element-wise ops cost milliseconds on a busy machine, waking its thread pool.)"""
        words = np.empty((self.words,), dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        return np.unpackbits(words.view(np.uint8), bitorder="little")[: self.n_vocab].view(bool)


# Per tokenizer object, weakly: a model unloaded at run time takes its tokenizer's vocabularies with it (they
# were kept, with the tokenizer, for the replica's life: tens of MB per load/unload of a large vocabulary).
_VOCABS: weakref.WeakKeyDictionary[Any, dict[int, Vocabulary]] = weakref.WeakKeyDictionary()
_VOCAB_LOCK = threading.Lock()
_VOCAB_SERIALS = count()


def vocabulary(hf_tokenizer: Any, n_vocab: int, end_ids: set[int]) -> Vocabulary:
    """One Vocabulary per tokenizer and logits width, built on first use (~0.1 s per 10k tokens)."""
    with _VOCAB_LOCK:
        widths = _VOCABS.setdefault(hf_tokenizer, {})
        vocab = widths.get(n_vocab)
        if vocab is None:
            vocab = widths[n_vocab] = Vocabulary(hf_tokenizer, n_vocab, end_ids)
        return vocab


# --- compiling -------------------------------------------------------------------------------------
class GrammarCache:
    """Compiled matchers by (vocabulary, grammar text), least recently used dropped first."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        # keyed by (Vocabulary.serial, grammar): a vocabulary gone with its model leaves its entries to age out
        self.entries: OrderedDict[tuple[int, str], llguidance.LLMatcher] = OrderedDict()
        self.closings: dict[tuple[int, str], list[int]] = {}  # a closing of the empty output, per entry
        self.failures: dict[tuple[int, str], int] = {}  # the largest budget no closing was proven to fit
        self.capped: dict[tuple[int, str], set[int]] = {}  # budgets whose searches used their node bounds
        self.cut: dict[tuple[int, str], set[int]] = {}  # budgets whose searches the clock cut (twice: capped)
        self.lock = threading.Lock()
        self.stats = {"compiled": 0, "cache_hits": 0, "compile_ms_total": 0.0}

    def matcher(self, vocab: Vocabulary, constraint: Constraint, limits: Any = None
                ) -> tuple[llguidance.LLMatcher, tuple[int, str]]:
        """A fresh matcher for the constraint (a copy of the cached one) and its cache key."""
        grammar = constraint.grammar()
        key = (vocab.serial, grammar)
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
                self.capped.pop(dropped, None)
                self.cut.pop(dropped, None)
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
    if constraint.kind == "json_schema":
        refuse_repeatable_min_properties(constraint)


def refuse_repeatable_min_properties(constraint: Constraint) -> None:
    """A 400 for `minProperties` that only keys outside `properties` can reach. The grammar lets such keys
    repeat and counts them as written, while JSON keeps one of duplicate keys: the closing wrote `"":""` over
    and over ({"type": "object", "minProperties": 5} ended as '{"Hi":{},"":"","":"","":"","":""}', 2
    properties). Listed properties cannot repeat, and one open key more is distinct from them."""
    for node, path in _schema_objects(json.loads(constraint.source), []):
        least, listed = node.get("minProperties"), node.get("properties")
        listed = len(listed) if isinstance(listed, dict) else 0
        open_keys = node.get("additionalProperties", True) is not False or bool(node.get("patternProperties"))
        if isinstance(least, int) and not isinstance(least, bool) and open_keys and least > listed + 1:
            where = ".".join(path + ["minProperties"])
            raise InvalidRequestError(
                f"{constraint.name or constraint.param} cannot be enforced: minProperties={least} needs "
                f"{least - listed} keys outside 'properties', which the grammar cannot keep distinct (a repeated "
                f"key counts once in JSON; at {where}); list the properties you need in 'properties' and "
                f"'required', or send minProperties at most {listed + 1}",
                param=f"{constraint.param}.{where}", code="invalid_schema")


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
        for node, path in _schema_objects(schema, []):
            if key in node and (value is None or node[key] == value):
                return ".".join(path + [key])
    return ""


def _schema_objects(node: Any, path: list[str]) -> Iterator[tuple[dict, list[str]]]:
    """Every object in a schema with its path, in document order, less the values of `enum`, `const`,
    `default` and `examples` (data, not schema)."""
    if isinstance(node, dict):
        yield node, path
        items: Any = node.items()
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return
    for name, child in items:
        if name not in ("enum", "const", "default", "examples"):
            yield from _schema_objects(child, path + [str(name)])


# --- one row ---------------------------------------------------------------------------------------
# Strings a `format` accepts (llguidance's regexes): the closing search spells them, since no closer
# character ever satisfies an email or a uri.
FORMAT_SAMPLES = {"email": "a@a", "uri": "a:a", "hostname": "a", "ipv4": "0.0.0.0", "ipv6": "::",
                  "uuid": "00000000-0000-0000-0000-000000000000", "date": "2000-01-01", "time": "00:00:00Z",
                  "date-time": "2000-01-01T00:00:00Z", "duration": "P0D"}
_STRING_KEYS = re.compile(r'"(pattern|format)"\s*:\s*("(?:[^"\\]|\\.)*")')
_MIN_LENGTHS = re.compile(r'"minLength"\s*:\s*(\d+)')


@functools.lru_cache(maxsize=CACHE_SIZE)
def hints(source: str) -> tuple[bytes, ...]:
    """JSON string contents the search may spell inside a string: a shortest match of each `pattern`
    (JSON Schema patterns are unanchored, so it fits anywhere in the string) and a sample of each
    `format` in the constraint's text (a schema, or the schemas a Lark grammar embeds); then, for a
    `minLength`, runs of spaces, longest first: a large vocabulary spells 60 spaces in 3 tokens (SmolLM2),
    where the search's usual one character per token needs 60 (no closing within max_tokens 64 was found
    for a string of minLength 60, and the row was served unguarded)."""
    found: list[bytes] = []
    for match in _STRING_KEYS.finditer(source):
        try:
            value = json.loads(match.group(2))
        except ValueError:
            continue
        sample = FORMAT_SAMPLES.get(value) if match.group(1) == "format" else _shortest_match(value)
        if sample and len(sample) <= MAX_HINT:  # as it is written inside a JSON string (a long one: the
            # 1-byte candidates spell it as well, and validating it at every step costs)
            spelled = json.dumps(sample, ensure_ascii=False)[1:-1].encode()
            if spelled not in found:
                found.append(spelled)
    longest = min(max(map(int, _MIN_LENGTHS.findall(source)), default=0), MAX_RUN)
    run = 1 << (longest.bit_length() - 1) if longest > 1 else 0
    while run > 1:
        found.append(b" " * run)
        run //= 2
    return tuple(found)


def _shortest_match(pattern: str) -> str | None:
    """A short string the regex matches (Python's parser; JSON Schema's ECMA syntax mostly agrees), or
    None for what it cannot spell (back-references) or spells longer than MAX_HINT."""
    import re._parser as parser  # type: ignore[import-not-found]

    try:
        return _spell(parser.parse(pattern))
    except Exception:
        return None


def _spell(items: Any) -> str:
    """Raises past MAX_HINT characters, before building them: 'a{1000000000}' in a schema's `default`
    would otherwise be a gigabyte per request."""
    import re._constants as c  # type: ignore[import-not-found]

    out: list[str] = []
    size = 0
    for op, arg in items:
        if op is c.LITERAL:
            piece = chr(arg)
        elif op in (c.ANY, c.NOT_LITERAL, c.IN):
            members = [(c.NOT_LITERAL, arg)] if op is c.NOT_LITERAL else [] if op is c.ANY else arg
            piece = next(ch for ch in "a0A_-. b@:x1" if _in_class(members, ch))
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT)):
            once = _spell(arg[2]) if arg[0] else ""
            if len(once) * arg[0] > MAX_HINT:
                raise ValueError("longer than MAX_HINT")
            piece = once * arg[0]
        elif op in (c.SUBPATTERN, getattr(c, "ATOMIC_GROUP", c.SUBPATTERN)):
            piece = _spell(arg[-1])
        elif op is c.BRANCH:
            piece = min(_spellable(arg[1]), key=len)  # ValueError (empty) when no branch can be spelled
        elif op is c.AT:  # anchors spell nothing
            continue
        else:  # anything else (back-references): give up
            raise ValueError(op)
        size += len(piece)
        if size > MAX_HINT:
            raise ValueError("longer than MAX_HINT")
        out.append(piece)
    return "".join(out)


def _spellable(branches: Any) -> list[str]:
    spelled = []
    for branch in branches:
        try:
            spelled.append(_spell(branch))
        except ValueError:
            continue
    return spelled


def _in_class(members: Any, ch: str) -> bool:
    import re._constants as c  # type: ignore[import-not-found]

    negate, hit = False, False
    for op, arg in members:
        if op is c.NEGATE:
            negate = True
        elif op is c.LITERAL:
            hit |= ord(ch) == arg
        elif op is c.NOT_LITERAL:
            hit |= ord(ch) != arg
        elif op is c.RANGE:
            hit |= arg[0] <= ord(ch) <= arg[1]
        elif op is c.CATEGORY:
            hit |= re.match({c.CATEGORY_DIGIT: r"\d", c.CATEGORY_NOT_DIGIT: r"\D", c.CATEGORY_SPACE: r"\s",
                             c.CATEGORY_NOT_SPACE: r"\S", c.CATEGORY_WORD: r"\w"}.get(arg, r"\W"), ch) is not None
    return hit != negate


class RowGrammar:
    """One request's matcher: masks its logits, follows its tokens and keeps its closing."""

    def __init__(self, vocab: Vocabulary, matcher: llguidance.LLMatcher, constraint: Constraint):
        self.vocab, self.matcher, self.constraint = vocab, matcher, constraint
        self.closing: list[int] = []
        self.guarded = True  # False: the search was capped before finding a closing; the row runs without one
        self.forced_closes = 0
        self.timed_out = False  # whether the last find_closing stopped at its time bound
        self.hints = [vocab.tokenizer.tokenize_bytes(text) for text in hints(constraint.source)]

    def start(self, budget: int, key: Any = None) -> None:
        """Find a closing of the empty output that fits in `budget` (cached with the grammar). A 400 only
        if an exhaustive search proves there is none; a search cut by its bounds proves nothing, so the
        row is served without a closing (max_tokens then cuts it as any reply: finish_reason length)."""
        cached = CACHE.closings.get(key) if key is not None else None
        if cached is not None and len(cached) > budget:
            cached = None  # found under a larger budget, perhaps not the shortest: search within this one
        if cached is None and key is not None and CACHE.failures.get(key, -1) >= budget:
            raise self._no_closing(budget)  # proven before, with at least this budget
        capped = CACHE.capped.get(key, set()) if key is not None else set()
        self.hints = [hint for hint in self.hints if len(hint) <= budget]  # longer ones never fit: not tried
        closing = cached
        if closing is None and budget not in capped:
            closing = self.find_closing(budget, MAX_CLOSING_NODES, MAX_CLOSING_S)
            timed_out = self.timed_out
            if closing is None:
                closing, proven = self.prove(budget, MAX_PROOF_NODES, MAX_CLOSING_S)
                timed_out = timed_out or self.timed_out
                if closing is None and proven:
                    if key is not None:  # only a proof is remembered as a failure
                        CACHE.failures[key] = max(budget, CACHE.failures.get(key, -1))
                    raise self._no_closing(budget)
                if closing is None and key is not None and len(capped) < 64:
                    # node bounds are deterministic: the same search would end the same way. So, nearly, is the
                    # time bound, in the searching thread's CPU: a search the clock cut is tried once more (it
                    # may have run slow), and after a second cut not again (each cost up to 0.5 s, every request)
                    cut = CACHE.cut.setdefault(key, set())
                    if not timed_out or budget in cut:
                        CACHE.capped.setdefault(key, set()).add(budget)
                    cut.add(budget)
        if closing is not None and len(closing) > budget:  # never a closing the budget cannot hold
            closing = None
        if closing is None:
            log.info("no closing found for %s within max_tokens=%d (search capped): served unguarded",
                     self.constraint.name or self.constraint.param, budget)
            self.guarded = False
            return
        if key is not None and len(closing) <= len(CACHE.closings.get(key) or closing):
            CACHE.closings[key] = closing
        self.closing = closing

    def _no_closing(self, budget: int) -> InvalidRequestError:
        what = self.constraint.name or self.constraint.param
        return InvalidRequestError(
            f"no complete output for {what} fits within max_tokens={budget} (every token sequence of that "
            "length was tried): raise max_tokens, or simplify the schema (fewer required properties, smaller "
            "minLength / minItems / repetitions)", param="max_tokens", code="invalid_schema")

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
        if not self.guarded:
            return None  # no closing known (see start): the mask alone applies
        old = self.closing
        if old and old[0] == token:
            self.closing = old[1:]  # the rest of the closing still closes
            return None
        if old and len(old) <= room and self._closes(self.matcher, old):
            return None  # e.g. one more character inside a string: the same closing still closes
        closing = self._greedy(self.matcher, room, [0, search_clock() + MAX_STEP_S])  # cheap; enough mostly
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
        tokens, or None. Depth-first; at each node the candidate moves (closers, the hints spelled whole,
        the other 1-byte tokens, the shortest others) are each followed by a greedy completion, and the
        first node where one fits returns it (one round of rollouts per node reached, not per token of
        the closing); else the moves are tried in the order of their completion's length. Forced bytes
        are taken whole; bounded in nodes and time."""
        if self.matcher.is_accepting():
            return []
        counter: list[float] = [0, search_clock() + max_s]
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
                moves, done = self._ordered(matcher, budget - len(path), counter, max_nodes)
                if done is not None:
                    return path + done
                stack.append((matcher, path, iter(moves)))
            if not stack or _spent(counter, max_nodes):
                self.timed_out = search_clock() > counter[1]
                return None
            matcher, path, candidates = stack[-1]
            for branch, tokens in candidates:
                state = (branch, path + tokens)
                break
            else:
                stack.pop()

    def _ordered(self, matcher: llguidance.LLMatcher, budget: int, counter: list[float], max_nodes: int
                 ) -> tuple[list[tuple[llguidance.LLMatcher, list[int]]], list[int] | None]:
        """(matcher after move, move) for the candidate moves, best first, and the shortest move plus
        greedy completion if one fits in `budget`."""
        valid = []
        taken = 0
        for tokens in self._candidates(matcher):
            counter[0] += 1
            branch = matcher.deep_copy()
            if branch.consume_tokens(tokens):
                valid.append((branch, tokens))
                taken += len(tokens) == 1 and not self.vocab.closes_fast(tokens[0])
            if taken >= LOOKAHEAD or _spent(counter, max_nodes):
                break
        lengths, best, done = {}, budget + 1, None
        for branch, tokens in valid:  # each bounded by the best so far
            rollout = self._greedy(branch, best - len(tokens) - 1, counter)
            lengths[id(tokens)] = len(tokens) + len(rollout) if rollout is not None else 1 << 30
            if rollout is not None and lengths[id(tokens)] < best:
                best, done = lengths[id(tokens)], tokens + rollout
        # `"`, `}` or `]` first on ties: usually nothing is shorter
        valid.sort(key=lambda item: (lengths[id(item[1])], not self.vocab.closes_fast(item[1][0])))
        return valid, done

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
                tokens = next(self._candidates(trial, check=True), None)
                counter[0] += 1
                if counter[0] % 64 == 0 and search_clock() > counter[1]:
                    return None
                if tokens is None or not trial.consume_tokens(tokens):
                    return None
                path += tokens
            if len(path) > budget:
                return None
        return path

    def _candidates(self, matcher: llguidance.LLMatcher, check: bool = False) -> Any:
        """Moves (token lists): the closer `"`, the hints whole (inside a string no closer satisfies a
        pattern or a format), the other closers, then every other allowed 1-byte token and the 8
        shortest longer ones. (The first few are checked alone: most often one is taken, and a check
        costs less than a mask.)"""
        closers = self.vocab.closer_ids
        if closers and matcher.validate_tokens(closers[:1]) == 1:
            yield closers[:1]
        for hint in self.hints:
            if matcher.validate_tokens(hint) == len(hint):
                yield hint
        for token in closers[1:4]:
            if matcher.validate_tokens([token]) == 1:
                yield [token]
        allowed = self.vocab.allowed(matcher)
        for token in closers[4:]:
            if allowed[token]:
                yield [token]
        ids = self.vocab.by_length[allowed[self.vocab.by_length]]
        ones = int(np.count_nonzero(self.vocab.lengths[ids] == 1))  # ids are ordered by length
        for token in ids[: ones + 8].tolist():
            if token not in self.vocab.closer_set:
                yield [token]

    def prove(self, budget: int, max_nodes: int = MAX_PROOF_NODES,
              max_s: float = MAX_CLOSING_S) -> tuple[list[int] | None, bool]:
        """Exhaustive search: every allowed token at every node, to depth `budget`, less the nodes whose
        forced bytes take more tokens than are left. (closing, True) if one is found, (None, True) if none
        exists (the proof behind a 400), (None, False) if `max_nodes` tokens or `max_s` did not suffice to
        tell (`timed_out` says which)."""
        nodes, deadline = 0, search_clock() + max_s
        self.timed_out = False
        stack = [(self.matcher.deep_copy(), [])]
        while stack:
            if search_clock() > deadline:
                self.timed_out = True
                return None, False
            matcher, path = stack.pop()
            if matcher.is_accepting():
                return path, True
            left = budget - len(path)
            if left <= 0:
                continue  # a closing past this depth would not fit
            # what the grammar forces next, as far as `left` tokens could spell it (a prefix's fewest tokens
            # bound the whole's; a long forced string costs its prefix only)
            forced = matcher.compute_ff_bytes()[: (left + 1) * self.vocab.longest]
            if self.vocab.min_tokens(forced) > left:
                continue
            allowed = np.flatnonzero(self.vocab.allowed(matcher)).tolist()
            nodes += len(allowed) + 1
            if nodes > max_nodes:
                return None, False
            for token in allowed:
                branch = matcher.deep_copy()
                if branch.consume_token(token):
                    stack.append((branch, path + [token]))
        return None, True


def _spent(counter: list[float], max_nodes: int) -> bool:
    """A search's [nodes, deadline] past either bound."""
    return counter[0] > max_nodes or search_clock() > counter[1]


def compile_row(constraint: Constraint, hf_tokenizer: Any, n_vocab: int, end_ids: set[int], budget: int,
                limits: Any = None) -> RowGrammar:
    """A request's grammar ready for its row: compiled (or copied from the cache) and checked to close
    within `budget` tokens. Errors are 400s naming the request field."""
    vocab = vocabulary(hf_tokenizer, n_vocab, end_ids)
    matcher, key = CACHE.matcher(vocab, constraint, limits)
    row = RowGrammar(vocab, matcher, constraint)
    row.start(budget, key)
    return row
