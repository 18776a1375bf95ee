"""Transcription without a `language`: encoder passes and time per request, in-process.

    python -m bench.stt_encoder_passes [--rounds 3]

whisper-base's shape with random weights (bench.cpu_turns.whisper_base_random), torch on one thread, no
temperature fallback (each piece decoded once), noise as audio (random weights decode 32 tokens whatever
they hear). Counts the encoder's forward calls and rows, times transcribe_batch; results in bench/VOICE.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from deployments.params import TranscribeParams
from deployments.transcription import transcribe_batch
from loading import ModelSpec, load_model

from .cpu_turns import whisper_base_random

ROOT = Path(__file__).resolve().parent / "runs" / "models"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args(argv).rounds
    torch.set_num_threads(1)
    spec = ModelSpec(name="w", source=str(whisper_base_random(ROOT)), max_new_tokens=32)
    loaded = load_model(spec)
    rows: list[int] = []
    loaded.model.get_encoder().register_forward_hook(lambda module, args, out: rows.append(len(out.last_hidden_state)))
    rng = np.random.default_rng(0)
    print("| audio | detect_language | encoder calls (rows) | median ms |\n|---|---|---:|---:|")
    for seconds, detect in ((10, False), (10, True), (60, False)):
        audio = (0.1 * rng.standard_normal(16000 * seconds)).astype(np.float32)
        times = []
        for _ in range(rounds):
            rows.clear()
            started = time.perf_counter()
            transcribe_batch(spec, loaded, [TranscribeParams(model="w", audio=audio, sample_rate=16000,
                                                             detect_language=detect)])
            times.append(time.perf_counter() - started)
        print(f"| {seconds} s | {detect} | {len(rows)} ({sum(rows)}) | {statistics.median(times) * 1000:.0f} |")


if __name__ == "__main__":
    main()
