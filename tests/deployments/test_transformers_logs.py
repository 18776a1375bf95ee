"""A Whisper transcription must not log transformers' per-call generate warnings."""

from __future__ import annotations

import logging

import numpy as np

from deployments.params import TranscribeParams
from deployments.transcription import transcribe_batch
from loading import ModelSpec, load_model
from loading.tiny import build_tiny


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_whisper_generate_warnings_are_dropped_and_others_kept(tmp_path):
    path = build_tiny("stt", tmp_path / "whisper")
    spec = ModelSpec(name="w", source=str(path), device="cpu")
    loaded = load_model(spec)
    logger = logging.getLogger("transformers.generation.utils")
    collect = _Collect()
    logger.addHandler(collect)
    try:
        params = TranscribeParams(model="w", audio=np.zeros(16000, np.float32), sample_rate=16000)
        results = transcribe_batch(spec, loaded, [params, params])
        logger.warning("an unrelated generate warning")
    finally:
        logger.removeHandler(collect)
    assert len(results) == 2
    assert collect.messages == ["an unrelated generate warning"]
