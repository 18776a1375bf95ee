"""Whisper-style transcription of a batch of requests (the torch side of the STT deployment)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from loading import LoadedModel, ModelSpec

from .audio import resample
from .errors import InvalidRequestError
from .params import Segment, TranscribeParams, TranscribeResult, Word
from .transformers_logs import quiet_generation_warnings
from .vad import ChunkPlanner, VadOptions

quiet_generation_warnings()

CHUNK_S = 30.0  # Whisper's receptive field
TIME_PRECISION = 0.02  # seconds per encoder position (1500 of them in 30 s)
FORCED_START_TOKENS = 5  # <|startoftranscript|> <|lang|> <|task|> <|notimestamps|> (+ <|startofprev|>)


def multilingual(loaded: LoadedModel) -> bool:
    """Whether the model takes a language and a task: an English-only Whisper (whisper-*.en) takes
    neither, and transformers refuses both for it."""
    generation = loaded.model.generation_config
    return bool(getattr(generation, "is_multilingual", True)) and bool(getattr(generation, "lang_to_id", None))


def language_token(loaded: LoadedModel, language: str) -> str:
    lang_to_id = getattr(loaded.model.generation_config, "lang_to_id", None) or {}
    token = f"<|{language.lower()}|>"
    if lang_to_id and token not in lang_to_id:
        known = sorted(t.strip("<|>") for t in lang_to_id)
        raise InvalidRequestError(
            f"language {language!r} is not supported by this model; use one of {', '.join(known)}",
            param="language",
        )
    return language.lower()


def prompt_ids(loaded: LoadedModel, prompt: str | None) -> torch.Tensor | None:
    if not prompt:
        return None
    try:
        return torch.as_tensor(loaded.processor.get_prompt_ids(prompt, return_tensors="np"))
    except ValueError as exc:  # e.g. the text of a special token ("<|en|>") in the prompt
        raise InvalidRequestError(f"the prompt cannot be used: {exc}", param="prompt") from None


def token_budget(spec: ModelSpec, loaded: LoadedModel, prompt: str | None) -> int:
    """New tokens per chunk: Whisper counts start tokens and the prompt against max_target_positions."""
    used = FORCED_START_TOKENS + (len(prompt_ids(loaded, prompt)) if prompt else 0)
    return min(spec.max_new_tokens, getattr(loaded.model.config, "max_target_positions", 448) - used)


def validate(spec: ModelSpec, loaded: LoadedModel, params: TranscribeParams) -> None:
    """Checks that must fail one request (400), not the batch it would join."""
    if params.language is not None and not multilingual(loaded) and params.language.lower() != "en":
        raise InvalidRequestError(f"model {spec.name!r} is English-only; it cannot transcribe {params.language!r}",
                                  param="language")
    if params.language is not None and multilingual(loaded):
        language_token(loaded, params.language)
    if token_budget(spec, loaded, params.prompt) < 1:
        raise InvalidRequestError("prompt is too long for this model's decoder; shorten it", param="prompt")
    generation = loaded.model.generation_config
    if params.task == "translate" and "translate" not in (getattr(generation, "task_to_id", None) or {}):
        raise InvalidRequestError(f"model {spec.name!r} cannot translate (its generation config has no translate "
                                  "task; an English-only Whisper only transcribes)", param="model")
    if params.word_timestamps and not getattr(generation, "alignment_heads", None):
        raise InvalidRequestError(
            f"model {spec.name!r} has no alignment_heads in its generation_config, so word timestamps are "
            "not available for it; ask for segment timestamps", param="timestamp_granularities")


def plan(audio: np.ndarray, rate: int, vad: VadOptions | None) -> list[tuple[int, int]]:
    """Where audio at the model's rate (16 kHz) is cut: at silences, pieces of at most 30 s."""
    if rate != 16000:  # the detector's rate; cut positions are mapped back
        scale = rate / 16000
        return [(int(a * scale), int(b * scale)) for a, b in plan(resample(audio, rate, 16000), 16000, vad)]
    return list(ChunkPlanner(audio, vad, CHUNK_S).cuts())


