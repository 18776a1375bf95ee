"""Whisper-style transcription of a batch of requests (the torch side of the STT deployment)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from loading import LoadedModel, ModelSpec

from .audio import chunk, resample
from .errors import InvalidRequestError
from .params import Segment, TranscribeParams, TranscribeResult
from .transformers_logs import quiet_generation_warnings

quiet_generation_warnings()

CHUNK_S = 30.0  # Whisper's receptive field
FORCED_START_TOKENS = 5  # <|startoftranscript|> <|lang|> <|task|> <|notimestamps|> (+ <|startofprev|>)


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
    return torch.as_tensor(loaded.processor.get_prompt_ids(prompt, return_tensors="np"))


def token_budget(spec: ModelSpec, loaded: LoadedModel, prompt: str | None) -> int:
    """New tokens per chunk: Whisper counts start tokens and the prompt against max_target_positions."""
    used = FORCED_START_TOKENS + (len(prompt_ids(loaded, prompt)) if prompt else 0)
    return min(spec.max_new_tokens, getattr(loaded.model.config, "max_target_positions", 448) - used)


def validate(spec: ModelSpec, loaded: LoadedModel, params: TranscribeParams) -> None:
    """Checks that must fail one request (400), not the batch it would join."""
    if params.language is not None:
        language_token(loaded, params.language)
    if token_budget(spec, loaded, params.prompt) < 1:
        raise InvalidRequestError("prompt is too long for this model's decoder; shorten it", param="prompt")


def detect_languages(loaded: LoadedModel, features: torch.Tensor) -> list[str]:
    """Whisper's language detection on one chunk per request (costs one encoder pass each)."""
    ids = loaded.model.detect_language(features)
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
        for start, samples in chunk(audio, rate, CHUNK_S):
            pieces.append((index, start, samples))
    first = batch[0]
    languages: list[str | None] = [params.language for params in batch]
    if not first.language and first.detect_language:
        starts = [i for i, piece in enumerate(pieces) if piece[1] == 0.0]
        languages = []
        for group in _groups(starts, chunks_per_call):
            inputs = _features(loaded, [pieces[i][2] for i in group], rate)
            with loaded.active(), torch.inference_mode():
                languages += detect_languages(loaded, inputs["input_features"])
    texts: list[str] = [""] * len(pieces)
    cancelled = [params.cancelled for params in batch]
    for group in _groups(list(range(len(pieces))), chunks_per_call):
        group = [i for i in group if not _is_set(cancelled[pieces[i][0]])]
        if group:
            for i, text in zip(group, _generate(spec, loaded, first, [pieces[i] for i in group], languages, cancelled, rate)):
                texts[i] = text

    segments: list[list[Segment]] = [[] for _ in batch]
    for (index, start, samples), text in zip(pieces, texts):
        seg = segments[index]
        seg.append(Segment(len(seg), round(start, 3), round(start + len(samples) / rate, 3), text.strip()))
    return [
        TranscribeResult(" ".join(s.text for s in segs if s.text).strip(), language, round(duration, 3), segs)
        for language, segs, duration in zip(languages, segments, durations)
    ]


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


def _generate(spec: ModelSpec, loaded: LoadedModel, first: TranscribeParams, pieces: list[tuple[int, float, np.ndarray]],
              languages: list[str | None], cancelled: list[Any], rate: int) -> list[str]:
    """One generate call over some chunks (each of request `pieces[i][0]`)."""
    inputs = _features(loaded, [p[2] for p in pieces], rate)
    kwargs: dict[str, Any] = {"max_new_tokens": token_budget(spec, loaded, first.prompt),
                              "max_time": spec.generation_timeout_s, "task": "transcribe",
                              "stopping_criteria": StoppingCriteriaList([_DropCancelledRows([cancelled[p[0]] for p in pieces])])}
    if first.language:
        kwargs["language"] = first.language
    elif first.detect_language:
        kwargs["language"] = [languages[index] for index, _, _ in pieces]
    if first.prompt:
        kwargs["prompt_ids"] = prompt_ids(loaded, first.prompt)
    if first.temperature > 0:
        kwargs.update(do_sample=True, temperature=first.temperature)
    with loaded.active() as model, torch.inference_mode():
        tokens = model.generate(**inputs, **kwargs)
    texts = loaded.processor.batch_decode(tokens, skip_special_tokens=True)
    if first.prompt:  # Whisper returns the prompt in front of the transcript
        texts = [t.strip().removeprefix(first.prompt.strip()) for t in texts]
    return texts
