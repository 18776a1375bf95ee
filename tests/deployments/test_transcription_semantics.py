"""Transcription as OpenAI's whisper-1 answers it: a long prompt keeps half the decoder, one language per
request, verbose_json's segments with every field OpenAI's type requires and its language by name.
In-process, on the tiny Whisper and the real-speech fixture."""

from __future__ import annotations

import asyncio
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from openai.types.audio import TranscriptionVerbose

from deployments.options import TranscriptionOptions
from deployments.params import TranscribeParams
from deployments.routes.audio import _render
from deployments.stt import STTServer
from deployments.transcription import prompt_ids
from loading import ModelSpec
from loading.tiny import build_tiny

SPEECH = Path(__file__).parents[1] / "serve" / "data" / "speech.flac"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> STTServer:
    source = build_tiny("stt", tmp_path_factory.mktemp("stt") / "tiny-whisper")
    return STTServer([ModelSpec(name="w", source=str(source))],
                     TranscriptionOptions(memory_budget_mb=4096, fallback_temperatures=[0.0]))


def speech(seconds: float | None = None) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(SPEECH, dtype="float32")
    return (samples[: int(seconds * rate)] if seconds else samples), rate


def transcribe(server: STTServer, audio: np.ndarray, rate: int, **fields):
    return asyncio.run(server.transcribe(TranscribeParams(model="w", audio=audio, sample_rate=rate, wait_s=60,
                                                          **fields)))


