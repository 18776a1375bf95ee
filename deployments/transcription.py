"""Whisper-style transcription of a batch of requests (the torch side of the STT deployment)."""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutput

from loading import LoadedModel, ModelSpec

from .audio import resample
from .errors import InvalidRequestError
from .params import Segment, TemperatureFallback, TranscribeParams, TranscribeResult, Word
from .transformers_logs import quiet_generation_warnings
from .vad import ChunkPlanner, VadOptions

quiet_generation_warnings()

CHUNK_S = 30.0  # Whisper's receptive field
ONCE = TemperatureFallback((0.0,), None, None, None)  # no fallback, no threshold
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
    """<|startofprev|> and the prompt's last tokens: at most half the decoder's positions, as OpenAI's Whisper
    and openai-whisper keep (224 of 448), so a long prompt (the transcript so far, the documented use)
    leaves each piece of audio the other half rather than cutting its transcript short."""
    if not prompt:
        return None
    try:
        ids = torch.as_tensor(loaded.processor.get_prompt_ids(prompt, return_tensors="np"))
    except ValueError as exc:  # e.g. the text of a special token ("<|en|>") in the prompt
        raise InvalidRequestError(f"the prompt cannot be used: {exc}", param="prompt") from None
    keep = getattr(loaded.model.config, "max_target_positions", 448) // 2 - 1
    return torch.cat([ids[:1], ids[1:][-keep:]]) if len(ids) > keep + 1 else ids


def token_budget(spec: ModelSpec, loaded: LoadedModel, prompt: str | None) -> int:
    """New tokens per chunk: Whisper counts start tokens and the prompt against max_target_positions."""
    used = FORCED_START_TOKENS + (len(prompt_ids(loaded, prompt)) if prompt else 0)
    return min(spec.max_new_tokens, getattr(loaded.model.config, "max_target_positions", 448) - used)


def check_language(spec: ModelSpec, loaded: LoadedModel, language: str) -> None:
    """400 on `language` when the model cannot transcribe in it."""
    if not multilingual(loaded) and language.lower() != "en":
        raise InvalidRequestError(f"model {spec.name!r} is English-only; it cannot transcribe {language!r}",
                                  param="language")
    if multilingual(loaded):
        language_token(loaded, language)


def validate(spec: ModelSpec, loaded: LoadedModel, params: TranscribeParams) -> None:
    """Checks that must fail one request (400), not the batch it would join."""
    if params.language is not None:
        check_language(spec, loaded, params.language)
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


def detect_languages(loaded: LoadedModel, model: Any, encoded: torch.Tensor) -> list[str]:
    """Whisper's language detection on one chunk per request, from the encoder's states (`encoded`: kept to
    decode those chunks with, not computed again); `model`: what `loaded.active()` holds (a base shared with
    adapters answers through its base view)."""
    ids = model.detect_language(encoder_outputs=BaseModelOutput(last_hidden_state=encoded))
    tokens = loaded.processor.tokenizer.convert_ids_to_tokens(ids.reshape(-1).tolist())
    return [t.strip("<|>") for t in tokens]


