"""Whisper-style transcription of a batch of requests (the torch side of the STT deployment)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from loading import LoadedModel, ModelSpec

from .audio import chunk, resample
from .errors import InvalidRequestError
from .params import Segment, TranscribeParams, TranscribeResult

CHUNK_S = 30.0  # Whisper's receptive field


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


def transcribe_batch(spec: ModelSpec, loaded: LoadedModel, batch: list[TranscribeParams]) -> list[TranscribeResult]:
    processor = loaded.processor
    rate = processor.feature_extractor.sampling_rate
    pieces: list[tuple[int, float, np.ndarray]] = []  # (request index, start s, samples)
    durations = []
    for index, params in enumerate(batch):
        audio = resample(np.asarray(params.audio, dtype=np.float32), params.sample_rate, rate)
        durations.append(len(audio) / rate)
        for start, samples in chunk(audio, rate, CHUNK_S):
            pieces.append((index, start, samples))
    features = processor(
        [p[2] for p in pieces], sampling_rate=rate, return_tensors="pt", return_attention_mask=True
    )
    first = batch[0]
    kwargs: dict[str, Any] = {"max_new_tokens": min(spec.max_new_tokens, _max_target(loaded)),
                              "max_time": spec.generation_timeout_s}
    if first.language:
        kwargs["language"], kwargs["task"] = first.language, "transcribe"
    if first.prompt:
        kwargs["prompt_ids"] = torch.as_tensor(processor.get_prompt_ids(first.prompt, return_tensors="np"))
    if first.temperature > 0:
        kwargs.update(do_sample=True, temperature=first.temperature)
    dtype = next(loaded.model.parameters()).dtype
    inputs = {"input_features": features.input_features.to(loaded.model.device, dtype)}
    if "attention_mask" in features:
        inputs["attention_mask"] = features.attention_mask.to(loaded.model.device)
    with torch.inference_mode():
        tokens = loaded.model.generate(**inputs, **kwargs)
    texts = processor.batch_decode(tokens, skip_special_tokens=True)
    if first.prompt:  # Whisper returns the prompt in front of the transcript
        texts = [t.removeprefix(" " + first.prompt).removeprefix(first.prompt) for t in texts]

    segments: list[list[Segment]] = [[] for _ in batch]
    for (index, start, samples), text in zip(pieces, texts):
        seg = segments[index]
        seg.append(Segment(len(seg), round(start, 3), round(start + len(samples) / rate, 3), text.strip()))
    return [
        TranscribeResult(" ".join(s.text for s in segs if s.text).strip(), params.language, round(duration, 3), segs)
        for params, segs, duration in zip(batch, segments, durations)
    ]


def _max_target(loaded: LoadedModel) -> int:
    # Whisper counts the forced start tokens against max_target_positions.
    return max(1, getattr(loaded.model.config, "max_target_positions", 448) - 8)