def test_a_long_prompt_leaves_the_audio_half_the_decoder(server):
    """The whole prompt was subtracted from the decoder's positions: a prompt holding the transcript so far
    (OpenAI's documented use) left a piece 4 new tokens where it made 59. OpenAI and openai-whisper keep the
    prompt's last max_target_positions // 2 - 1 tokens."""
    audio, rate = speech(8.0)
    plain = transcribe(server, audio, rate, language="en")
    loaded = server.pool.handles["w"].get(0)
    positions = loaded.model.config.max_target_positions
    prompt = " ".join(["hello world"] * 200)
    ids = prompt_ids(loaded, prompt)
    assert ids is not None and len(ids) == positions // 2  # <|startofprev|> and the last positions // 2 - 1
    assert int(ids[0]) == loaded.processor.tokenizer.convert_tokens_to_ids("<|startofprev|>")
    assert ids[1:].tolist() == loaded.processor.get_prompt_ids(prompt)[1:][-(positions // 2 - 1):].tolist()
    long = transcribe(server, audio, rate, language="en", prompt=prompt)
    assert long.tokens >= min(plain.tokens, positions - 5 - positions // 2)  # was 4 of 59


def test_one_language_per_request_in_every_format_and_the_stream(server, monkeypatch):
    """Without `language`, json/text/srt/vtt and the stream let generate() detect a language per 30 s piece;
    verbose_json detected once. A pause heard as another language was decoded in it in json only. The
    detector here hears quiet pieces as German; every piece must be decoded in the request's language."""
    audio, rate = speech()
    long = np.concatenate([audio, audio, audio, np.zeros(40 * rate, np.float32), audio])  # speech, pause, speech
    transcribe(server, audio[:rate], rate, language="en")  # loaded
    loaded = server.pool.handles["w"].get(0)
    tokenizer, model = loaded.processor.tokenizer, loaded.model

    # detection is given the encoder's states (computed once, then decoded from): the encoder records
    # which of its outputs came from a quiet piece
    encoder, heard = model.get_encoder(), []
    real_encode = encoder.forward

    def encode(input_features, *args, **kwargs):
        out = real_encode(input_features, *args, **kwargs)
        loud = input_features.float().flatten(1).std(dim=1) > 0.05
        heard.extend(zip(out.last_hidden_state.detach().clone(), loud.tolist(), strict=True))
        return out

    def detect_language(input_features=None, encoder_outputs=None, **_):
        if input_features is not None:
            loud = (input_features.float().flatten(1).std(dim=1) > 0.05).tolist()
        else:
            loud = [next(x for states, x in heard if torch.equal(states, row))
                    for row in encoder_outputs.last_hidden_state]
        return torch.tensor([tokenizer.convert_tokens_to_ids("<|en|>" if x else "<|de|>") for x in loud])

    monkeypatch.setattr(encoder, "forward", encode)

    decoded_in: list[str] = []
    real_init = model._retrieve_init_tokens

    def init_tokens(*args, **kwargs):
        out = real_init(*args, **kwargs)
        decoded_in.extend(t.strip("<|>") for t in tokenizer.convert_ids_to_tokens(out[:, 1].tolist()))
        return out

    monkeypatch.setattr(model, "detect_language", detect_language)
    monkeypatch.setattr(model, "_retrieve_init_tokens", init_tokens)
    plain = transcribe(server, long, rate)
    assert len(plain.segments) >= 3 and set(decoded_in) == {"en"}, decoded_in
    decoded_in.clear()
    verbose = transcribe(server, long, rate, detect_language=True)
    assert verbose.language == "en" and verbose.language_name == "english" and set(decoded_in) == {"en"}

    async def stream() -> dict:
        items = [item async for item in server.transcribe_stream(
            TranscribeParams(model="w", audio=long, sample_rate=rate, wait_s=60))]
        return items[-1]

    decoded_in.clear()
    result = asyncio.run(stream())["result"]
    assert set(decoded_in) == {"en"} and result.language == "en", decoded_in
    assert result.text == plain.text


def test_verbose_segments_carry_openai_fields_and_the_language_by_name(server):
    """Segments had only id/start/end/text: openai's TranscriptionVerbose (and strictly typed clients)
    rejected the body, and the scores people filter silence and loops with were missing. verbose_json gave
    the language as a code ("en") where OpenAI names it ("english")."""
    audio, rate = speech()
    result = transcribe(server, audio, rate, language="en", temperature=0.4)
    response = _render(result, "verbose_json", ["segment"], "transcribe")
    body = json.loads(bytes(response.body))
    verbose = TranscriptionVerbose.model_validate(body)
    assert verbose.language == "english"
    tokenizer = server.pool.handles["w"].get(0).processor.tokenizer
    assert verbose.segments
    for segment, ours in zip(verbose.segments, result.segments, strict=True):
        assert segment.tokens and tokenizer.decode(segment.tokens, skip_special_tokens=True).strip() == segment.text
        assert segment.seek == round(segment.start * 100) and segment.temperature == 0.4
        assert -30 < segment.avg_logprob < 0  # log-probabilities of the tokens chosen
        assert 0 < segment.no_speech_prob < 1  # read off the decoder pass, not a placeholder
        data = segment.text.encode()
        assert segment.compression_ratio == pytest.approx(len(data) / len(zlib.compress(data)), abs=1e-3)
        assert ours.tokens == len(segment.tokens)


def test_the_scores_are_the_decoders(server):
    """avg_logprob is the mean log-probability, under the scores the tokens were chosen from, of the text's
    tokens and the end token: recomputed here with one teacher-forced pass over the same decoder input."""
    audio, rate = speech(4.0)
    result = transcribe(server, audio, rate, language="en")
    segment = result.segments[0]
    loaded = server.pool.handles["w"].get(0)
    tokenizer, model = loaded.processor.tokenizer, loaded.model
    features = loaded.processor(audio.astype(np.float32), sampling_rate=rate, return_tensors="pt").input_features
    start = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    ids = torch.tensor([start + segment.token_ids + [tokenizer.eos_token_id]])
    with torch.inference_mode():
        logits = model(input_features=features, decoder_input_ids=ids).logits[0].float()
    logits = logits.clone()  # a plain tensor, to filter in place
    no_speech = logits[0].softmax(-1)[model.generation_config.no_timestamps_token_id - 1]  # after SOT, unfiltered
    assert segment.no_speech_prob == pytest.approx(float(no_speech), rel=0.05)
    generation = model.generation_config
    logits[:, generation.suppress_tokens or []] = float("-inf")
    logits[len(start) - 1, generation.begin_suppress_tokens or []] = float("-inf")  # the first token's own filter
    picked = logits[len(start) - 1:-1].log_softmax(-1).gather(1, ids[0, len(start):, None])[:, 0]
    ended = len(segment.token_ids) < model.config.max_target_positions - len(start) - 1  # else cut at the budget
    expected = picked if ended else picked[:-1]
    assert segment.avg_logprob == pytest.approx(float(expected.mean()), abs=1e-3)


def test_words_are_grouped_in_the_detected_language(server, monkeypatch):
    """Without `language`, the word grouping was told the request's field (None, so English) although the
    request's language was detected: Chinese audio came back with a whole unspaced sentence as one 'word'."""
    import transformers.models.whisper.tokenization_whisper as whisper_tokenization

    audio, rate = speech(4.0)
    transcribe(server, audio[:rate], rate, language="en")  # loaded
    loaded = server.pool.handles["w"].get(0)
    tokenizer, model = loaded.processor.tokenizer, loaded.model
    assert getattr(model.generation_config, "alignment_heads", None)  # word timestamps need them
    monkeypatch.setattr(model, "detect_language", lambda input_features=None, encoder_outputs=None, **_: torch.tensor(
        [tokenizer.convert_tokens_to_ids("<|zh|>")] * len(input_features if input_features is not None
                                                         else encoder_outputs.last_hidden_state)))
    grouped_in: list[str] = []
    real = whisper_tokenization._combine_tokens_into_words

    def combine(tokenizer, tokens, language=None, *args, **kwargs):
        grouped_in.append(language)
        return real(tokenizer, tokens, language, *args, **kwargs)

    monkeypatch.setattr(whisper_tokenization, "_combine_tokens_into_words", combine)
    result = transcribe(server, audio, rate, detect_language=True, word_timestamps=True)
    assert result.language == "zh" and grouped_in and set(grouped_in) == {"chinese"}, grouped_in


def test_without_a_language_each_piece_goes_through_the_encoder_once(server, monkeypatch):
    """Detecting a language costs the encoder a pass, and decoding ran it again on the same piece: generate()'s
    own detection (a piece alone) and ours (the first piece of a long upload) each did. Whisper's encoder is
    much of a piece's cost (whisper-base's shape, one thread: 2.2-2.3 -> 1.6-1.8 s for a 10 s clip)."""
    audio, rate = speech()
    transcribe(server, audio[:rate], rate, language="en")  # loaded
    loaded = server.pool.handles["w"].get(0)
    encoder, rows = loaded.model.get_encoder(), []
    real_encode = encoder.forward

    def encode(input_features, *args, **kwargs):
        rows.append(len(input_features))
        return real_encode(input_features, *args, **kwargs)

    monkeypatch.setattr(encoder, "forward", encode)
    clip = audio[: 8 * rate]
    detected = transcribe(server, clip, rate, detect_language=True)
    assert sum(rows) == 1, rows
    rows.clear()
    alone = transcribe(server, clip, rate)  # generate() detects, from the states it is given
    assert sum(rows) == 1 and alone.text == detected.text, rows
    rows.clear()
    told = transcribe(server, clip, rate, language=detected.language)  # the same decode from the features
    assert told.text == detected.text
    rows.clear()
    long = np.concatenate([audio] * 4)
    result = transcribe(server, long, rate)
    assert len(result.segments) >= 2 and sum(rows) == len(result.segments), (rows, len(result.segments))
