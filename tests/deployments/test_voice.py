"""The voice pieces on their own: the voice-activity detector on real speech, text cut for streaming,
streaming encoders, and the spoken reply's ordering and cancellation (with a fake ingress)."""

from __future__ import annotations

import asyncio
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from deployments import vad
from deployments.audio import StreamEncoder, decode_audio
from deployments.params import SpeechResult
from deployments.text_split import SentenceStream, split_text, stream_pieces
from deployments.voice import AudioPiece, ReplyDone, TextDelta, spoken_reply

SPEECH = Path(__file__).resolve().parents[1] / "serve" / "data" / "speech.flac"
SPOKEN = [(0.26, 0.99), (1.98, 3.68), (4.7, 8.61)]  # seconds, see tests/serve/data/README.md


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    samples, rate = sf.read(SPEECH, dtype="float32")
    assert rate == vad.RATE
    return samples


def test_the_detector_finds_the_three_utterances_of_the_fixture(speech):
    detector = vad.TurnDetector(vad.VadOptions(silence_duration_ms=400))
    events = []
    for i in range(0, len(speech), 1600):  # 100 ms at a time, as a client streams
        events += [(e.kind, e.sample / vad.RATE) for e in detector.feed(speech[i:i + 1600])]
    assert [kind for kind, _ in events] == ["started", "stopped"] * 3
    for (_, start), (_, stop), (begin, end) in zip(events[::2], events[1::2], SPOKEN, strict=True):
        assert abs(start - begin) < 0.15 and abs(stop - end) < 0.15


def test_long_audio_is_cut_in_pauses_into_pieces_of_at_most_30_s(speech):
    audio = np.tile(speech, 19)  # 3 min
    cuts = vad.plan_cuts(audio)
    assert cuts[0][0] == 0 and cuts[-1][1] == len(audio)
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:], strict=False))  # they cover the audio
    assert all(0 < end - start <= 30 * vad.RATE for start, end in cuts)
    for _, end in cuts[:-1]:
        within = (end / vad.RATE) % (len(speech) / vad.RATE)
        assert not any(a < within < b for a, b in SPOKEN), within


def test_silence_or_a_tone_is_cut_at_30_s_as_before():
    tone = 0.3 * np.sin(np.arange(35 * vad.RATE) / 20).astype(np.float32)
    assert vad.plan_cuts(tone) == [(0, 30 * vad.RATE), (30 * vad.RATE, 35 * vad.RATE)]
    assert vad.plan_cuts(np.zeros(10 * vad.RATE, dtype=np.float32)) == [(0, 10 * vad.RATE)]


def test_the_planner_scores_only_what_the_next_cut_needs(speech):
    planner = vad.ChunkPlanner(np.tile(speech, 19))
    next(planner.cuts())
    assert planner.scorer.frames * vad.FRAME_S < 40  # not the whole 3 min for the first piece


def test_stream_pieces_start_with_one_sentence_then_grow():
    assert stream_pieces("Hello there. How are you? Fine!", 400) == ["Hello there.", "How are you? Fine!"]
    ten = " ".join(f"This is sentence number {i}." for i in range(10))
    pieces = stream_pieces(ten, 400)
    assert pieces[0] == "This is sentence number 0." and " ".join(pieces) == ten
    assert len(pieces) == 4  # 1, 2, 4 then the last 3 sentences: not one model call per sentence
    assert all(len(b) <= 2 * len(a) + 1 for a, b in zip(pieces, pieces[1:], strict=False))
    long_first = "This first sentence goes on, and on, and on for quite a while before it ends. Short one."
    pieces = stream_pieces(long_first, 400, first_chars=40)
    assert pieces[0] == "This first sentence goes on, and on," and pieces[-1].endswith("Short one.")  # clauses, packed
    assert " ".join(pieces) == long_first


def test_sentence_stream_cuts_streamed_text_as_soon_as_a_sentence_ends():
    stream, out = SentenceStream(max_chars=60, clause_chars=30), []
    for char in "Hello there. The weather is fine today, and tomorrow too. A very long tail without any end":
        out += stream.feed(char)
    assert out[0] == "Hello there." and out[1] == "The weather is fine today,"
    assert stream.flush() is not None and stream.flush() is None
    assert SentenceStream().feed("3.14 is pi") == []  # a dot without a space after it ends nothing


def test_the_first_piece_ends_at_its_first_clause_or_after_first_chars_later_ones_at_sentences():
    stream, out = SentenceStream(max_chars=400, clause_chars=80, first_chars=30), []
    for char in "Well, that is a fine question. It has, I think, a long answer. ":
        out += stream.feed(char)
    assert out == ["Well,", "that is a fine question.", "It has, I think, a long answer."]
    # no punctuation at all (a model that writes none): the first piece comes at a word break by 30 chars
    stream, out = SentenceStream(max_chars=400, first_chars=30), []
    for char in "word " * 40:
        out += stream.feed(char)
    assert out == ["word word word word word word"] and len(stream.buffer) > 100