def detect_languages(loaded: LoadedModel, model: Any, features: torch.Tensor) -> list[str]:
    """Whisper's language detection on one chunk per request (costs one encoder pass each); `model`: what
    `loaded.active()` holds (a base shared with adapters answers through its base view)."""
    ids = model.detect_language(features)
    tokens = loaded.processor.tokenizer.convert_ids_to_tokens(ids.reshape(-1).tolist())
    return [t.strip("<|>") for t in tokens]


def transcribe_batch(spec: ModelSpec, loaded: LoadedModel, batch: list[TranscribeParams],
                     chunks_per_call: int = 8) -> list[TranscribeResult]:
    """Requests that share a model, language, prompt and temperature: their 30 s chunks go through
    the model `chunks_per_call` at a time (long audio never becomes one giant batch); chunks of a
    request whose caller went away are skipped, and its rows end at the next decoding step."""
    rate = loaded.processor.feature_extractor.sampling_rate
    pieces: list[tuple[int, float, np.ndarray]] = []  # (request index, start s, samples)
    durations = []
    for index, params in enumerate(batch):
        audio = resample(np.asarray(params.audio, dtype=np.float32), params.sample_rate, rate)
        durations.append(len(audio) / rate)
        cuts = params.cuts if params.cuts is not None else plan(audio, rate, params.vad)
        for begin, end in cuts:
            pieces.append((index, begin / rate, audio[begin:end]))
    first = batch[0]
    languages: list[str | None] = [params.language for params in batch]
    if not first.language and first.detect_language and not multilingual(loaded):
        languages = ["en"] * len(batch)  # an English-only model: nothing to detect
    elif not first.language and first.detect_language:
        starts = [i for i, piece in enumerate(pieces) if piece[1] == 0.0]
        languages = []
        for group in _groups(starts, chunks_per_call):
            inputs = _features(loaded, [pieces[i][2] for i in group], rate)
            with loaded.active() as model, torch.inference_mode():
                languages += detect_languages(loaded, model, inputs["input_features"])
    outputs: list[_Output] = [_Output("", 0, [])] * len(pieces)
    cancelled = [params.cancelled for params in batch]
    for group in _groups(list(range(len(pieces))), chunks_per_call):
        group = [i for i in group if not _is_set(cancelled[pieces[i][0]])]
        if group:
            made = _generate(spec, loaded, first, [pieces[i] for i in group], languages, cancelled, rate)
            for i, output in zip(group, made, strict=True):
                outputs[i] = output

    segments: list[list[Segment]] = [[] for _ in batch]
    words: list[list[Word]] = [[] for _ in batch]
    for (index, start, samples), output in zip(pieces, outputs, strict=True):
        seg, offset = segments[index], batch[index].offset_s
        end = start + len(samples) / rate
        seg.append(Segment(len(seg), round(offset + start, 3), round(offset + end, 3), output.text.strip(),
                           output.tokens))
        words[index] += [Word(w.word, round(offset + min(start + w.start, end), 3),
                              round(offset + min(start + w.end, end), 3)) for w in output.words]
    return [
        TranscribeResult(" ".join(s.text for s in segs if s.text).strip(), language, round(duration, 3), segs, w)
        for language, segs, duration, w in zip(languages, segments, durations, words, strict=True)
    ]


class _Output:
    """What one chunk gave: its text, how many tokens, and its words (times within the chunk)."""

    def __init__(self, text: str, tokens: int, words: list[Word]):
        self.text, self.tokens, self.words = text, tokens, words