def transcribe_batch(spec: ModelSpec, loaded: LoadedModel, batch: list[TranscribeParams],
                     chunks_per_call: int = 8, fallback: TemperatureFallback | None = None) -> list[TranscribeResult]:
    """Requests that share a model, language, prompt and temperature: their 30 s chunks go through
    the model `chunks_per_call` at a time (long audio never becomes one giant batch), each chunk decoded
    again at higher temperatures while it fails `fallback`'s thresholds; chunks of a request whose caller
    went away are skipped, and its rows end at the next decoding step. No `fallback`: each chunk is decoded
    once, at the requests' temperature, and none is dropped as silence."""
    fallback = fallback or ONCE
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
    # One language per request, detected on its first piece: left to generate(), each piece of a long
    # upload would be detected on its own (a pause heard as another language is then decoded in it)
    detect = not first.language and (first.detect_language or len(pieces) > len(batch))
    encoded: dict[int, torch.Tensor] = {}  # piece -> its encoder states, kept from detection for decoding
    if detect and not multilingual(loaded):
        languages = ["en"] * len(batch)  # an English-only model: nothing to detect
    elif detect:
        starts: dict[int, int] = {}  # request -> its first piece (a request with no audio has none)
        for i, (index, _, _) in enumerate(pieces):
            starts.setdefault(index, i)
        found: list[str] = []
        for group in _groups(list(starts.values()), chunks_per_call):
            inputs = _features(loaded, [pieces[i][2] for i in group], rate)
            states = _encoder_states(loaded, inputs["input_features"], [None] * len(group))
            with loaded.active() as model, torch.inference_mode():
                found += detect_languages(loaded, model, states)
            encoded.update(zip(group, states, strict=True))
        detected = dict(zip(starts, found, strict=True))
        languages = [detected.get(index) for index in range(len(batch))]
    outputs: list[_Output] = [_Output("")] * len(pieces)
    cancelled = [params.cancelled for params in batch]
    for group in _groups(list(range(len(pieces))), chunks_per_call):
        _decode_with_fallback(spec, loaded, first, pieces, group, outputs, languages, cancelled, rate, fallback,
                              encoded, chunks_per_call)

    segments: list[list[Segment]] = [[] for _ in batch]
    words: list[list[Word]] = [[] for _ in batch]
    redecoded, silent = [0] * len(batch), [0] * len(batch)
    prompted = len(prompt_ids(loaded, first.prompt)) - 1 if first.prompt else 0  # less <|startofprev|>
    for (index, start, samples), output in zip(pieces, outputs, strict=True):
        redecoded[index] += max(output.decodes - 1, 0)
        if fallback.is_silence(output.avg_logprob, output.no_speech_prob):
            silent[index] += 1
            continue  # openai-whisper's no-speech skip: what a model hears in silence is not a transcript
        seg, offset = segments[index], batch[index].offset_s
        end = start + len(samples) / rate
        seg.append(Segment(len(seg), round(offset + start, 3), round(offset + end, 3), output.text.strip(),
                           output.token_ids, output.temperature,
                           output.avg_logprob, output.compression_ratio, output.no_speech_prob))
        words[index] += [Word(w.word, round(offset + min(start + w.start, end), 3),
                              round(offset + min(start + w.end, end), 3)) for w in output.words]
    return [
        TranscribeResult(" ".join(s.text for s in segs if s.text).strip(), language, round(duration, 3), segs, w,
                         language_name(language), again, quiet, prompted)
        for language, segs, duration, w, again, quiet in zip(languages, segments, durations, words, redecoded, silent,
                                                             strict=True)
    ]


def _decode_with_fallback(spec: ModelSpec, loaded: LoadedModel, first: TranscribeParams,
                          pieces: list[tuple[int, float, np.ndarray]], group: list[int], outputs: list[_Output],
                          languages: list[str | None], cancelled: list[Any], rate: int,
                          fallback: TemperatureFallback, known: dict[int, torch.Tensor] | None = None,
                          rows_per_call: int = 8) -> None:
    """openai-whisper's decode_with_fallback over some chunks at once: all are decoded at the first temperature,
    then only those that failed a threshold at the next, and so on; each chunk keeps its last decode. Every
    pass after the first runs within what the first left of generation_timeout_s (none starts past it), so
    the passes together take at most that long. Where a chunk may be decoded again, the encoder runs once for
    all the passes (whisper-base's shape on one CPU thread, 6 passes of 60 tokens: 11.2 s -> 7.4-9.3 s). At a
    temperature above 0 each chunk is sampled `fallback.best_of` times, at most `rows_per_call` rows a call, and
    its likeliest sample stands (openai-whisper's best_of)."""
    deadline = time.monotonic() + spec.generation_timeout_s
    temperatures = fallback.temperatures_for(first.temperature)
    group = [i for i in group if not _is_set(cancelled[pieces[i][0]])]
    if not group:
        return
    inputs = _features(loaded, [pieces[i][2] for i in group], rate)
    known = known or {}
    # generate() would detect a chunk's language with an encoder pass of its own, then run the encoder
    # again to decode: given the states, it does both from them
    detects = multilingual(loaded) and not first.language and not all(languages[pieces[i][0]] for i in group)
    encoded = None
    if len(temperatures) > 1 or detects or any(i in known for i in group):
        encoded = _encoder_states(loaded, inputs["input_features"], [known.get(i) for i in group])
    rows = list(range(len(group)))  # of `inputs`: group[row] is the chunk
    for n, temperature in enumerate(temperatures):
        rows = [r for r in rows if not _is_set(cancelled[pieces[group[r]][0]])]
        if not rows or (n and deadline - time.monotonic() <= 0):
            return
        draws = fallback.best_of if n and temperature > 0 else 1  # openai-whisper's best_of, in the fallback
        repeated = [r for r in rows for _ in range(draws)]
        made: list[_Output] = []
        per_call = max(rows_per_call, len(group))  # the rows admission counted a request for (max_chunks_per_call)
        for start in range(0, len(repeated), per_call):
            part = repeated[start:start + per_call]
            left = deadline - time.monotonic()
            if made and left <= 0:
                break  # a piece keeps the samples drawn so far
            made += _generate(spec, loaded, first, [pieces[group[r]] for r in part], _rows(inputs, encoded, part),
                              languages, cancelled, temperature, left)
        for k, r in enumerate(rows):
            samples = made[k * draws:(k + 1) * draws]
            if not samples:
                break
            output = max(samples, key=lambda o: o.avg_logprob)  # openai-whisper's sum_logprob / length
            output.decodes, outputs[group[r]] = n + 1, output
        rows = [r for r in rows if fallback.needs_fallback(
            outputs[group[r]].avg_logprob, outputs[group[r]].compression_ratio, outputs[group[r]].no_speech_prob)]


