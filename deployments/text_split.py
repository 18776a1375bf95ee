"""Split text for speech synthesis into pieces of bounded length at natural boundaries."""

from __future__ import annotations

import re

# Ends of sentences, then of clauses, then any whitespace: tried in this order.
_BOUNDARIES = (re.compile(r"(?<=[.!?…。！？])\s+"), re.compile(r"(?<=[,;:—–，；：])\s+"), re.compile(r"\s+"))


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
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    pieces: list[str] = []
    current = ""
    for part in _BOUNDARIES[level].split(text):
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