def _groups(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _is_set(event: Any) -> bool:
    return event is not None and event.is_set()


def _features(loaded: LoadedModel, audio: list[np.ndarray], rate: int) -> dict[str, torch.Tensor]:
    features = loaded.processor(audio, sampling_rate=rate, return_tensors="pt", return_attention_mask=True)
    dtype = next(loaded.model.parameters()).dtype
    inputs = {"input_features": features.input_features.to(loaded.model.device, dtype)}
    if "attention_mask" in features:
        inputs["attention_mask"] = features.attention_mask.to(loaded.model.device)
    return inputs


class _DropCancelledRows(StoppingCriteria):
    def __init__(self, events: list[Any]):
        self.events = events

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.tensor([_is_set(e) for e in self.events], dtype=torch.bool, device=input_ids.device)


def _generate(spec: ModelSpec, loaded: LoadedModel, first: TranscribeParams,
              pieces: list[tuple[int, float, np.ndarray]],
              languages: list[str | None], cancelled: list[Any], rate: int) -> list[_Output]:
    """One generate call over some chunks (each of request `pieces[i][0]`)."""
    inputs = _features(loaded, [p[2] for p in pieces], rate)
    kwargs: dict[str, Any] = {"max_new_tokens": token_budget(spec, loaded, first.prompt),
                              "max_time": spec.generation_timeout_s,
                              "stopping_criteria": StoppingCriteriaList(
                                  [_DropCancelledRows([cancelled[p[0]] for p in pieces])])}
    if multilingual(loaded):  # an English-only model takes neither a task nor a language
        kwargs["task"] = first.task
        if first.language:
            kwargs["language"] = first.language
        elif first.detect_language:
            kwargs["language"] = [languages[index] for index, _, _ in pieces]
    if first.prompt:
        kwargs["prompt_ids"] = prompt_ids(loaded, first.prompt)
    if first.temperature > 0:
        kwargs.update(do_sample=True, temperature=first.temperature)
    if first.word_timestamps:
        kwargs["return_token_timestamps"] = True
    with loaded.active() as model, torch.inference_mode():
        output = model.generate(**inputs, **kwargs)
    tokenizer = loaded.processor.tokenizer
    if first.word_timestamps:
        sequences, times = output["sequences"], output["token_timestamps"]
    else:
        sequences, times = output, None
    results = []
    for row, sequence in enumerate(sequences.tolist()):
        tokens = [sequence[i] for i in _text_span(tokenizer, sequence)]
        text = tokenizer.decode(tokens, skip_special_tokens=True)  # the span after the start tokens: no prompt
        words: list[Word] = []
        if times is not None:
            words = _words(tokenizer, sequence, times[row].tolist(), first.language, len(pieces[row][2]) / rate)
        results.append(_Output(text, len(tokens), words))
    return results


def _text_span(tokenizer: Any, sequence: list[int]) -> list[int]:
    """Indices of the generated text tokens: after the forced start tokens (and a prompt's tokens), up
    to the end of text; special and timestamp tokens (ids above end-of-text) left out."""
    eos = tokenizer.eos_token_id
    start = 0
    prev = tokenizer.convert_tokens_to_ids("<|startofprev|>")
    if sequence and sequence[0] == prev:  # a prompt: its text runs up to <|startoftranscript|>
        sot = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
        start = sequence.index(sot) if sot in sequence else 0
    while start < len(sequence) and sequence[start] > eos:
        start += 1
    end = sequence.index(eos, start) if eos in sequence[start:] else len(sequence)
    return [i for i in range(start, end) if sequence[i] < eos]


def _words(tokenizer: Any, sequence: list[int], times: list[float], language: str | None,
           duration: float) -> list[Word]:
    """Words of one chunk from its token timestamps (Whisper's cross-attention alignment heads with DTW):
    tokens grouped into words as transformers' Whisper pipeline does, each word from its first token's
    time to the time of the token after its last."""
    from transformers.models.whisper.tokenization_whisper import _combine_tokens_into_words

    indices = _text_span(tokenizer, sequence)
    if not indices:
        return []
    tokens = [sequence[i] for i in indices]
    words, _, groups = _combine_tokens_into_words(tokenizer, tokens, _language_name(tokenizer, language))
    out = []
    for word, group in zip(words, groups, strict=True):
        last = indices[group[-1]]
        start = times[indices[group[0]]]
        stop = times[last + 1] if last + 1 < len(times) else duration
        if word.strip():
            out.append(Word(word.strip(), round(min(start, duration), 3), round(min(max(stop, start), duration), 3)))
    return out


def _language_name(tokenizer: Any, language: str | None) -> str:
    """The language's English name, as the word grouping wants it (spaceless scripts group by character)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES.get((language or "en").lower(), "english")
