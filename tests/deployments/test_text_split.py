"""text_split's streaming splitter (SentenceStream) on text it must cut with no space to cut at."""

from __future__ import annotations

import unicodedata

import pytest

from deployments.text_split import SentenceStream


def _streamed(text: str, **options) -> list[str]:
    stream, out = SentenceStream(**options), []
    for char in text:  # one character per delta, as an LLM streams
        out += stream.feed(char)
    rest = stream.flush()
    return out + ([rest] if rest else [])


@pytest.mark.parametrize("text", [
    "aaa" + "नमस्ते" * 100,  # Devanagari vowel signs and viramas, off by 3 from the cut
    "สวัสดีครับวันนี้อากาศดีมากเราไปเที่ยวทะเลกันไหม" * 12,  # Thai: written without spaces
    "a" + "👩‍👩‍👧‍👦" * 80,  # zero-width-joiner sequences
])
def test_a_run_without_spaces_is_cut_between_graphemes(text):
    """SentenceStream cut such a run at exactly first_chars / max_chars: the next TTS piece began with a
    lone vowel sign or virama (split_text's _hard_cut already moved its cut back before marks)."""
    pieces = _streamed(text, max_chars=400, first_chars=80)
    assert "".join(pieces) == text and len(pieces) > 2
    assert len(pieces[0]) <= 80 and all(len(p) <= 400 for p in pieces)
    for piece in pieces[1:]:
        assert unicodedata.category(piece[0]) not in ("Mn", "Mc", "Me") and piece[0] != "\u200d", piece[:3]
        assert piece[0] not in "\ufe0e\ufe0f"


def test_marks_all_the_way_are_still_cut_at_max_chars():
    text = "a" + "\u0301" * 50
    assert _streamed(text, max_chars=20) == [text[:20], text[20:40], text[40:]]