def _encoder_states(loaded: LoadedModel, features: torch.Tensor, known: list[torch.Tensor | None]) -> torch.Tensor:
    """The encoder's states for each row of `features`, computed only for the rows `known` has none for."""
    missing = [row for row, states in enumerate(known) if states is None]
    if missing:
        with loaded.active() as model, torch.inference_mode():
            index = torch.tensor(missing, device=features.device)
            computed = model.get_encoder()(features.index_select(0, index)).last_hidden_state
        for row, states in zip(missing, computed, strict=True):
            known[row] = states
    return torch.stack([states for states in known if states is not None])


def _rows(inputs: dict[str, torch.Tensor], encoded: torch.Tensor | None, rows: list[int]) -> dict[str, Any]:
    """generate()'s inputs for some rows of `inputs`: with `encoded`, the encoder's states instead of the
    features (Whisper's generate takes encoder_outputs and skips its encoder)."""
    index = torch.tensor(rows, device=inputs["input_features"].device)
    picked: dict[str, Any] = {k: v.index_select(0, index) for k, v in inputs.items()
                              if k != "input_features" or encoded is None}
    if encoded is not None:
        picked["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoded.index_select(0, index))
    return picked


@dataclass
class _Output:
    """What one chunk gave: its text and tokens, its words (times within the chunk), its scores and the
    temperature it was decoded at."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0
    decodes: int = 0  # how many times the chunk was decoded (the last stands)

    @property
    def compression_ratio(self) -> float:
        return compression_ratio(self.text.strip())


def compression_ratio(text: str) -> float:
    """openai-whisper's repetition measure: a looping transcript compresses well (> 2.4 is suspect)."""
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 3) if data else 0.0