@pytest.mark.parametrize("fmt", ["pcm", "wav", "opus", "aac", "flac", "mp3"])
def test_stream_encoders_give_one_decodable_stream(fmt):
    wave = (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    encoder = StreamEncoder(fmt, 16000)
    parts = [encoder.write(wave) for _ in range(3)] + [encoder.close()]
    data = b"".join(parts)
    if fmt in ("pcm", "wav", "opus", "aac"):
        assert parts[0] and parts[1]  # sent as it comes
    if fmt == "pcm":  # at 24 kHz whatever the model's rate
        assert len(data) == 3 * 2 * 24000
        return
    if fmt == "wav":
        assert struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF
    samples, rate = decode_audio(data) if fmt == "aac" else sf.read(io.BytesIO(data), dtype="float32")
    assert abs(len(samples) / rate - 3.0) < 0.2


class FakeIngress:
    """chat_stream yields words slowly; synthesize_stream answers one piece per sentence."""

    def __init__(self, words: list[str], delay: float = 0.01):
        self.words, self.delay = words, delay
        self.closed: list[str] = []
        self.spoken: list[str] = []

    async def chat_stream(self, params):
        try:
            for word in self.words:
                await asyncio.sleep(self.delay)
                yield {"delta": word}
            yield {"finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": len(self.words)}}
        finally:
            self.closed.append("llm")

    async def synthesize_stream(self, params):
        try:
            await asyncio.sleep(self.delay)
            self.spoken.append(params.text)
            yield SpeechResult(np.zeros(160, dtype=np.float32), 16000, tokens=len(params.text))
        finally:
            self.closed.append("tts")


def test_each_sentence_is_spoken_while_the_llm_writes_the_next():
    async def scenario():
        ingress = FakeIngress(["Hi ", "there. ", "How ", "are ", "you? ", "Good ", "bye"])
        from deployments.params import ChatParams, SpeechParams

        events = [e async for e in spoken_reply(ingress, ChatParams(model="m", messages=[]),
                                                SpeechParams(model="t", text=""))]
        return ingress, events

    ingress, events = asyncio.run(scenario())
    assert ingress.spoken == ["Hi there.", "How are you?", "Good bye"]
    kinds = [type(e) for e in events]
    first_audio = kinds.index(AudioPiece)
    assert first_audio < max(i for i, k in enumerate(kinds) if k is TextDelta)  # audio before the text ends
    assert isinstance(events[-1], ReplyDone) and events[-1].text == "Hi there. How are you? Good bye"
    assert events[-1].usage == {"prompt_tokens": 3, "completion_tokens": 7, "tts_tokens": 29}


def test_closing_the_reply_cancels_the_llm_and_the_tts_at_once():
    async def scenario():
        ingress = FakeIngress([f"word{i}. " for i in range(1000)], delay=0.005)
        from deployments.params import ChatParams, SpeechParams

        reply = spoken_reply(ingress, ChatParams(model="m", messages=[]), SpeechParams(model="t", text=""))
        async for event in reply:
            if isinstance(event, AudioPiece):
                break
        await reply.aclose()
        await asyncio.sleep(0.05)
        return ingress

    ingress = asyncio.run(scenario())
    assert "llm" in ingress.closed and len(ingress.spoken) < 10


def test_a_spoken_reply_asks_for_the_voice_stream_interval():
    """Chat streams send a chunk per 50 ms after the first (stream_interval_ms); a reply to be spoken is
    marked `spoken`, and its family streams it at voice_stream_interval_ms (20), so that a sentence's end
    reaches TTS sooner."""
    from deployments.options import ChatOptions
    from deployments.params import ChatParams

    asked: list[ChatParams] = []

    class Ingress:
        async def chat_stream(self, params):
            asked.append(params)
            yield {"delta": "Hello there."}
            yield {"finish_reason": "stop", "usage": {}}

    chat = ChatParams(model="m", messages=[])

    async def run():
        return [event async for event in spoken_reply(Ingress(), chat, None)]

    events = asyncio.run(run())
    assert isinstance(events[-1], ReplyDone) and events[-1].text == "Hello there."
    assert asked[0].spoken and not chat.spoken  # the caller's params are left as they were
    defaults = ChatOptions()
    assert defaults.stream_interval_ms == 50 and defaults.voice_stream_interval_ms == 20


def test_chinese_and_japanese_text_is_cut_at_its_own_punctuation_with_no_space_after_it():
    text = "今天天气很好，我们去公园散步吧。你觉得怎么样？我觉得很好！"
    stream, out = SentenceStream(max_chars=400, clause_chars=80, first_chars=80), []
    for char in text:  # one character per delta, as a model streams
        out += stream.feed(char)
    assert out + ([stream.flush()] if stream.buffer else []) == ["今天天气很好，", "我们去公园散步吧。", "你觉得怎么样？", "我觉得很好！"]
    assert split_text(text * 3, 50)[0].endswith("。")
    assert "".join(split_text(text * 3, 50)).replace(" ", "") == text * 3
