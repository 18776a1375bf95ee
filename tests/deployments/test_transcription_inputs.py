"""Transcription inputs that were mishandled: an English-only Whisper, prompts, and float audio holding
NaN or inf. In-process, on the tiny Whisper and the real-speech fixture."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from deployments.audio import decode_audio
from deployments.errors import InvalidRequestError, to_error
from deployments.options import TranscriptionOptions
from deployments.params import TranscribeParams
from deployments.stt import STTServer
from loading import ModelSpec
from loading.tiny import build_tiny

SPEECH = Path(__file__).parents[1] / "serve" / "data" / "speech.flac"


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    return build_tiny("stt", tmp_path_factory.mktemp("stt") / "tiny-whisper")


def speech(seconds: float = 2.0) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(SPEECH, dtype="float32")
    return samples[: int(seconds * rate)], rate


def transcribe(server: STTServer, model: str, **fields):
    audio, rate = speech()
    return asyncio.run(server.transcribe(TranscribeParams(model=model, audio=audio, sample_rate=rate, wait_s=60,
                                                          **fields)))


def test_an_english_only_whisper_transcribes(whisper_dir, tmp_path):
    """whisper-*.en takes neither a task nor a language: every request was a 500 ("Cannot specify
    `task` or `language` for an English-only model"), and language detection an AttributeError."""
    english = Path(shutil.copytree(whisper_dir, tmp_path / "tiny-whisper-en"))
    config = json.loads((english / "generation_config.json").read_text())
    config["is_multilingual"] = False
    for key in ("lang_to_id", "task_to_id"):
        config.pop(key, None)
    (english / "generation_config.json").write_text(json.dumps(config))
    server = STTServer([ModelSpec(name="en", source=str(english))],
                       TranscriptionOptions(memory_budget_mb=2048, fallback_temperatures=[0.0]))
    plain = transcribe(server, "en")
    assert transcribe(server, "en", language="en").text == plain.text
    detected = transcribe(server, "en", detect_language=True)
    assert detected.text == plain.text and detected.language == "en"
    with pytest.raises(InvalidRequestError, match="English-only") as info:
        transcribe(server, "en", language="fr")
    assert to_error(info.value)[0] == 400


def test_a_prompt_holding_a_special_tokens_text_is_a_400(whisper_dir):
    server = STTServer([ModelSpec(name="w", source=str(whisper_dir))],
                       TranscriptionOptions(memory_budget_mb=2048, fallback_temperatures=[0.0]))
    with pytest.raises(InvalidRequestError) as info:
        transcribe(server, "w", prompt="Notes from the <|en|> meeting")
    status, body, _ = to_error(info.value)
    assert status == 400 and body.error.param == "prompt"


def test_the_prompt_is_not_cut_off_the_front_of_the_transcript(whisper_dir, monkeypatch):
    """generate() returns only the new tokens: the prompt was nevertheless stripped from the front of
    the text, so speech that began like the prompt lost its first words."""
    server = STTServer([ModelSpec(name="w", source=str(whisper_dir))],
                       TranscriptionOptions(memory_budget_mb=2048, fallback_temperatures=[0.0]))
    transcribe(server, "w")  # loaded
    loaded = server.pool.handles["w"].get(0)
    tokenizer = loaded.processor.tokenizer
    said = tokenizer.encode(" The weather is nice today.", add_special_tokens=False) + [tokenizer.eos_token_id]

    def generate(input_features=None, **kwargs):  # the model "says" this, whatever it hears
        return torch.tensor([said] * input_features.shape[0])

    monkeypatch.setattr(loaded.model, "generate", generate)
    assert transcribe(server, "w", language="en", prompt="The weather").text == "The weather is nice today."


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 300.0])
def test_float_audio_with_non_finite_or_out_of_range_samples_decodes_to_full_scale_at_most(bad):
    """One NaN sample made every log-mel feature NaN: a 200 with a garbage transcript."""
    audio, rate = speech(1.0)
    audio = audio.copy()
    audio[100] = bad
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="WAV", subtype="FLOAT")
    decoded, _ = decode_audio(buffer.getvalue())
    assert np.isfinite(decoded).all() and np.abs(decoded).max() <= 1.0
