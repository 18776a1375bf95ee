"""The STT deployment: speech-to-text with sequence-to-sequence models (Whisper and kin).

Requests are batched: each request's audio is cut into 30 s chunks, the chunks of every request
in the batch go through one generate call, and each request gets its text back with one
segment per chunk.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from ray import serve

from loading import LoadedModel, ModelSpec

from .audio import chunk, resample
from .errors import InvalidRequestError
from .family_server import FamilyServer
from .params import Segment, TranscribeParams, TranscribeResult

CHUNK_S = 30.0  # Whisper's receptive field


class STTServer(FamilyServer):
    def __init__(self, models: list[dict], max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
                 max_loaded_models: int = 4):
        super().__init__(models, max_loaded_models)
        self._transcribe_batch.set_max_batch_size(max_batch_size)
        self._transcribe_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def transcribe(self, params: TranscribeParams) -> TranscribeResult:
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        params.model = spec.name
        if params.language is not None:
            _language_token(loaded, params.language)  # 400 now rather than failing the whole batch
        result = await self._transcribe_batch(params)
        if isinstance(result, BaseException):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _transcribe_batch(self, batch: list[TranscribeParams]) -> list[Any]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, params in enumerate(batch):
            groups[(params.model, params.batch_key())].append(index)
        results: list[Any] = [None] * len(batch)
        for (model, _), indices in groups.items():
            items = [batch[i] for i in indices]
            try:
                spec, loaded = await self.pool.get(model)
                outputs = await self._infer(transcribe_batch, spec, loaded, items)
            except Exception as exc:  # fails this group only
                outputs = [exc] * len(items)
            for i, output in zip(indices, outputs):
                results[i] = output
        return results


def _language_token(loaded: LoadedModel, language: str) -> str:
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
