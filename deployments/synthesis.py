"""Text-to-waveform synthesis (the torch side of the TTS deployment)."""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import numpy as np
import torch

from loading import LoadedModel, ModelSpec

from .errors import InvalidRequestError
from .params import SpeechParams, SpeechResult
from .text_split import stream_pieces

log = logging.getLogger(__name__)

# VITS samples its durations: a fixed seed per piece makes the same text give the same audio.
SEED = 0


# OpenAI's voice names: on a model with several speakers, name i is speaker i (modulo their number), so
# clients that always send one of these get distinct, stable voices
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")


def check_speed(spec: ModelSpec, loaded: LoadedModel, speed: float) -> None:
    """A 400 on `speed` where the model cannot speak at it (its forward takes no speaking_rate)."""
    if speed != 1.0 and "speaking_rate" not in inspect.signature(loaded.model.forward).parameters:
        raise InvalidRequestError(f"model {spec.name!r} speaks at one speed only; speed={speed:g} cannot be "
                                  "honoured: leave speed out or send 1.0", param="speed")


def model_kwargs(spec: ModelSpec, loaded: LoadedModel, params: SpeechParams) -> dict[str, Any]:
    """What the model's forward takes besides the text: the speed (a 400 for one it cannot honour) and,
    for a model with several speakers, the one `voice` names."""
    accepted = inspect.signature(loaded.model.forward).parameters
    kwargs: dict[str, Any] = {}
    check_speed(spec, loaded, params.speed)
    if "speaking_rate" in accepted:
        kwargs["speaking_rate"] = params.speed
    speakers = int(getattr(loaded.model.config, "num_speakers", 1) or 1)
    if speakers > 1 and "speaker_id" in accepted:
        kwargs["speaker_id"] = speaker_id(spec, params.voice, speakers)
    return kwargs


def speaker_id(spec: ModelSpec, voice: str | None, speakers: int) -> int:
    """`voice` as a speaker of a multi-speaker model: its number (0 to speakers-1), or an OpenAI voice name."""
    if voice is None or voice == "":
        return 0
    name = voice.strip().lower()
    if name in OPENAI_VOICES:
        return OPENAI_VOICES.index(name) % speakers
    if name.isdecimal() and int(name) < speakers:
        return int(name)
    raise InvalidRequestError(
        f"voice {voice!r} is not a voice of model {spec.name!r}: it has {speakers} speakers; send a number from 0 "
        f"to {speakers - 1} or one of {', '.join(OPENAI_VOICES)}", param="voice")


def sample_rate(loaded: LoadedModel) -> int:
    return int(getattr(loaded.model.config, "sampling_rate", 16000))


def synthesize_piece(loaded: LoadedModel, piece: str, kwargs: dict[str, Any]) -> SpeechResult | None:
    """One model call; None when nothing in the piece is pronounceable (e.g. only symbols)."""
    inputs = loaded.processor(text=piece, return_tensors="pt")
    tokens = int(inputs["input_ids"].shape[-1])
    if tokens == 0:
        return None
    with loaded.active() as model, torch.inference_mode():
        torch.manual_seed(SEED)
        output = model(**inputs.to(loaded.model.device), **kwargs)
    waveform = output.waveform if hasattr(output, "waveform") else output[0]
    return SpeechResult(waveform[0].float().cpu().numpy().astype(np.float32), sample_rate(loaded), tokens)


def nothing_to_say() -> InvalidRequestError:
    # VITS raises an opaque RuntimeError on empty input
    return InvalidRequestError(
        "input has no characters this voice can pronounce (after normalisation it is empty)", param="input")


def past_timeout(spec: ModelSpec, started: float, pieces_left: int) -> bool:
    """Whether generation_timeout_s has passed since `started`: a limit, like an LLM's max_tokens, not a
    failure. The speech stops before its next piece and what was made is the answer, whole or streamed
    alike (a 503 after a streamed piece could only cut the client's audio off mid-file)."""
    if time.monotonic() - started <= spec.generation_timeout_s:
        return False
    log.warning("model %s: synthesis past generation_timeout_s=%g s; %d piece(s) of the text not spoken",
                spec.name, spec.generation_timeout_s, pieces_left)
    return True


def synthesize(spec: ModelSpec, loaded: LoadedModel, params: SpeechParams,
               max_chars_per_call: int = 400) -> SpeechResult:
    """The text in the pieces a stream of it is made in (`stream_pieces`: VITS samples per call, so the
    same pieces are what make the same text the same audio in every format), one model call each,
    joined; stops between pieces once the caller has gone away, or once generation_timeout_s has passed
    (`past_timeout`; `synthesize_stream` applies the same rule per piece)."""
    kwargs = model_kwargs(spec, loaded, params)
    results: list[SpeechResult] = []
    started = time.monotonic()
    pieces = stream_pieces(params.text, max_chars_per_call)
    for index, piece in enumerate(pieces):
        if params.cancelled is not None and params.cancelled.is_set():
            break
        if index and past_timeout(spec, started, len(pieces) - index):
            break
        result = synthesize_piece(loaded, piece, kwargs)
        if result is not None:
            results.append(result)
    if not results:
        raise nothing_to_say()
    return SpeechResult(np.concatenate([r.waveform for r in results]), sample_rate(loaded),
                        sum(r.tokens for r in results))