class _SegmentScores:
    """What Whisper reports per segment, read off one generate() call at no extra model pass.

    Its logits processor (after Whisper's own) keeps the step's log-probabilities; its stopping criterion
    (called once the step's tokens are chosen; it never stops a row) records each row's chosen token with
    its log-probability. Hooks on the decoder's embeddings and output layer read the probability of
    <|nospeech|> at <|startoftranscript|>'s position in the first pass that has it (the prefill, or
    generate()'s own language detection), as openai-whisper does."""

    def __init__(self, start_id: int, no_speech_id: int):
        self.start_id, self.no_speech_id = start_id, no_speech_id
        self.last: torch.Tensor | None = None
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tokens [rows], log-probabilities [rows])
        self.no_speech: torch.Tensor | None = None
        self._start_at: int | None = None
        self.processor, self.criterion = _KeepLogprobs(self), _RecordChosen(self)

    @contextlib.contextmanager
    def watching(self, model: Any) -> Iterator[None]:
        def ids_in(_module: Any, args: tuple) -> None:
            ids = args[0] if args else None
            if self.no_speech is None and isinstance(ids, torch.Tensor) and ids.dim() == 2:
                found = (ids[0] == self.start_id).nonzero()
                self._start_at = int(found[0]) if len(found) else None

        def logits_out(_module: Any, _args: tuple, out: torch.Tensor) -> None:
            if self.no_speech is None and self._start_at is not None and out.dim() == 3 \
                    and out.shape[1] > self._start_at:
                self.no_speech = out[:, self._start_at].float().softmax(dim=-1)[:, self.no_speech_id].cpu()
            self._start_at = None

        hooks = []
        try:
            hooks.append(model.get_decoder().embed_tokens.register_forward_pre_hook(ids_in))
            hooks.append(model.get_output_embeddings().register_forward_hook(logits_out))
        except AttributeError:  # a model laid out otherwise: no-speech probabilities stay 0
            pass
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def row(self, row: int, end_id: int) -> tuple[float, float]:
        """(avg_logprob, no_speech_prob) of one row: its text tokens and its end token, as Whisper averages."""
        total, count = 0.0, 0
        for tokens, logprobs in self.steps:
            token = int(tokens[row])
            if token <= end_id:  # text tokens and the end token (ids above it are special or timestamps)
                total, count = total + float(logprobs[row]), count + 1
            if token == end_id:
                break
        no_speech = float(self.no_speech[row]) if self.no_speech is not None and row < len(self.no_speech) else 0.0
        return (total / count if count else 0.0), no_speech


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
              pieces: list[tuple[int, float, np.ndarray]], inputs: dict[str, Any],
              languages: list[str | None], cancelled: list[Any],
              temperature: float, max_time: float) -> list[_Output]:
    """One generate call over some chunks (each of request `pieces[i][0]`, `inputs` their rows), at one
    temperature."""
    rate = loaded.processor.feature_extractor.sampling_rate
    tokenizer = loaded.processor.tokenizer
    scores = _SegmentScores(tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
                            loaded.model.generation_config.no_timestamps_token_id - 1)  # transformers' choice too
    kwargs: dict[str, Any] = {"max_new_tokens": token_budget(spec, loaded, first.prompt),
                              "max_time": max_time,
                              "logits_processor": LogitsProcessorList([scores.processor]),
                              "stopping_criteria": StoppingCriteriaList(
                                  [_DropCancelledRows([cancelled[p[0]] for p in pieces]), scores.criterion])}
    if multilingual(loaded):  # an English-only model takes neither a task nor a language
        kwargs["task"] = first.task
        if first.language:
            kwargs["language"] = first.language
        elif all(languages[index] for index, _, _ in pieces):  # detected once per request (transcribe_batch)
            kwargs["language"] = [languages[index] for index, _, _ in pieces]
    if first.prompt:
        kwargs["prompt_ids"] = prompt_ids(loaded, first.prompt)
    if temperature > 0:  # sampled from the whole distribution, as openai-whisper samples (no top-k of 50)
        kwargs.update(do_sample=True, temperature=temperature, top_k=0)
    if first.word_timestamps:
        kwargs["return_token_timestamps"] = True
    with loaded.active() as model, torch.inference_mode(), scores.watching(model):
        output = model.generate(**inputs, **kwargs)
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
            language = first.language or languages[pieces[row][0]]  # detected: Chinese words are not spaced
            words = _words(tokenizer, sequence, times[row].tolist(), language, len(pieces[row][2]) / rate)
        avg_logprob, no_speech_prob = scores.row(row, tokenizer.eos_token_id)
        results.append(_Output(text, tokens, words, avg_logprob, no_speech_prob, temperature))
    return results


class _KeepLogprobs(LogitsProcessor):
    def __init__(self, scores: _SegmentScores):
        self.scores = scores

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.scores.last = scores.float().log_softmax(dim=-1)
        return scores


class _RecordChosen(StoppingCriteria):
    def __init__(self, scores: _SegmentScores):
        self.scores = scores

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        last, self.scores.last = self.scores.last, None
        if last is not None and last.shape[0] == input_ids.shape[0]:
            chosen = input_ids[:, -1:]
            self.scores.steps.append((chosen[:, 0].cpu(), last.gather(1, chosen.to(last.device))[:, 0].cpu()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


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
    words, _, groups = _combine_tokens_into_words(tokenizer, tokens, language_name(language or "en"))
    out = []
    for word, group in zip(words, groups, strict=True):
        last = indices[group[-1]]
        start = times[indices[group[0]]]
        stop = times[last + 1] if last + 1 < len(times) else duration
        if word.strip():
            out.append(Word(word.strip(), round(min(start, duration), 3), round(min(max(stop, start), duration), 3)))
    return out


def language_name(language: str | None) -> str | None:
    """Whisper's language code as OpenAI's verbose_json names it ("en" -> "english"), and as the word
    grouping wants it (spaceless scripts group by character); None stays None."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return None if language is None else LANGUAGES.get(language.lower(), language)
