"""Voice-activity detection: where people speak in audio, to cut long audio at silences and to find
turns in a Realtime session.

The detector is Silero VAD (MIT), the ONNX "sequence" export that the `silero-vad` wheel ships
(`silero_vad/data/silero_vad_16k_sequence.onnx`): one onnxruntime call scores up to 512 frames of
32 ms (16 s of 16 kHz audio), carrying the LSTM state between calls, bit-exact with the streaming
model. It is run here directly, torch-free: importing the `silero_vad` package would import torch and
set torch's threads to 1 for the whole process (its model module does so at import), so only the
file is located, never imported. 3 minutes of audio score in ~1 s on one core.

Two users:
- `ChunkPlanner`: long audio cut into pieces of at most 30 s (Whisper's window) at the silences,
  decided as the scan goes, so the first piece can be transcribed before the rest is scored.
- `TurnDetector`: streaming speech start / stop events for the Realtime endpoint's server VAD.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

RATE = 16000  # the model's rate; callers resample to it
FRAME = 512  # samples per frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame the model sees in front of each frame
FRAME_S = FRAME / RATE
BLOCK_FRAMES = 512  # frames per onnxruntime call (~16 s)
MODEL_FILE = "silero_vad_16k_sequence.onnx"


@dataclass(frozen=True)
class VadOptions:
    """OpenAI's `server_vad` knobs (chunking_strategy and the Realtime session's turn_detection)."""

    threshold: float = 0.5
    """Speech probability above which a frame is speech."""
    prefix_padding_ms: int = 300
    """Audio kept before detected speech (a cut leaves at least this much silence before the next words)."""
    silence_duration_ms: int = 500
    """Silence that ends a turn (Realtime), or that a cut prefers to fall in (chunking)."""


class VadUnavailable(RuntimeError):
    """The silero-vad model file or onnxruntime is missing (install the project's dependencies)."""


_session = None
_session_lock = threading.Lock()


def model_path() -> str:
    """The ONNX file inside the installed silero-vad wheel, found without importing the package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadUnavailable("the silero-vad package is not installed (pip install silero-vad)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", MODEL_FILE)
    if not os.path.isfile(path):
        raise VadUnavailable(f"silero-vad is installed without {MODEL_FILE} (upgrade to silero-vad>=6.2)")
    return path


def session():
    """One onnxruntime session per process (thread-safe to run), single-threaded: a call is ~1 ms."""
    global _session
    with _session_lock:
        if _session is None:
            try:
                import onnxruntime as ort
            except ImportError as exc:
                raise VadUnavailable("onnxruntime is not installed (pip install onnxruntime)") from exc
            options = ort.SessionOptions()
            options.inter_op_num_threads = 1
            options.intra_op_num_threads = 1
            _session = ort.InferenceSession(model_path(), sess_options=options, providers=["CPUExecutionProvider"])
        return _session


class SpeechScorer:
    """Per-frame speech probabilities of a 16 kHz stream fed in any sizes; keeps the model's state."""

    def __init__(self) -> None:
        self.h = np.zeros((1, 1, 128), dtype=np.float32)
        self.c = np.zeros((1, 1, 128), dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)
        self.pending = np.zeros(0, dtype=np.float32)
        self.frames = 0  # frames scored so far

    def feed(self, samples: np.ndarray, final: bool = False) -> np.ndarray:
        """Probabilities of the whole frames now available (`final`: zero-pad the last partial frame)."""
        audio = np.concatenate([self.pending, np.asarray(samples, dtype=np.float32).reshape(-1)])
        count = len(audio) // FRAME
        if final and len(audio) % FRAME:
            audio = np.concatenate([audio, np.zeros(FRAME - len(audio) % FRAME, dtype=np.float32)])
            count += 1
        self.pending = audio[count * FRAME:]
        out = []
        for first in range(0, count, BLOCK_FRAMES):
            n = min(BLOCK_FRAMES, count - first)
            frames = audio[first * FRAME:(first + n) * FRAME].reshape(n, FRAME)
            contexts = np.empty((n, CONTEXT), dtype=np.float32)
            contexts[0] = self.context
            contexts[1:] = frames[:-1, -CONTEXT:]
            self.context = frames[-1, -CONTEXT:].copy()
            probs, self.h, self.c = session().run(
                ["speech_probs", "hn", "cn"],
                {"input": np.concatenate([contexts, frames], axis=1), "h": self.h, "c": self.c})
            out.append(np.asarray(probs, dtype=np.float32).reshape(-1))
        self.frames += count
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def speech_probabilities(audio: np.ndarray) -> np.ndarray:
    """One probability per 32 ms frame of 16 kHz audio (the last partial frame zero-padded)."""
    return SpeechScorer().feed(audio, final=True)


# --- cutting long audio ------------------------------------------------------------------------


class ChunkPlanner:
    """Cuts 16 kHz audio into pieces of at most `max_s` seconds that end in silence.

    Audio no longer than `max_s` is one piece. Otherwise each cut falls in the window's last stretch
    of silence that lasts at least `silence_duration_ms` (else its longest silence, else its quietest
    frame: a cut through speech only when nobody pauses for 30 s), so no word is split at a cut, and
    pieces stay long (few model calls). Pieces cover the whole audio: nothing is dropped, so
    timestamps and silence-only audio behave as before. Frames are scored only as far as the next
    cut needs, so the first piece is known after scoring at most `max_s` seconds."""

    def __init__(self, audio: np.ndarray, options: VadOptions | None = None, max_s: float = 30.0):
        self.audio = audio
        self.options = options or VadOptions()
        self.max_samples = int(round(max_s * RATE))
        self.scorer = SpeechScorer()
        self.probs = np.zeros(0, dtype=np.float32)

    def _score_until(self, frame: int) -> None:
        while len(self.probs) < frame and self.scorer.frames * FRAME < len(self.audio):
            start = self.scorer.frames * FRAME
            block = self.audio[start:start + BLOCK_FRAMES * FRAME]
            final = start + len(block) >= len(self.audio)
            self.probs = np.concatenate([self.probs, self.scorer.feed(block, final=final)])

    def cuts(self) -> Iterator[tuple[int, int]]:
        """(start, end) sample indices of each piece, in order."""
        start = 0
        while True:
            if len(self.audio) - start <= self.max_samples:
                yield start, len(self.audio)
                return
            end = start + self.max_samples
            first, last = -(-start // FRAME), end // FRAME  # whole frames inside the window
            self._score_until(last)
            offset = self._cut_in(self.probs[first:last])
            cut = end if offset is None else (first + offset) * FRAME
            yield start, cut
            start = cut

    def _cut_in(self, window: np.ndarray) -> int | None:
        """Frame offset (>= 1) in the window at which to cut; None: at the window's end."""
        quiet = window < max(0.0, self.options.threshold - 0.15)  # hysteresis, as Silero's own timestamps
        runs = _runs(quiet)
        min_run = max(1, int(self.options.silence_duration_ms / 1000 / FRAME_S))
        pad = int(self.options.prefix_padding_ms / 1000 / FRAME_S)
        long_enough = [r for r in runs if r[1] - r[0] >= min_run]
        if long_enough:
            begin, end = long_enough[-1]
        elif runs:
            begin, end = max(runs, key=lambda r: (r[1] - r[0], r[0]))
        else:  # speech throughout: the least speech-like frame of the last third
            third = len(window) * 2 // 3
            return max(1, third + int(np.argmin(window[third:])))
        if end == len(window):  # silent up to the window's end: the longest piece
            return None
        # as late in the silence as leaves the next piece its padding before the speech resumes
        return max(1, max((begin + end) // 2, end - pad))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[begin, end) of each run of True."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def plan_cuts(audio: np.ndarray, options: VadOptions | None = None, max_s: float = 30.0) -> list[tuple[int, int]]:
    return list(ChunkPlanner(audio, options, max_s).cuts())


# --- turns in a live stream (Realtime server VAD) -------------------------------------------------


@dataclass
class TurnEvent:
    kind: str  # "started" | "stopped"
    sample: int  # 16 kHz sample index in the stream: where speech started (before padding) or ended


class TurnDetector:
    """Speech start/stop in a stream of 16 kHz audio, as OpenAI's server VAD reports them: started once
    a frame passes `threshold`; stopped after `silence_duration_ms` below it (with hysteresis)."""

    def __init__(self, options: VadOptions | None = None):
        self.options = options or VadOptions()
        self.scorer = SpeechScorer()
        self.speaking = False
        self.silent_frames = 0
        self.speech_end = 0

    def feed(self, samples: np.ndarray) -> list[TurnEvent]:
        first = self.scorer.frames
        events = []
        stop_after = max(1, int(self.options.silence_duration_ms / 1000 / FRAME_S))
        low = max(0.0, self.options.threshold - 0.15)
        for i, p in enumerate(self.scorer.feed(samples)):
            frame = first + i
            if not self.speaking:
                if p >= self.options.threshold:
                    self.speaking, self.silent_frames = True, 0
                    events.append(TurnEvent("started", frame * FRAME))
            elif p < low:
                if self.silent_frames == 0:
                    self.speech_end = frame * FRAME
                self.silent_frames += 1
                if self.silent_frames >= stop_after:
                    self.speaking = False
                    events.append(TurnEvent("stopped", self.speech_end))
            else:
                self.silent_frames = 0
        return events

    def reset(self) -> None:
        """After a buffer clear or commit: a new turn starts from silence (the model keeps its state)."""
        self.speaking, self.silent_frames = False, 0
