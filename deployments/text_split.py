"""Split text for speech synthesis into pieces of bounded length at natural boundaries."""

from __future__ import annotations

import re
import unicodedata

# Ends of sentences, then of clauses, then any whitespace: tried in this order. Chinese and Japanese
# punctuation ends a sentence or clause with no space after it (their text has none).
_BOUNDARIES = (re.compile(r"(?<=[.!?…])\s+|(?<=[。！？])\s*"), re.compile(r"(?<=[,;:—–])\s+|(?<=[，；：、])\s*"),
               re.compile(r"\s+"))


def split_text(text: str, max_chars: int) -> list[str]:
    """Pieces of at most `max_chars` characters, cut at sentence ends where possible, else at clause
    ends, else between words, else (one over-long word) anywhere. Whitespace at the cuts is dropped."""
    text = text.strip()
    if not text:
        return []
    return [piece for piece in _split(text, max_chars, 0) if piece]


def _split(text: str, max_chars: int, level: int) -> list[str]:
    if len(text) <= max_chars:
        return [text]
    if level == len(_BOUNDARIES):
        return _hard_cut(text, max_chars)
    pieces: list[str] = []
    current = ""
    for part in _BOUNDARIES[level].split(text):
        if not part:  # a zero-width cut at the very end (after a final "。")
            continue
        joined = f"{current} {part}" if current else part
        if len(joined) <= max_chars:
            current = joined
            continue
        if current:
            pieces.append(current)
        if len(part) <= max_chars:
            current = part
        else:
            pieces.extend(_split(part, max_chars, level + 1))
            current = ""
    if current:
        pieces.append(current)
    return pieces


def _hard_cut(text: str, max_chars: int) -> list[str]:
    """One over-long word in pieces of at most `max_chars`, each cut moved back before any combining mark,
    vowel sign or joiner, which belong with the character before them (a piece starting with a lone
    U+093F, or an accent apart from its letter, is mispronounced)."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = _grapheme_cut(text, start, start + max_chars)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _grapheme_cut(text: str, start: int, cut: int) -> int:
    """`cut` (start < cut < len(text)) moved back to the nearest index in (start, cut] that begins a
    grapheme; `cut` itself when marks run all the way back to start (no better cut)."""
    at = cut
    while at > start + 1 and _joins_previous(text, at):
        at -= 1
    return cut if _joins_previous(text, at) else at


def _joins_previous(text: str, index: int) -> bool:
    """Whether text[index] belongs with the character before it: a combining mark or vowel sign, a
    variation selector, a joiner, or what follows a zero-width joiner."""
    char = text[index]
    return (unicodedata.category(char) in ("Mn", "Mc", "Me") or char in "\u200c\u200d\ufe0e\ufe0f"
            or text[index - 1] == "\u200d")


def stream_pieces(text: str, max_chars: int, first_chars: int = 120) -> list[str]:
    """Pieces to synthesize one after another while streaming. The first is the first sentence (cut at
    its clauses when longer than `first_chars`), so the first audio comes after it, not after the whole
    text. Each later piece packs whole sentences up to twice the previous piece's length (at most
    `max_chars`): while one piece plays the next, longer one is made, and long text takes few model calls
    (each has a fixed cost) instead of one per sentence."""
    text = text.strip()
    if not text:
        return []
    sentences: list[str] = []
    for sentence in _BOUNDARIES[0].split(text):
        if sentence:
            sentences.extend(_split(sentence, max_chars, 1))
    if len(sentences[0]) > first_chars:
        sentences[:1] = _split(sentences[0], first_chars, 1)
    pieces, current = [sentences[0]], ""
    for sentence in sentences[1:]:
        joined = f"{current} {sentence}" if current else sentence
        if current and len(joined) > min(2 * len(pieces[-1]) + 1, max_chars):
            pieces.append(current)
            current = sentence
        else:
            current = joined
    if current:
        pieces.append(current)
    return [piece for piece in pieces if piece]


class SentenceStream:
    """Text that arrives in deltas (an LLM's reply), cut into speakable pieces as soon as they end: at
    a sentence end followed by whitespace, at a clause end once `clause_chars` have gathered, or at a
    word break once `max_chars` have. `flush()` returns the rest at the end of the reply.

    With `first_chars`, the first piece ends sooner: at its first clause end, or at a word break once
    `first_chars` have gathered. A voice agent's first audio then waits for a few words, not for a
    long first sentence (or, from a model that writes no punctuation, for `max_chars`)."""

    _SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*\s|[。！？]+[」』\"')\]]*")
    _CLAUSE_END = re.compile(r"[,;:—–]\s|[，；：、]")

    def __init__(self, max_chars: int = 400, clause_chars: int = 80, first_chars: int | None = None):
        self.max_chars, self.clause_chars, self.first_chars = max_chars, clause_chars, first_chars
        self.buffer = ""
        self.pieces = 0

    def feed(self, delta: str) -> list[str]:
        self.buffer += delta
        out: list[str] = []
        while True:
            cut = self._cut()
            if cut is None:
                return out
            piece, self.buffer = self.buffer[:cut].strip(), self.buffer[cut:].lstrip()
            if piece:
                out.append(piece)
                self.pieces += 1

    def _cut(self) -> int | None:
        first = self.first_chars is not None and self.pieces == 0
        max_chars = min(self.max_chars, self.first_chars) if first and self.first_chars else self.max_chars
        match = self._SENTENCE_END.search(self.buffer)
        if match is not None and match.end() <= max_chars:
            return match.end()
        if first or len(self.buffer) >= self.clause_chars:
            clauses = [m.end() for m in self._CLAUSE_END.finditer(self.buffer) if m.end() <= max_chars]
            if clauses:
                return clauses[0] if first else clauses[-1]
        if len(self.buffer) >= max_chars:
            space = self.buffer.rfind(" ", 0, max_chars)
            if space > 0:
                return space + 1
            # no space (Thai, one long word): cut between graphemes, as _hard_cut; the character after
            # the cut must have arrived to know whether it is a mark that belongs with the one before
            if len(self.buffer) > max_chars:
                return _grapheme_cut(self.buffer, 0, max_chars)
        return None

    def flush(self) -> str | None:
        piece, self.buffer = self.buffer.strip(), ""
        return piece or None
