"""Internal request/result objects passed between the ingress and the family deployments.

The wire models (protocol.py) are converted to these once, in the ingress; the family
deployments never see HTTP.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

# Fields set inside the replica (never sent over the wire) are excluded from repr and comparison.
_LOCAL = {"repr": False, "compare": False}


@dataclass
class ChatParams:
    model: str
    messages: list[dict]  # role + content (str or [{"type": "text"|"image", ...}])
    images: list[Any] = field(default_factory=list)  # PIL images, in order of appearance
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    wait_s: float = 0.0  # how long to wait for a model that is still loading
    # Set inside the replica for a streamed request: called with each text delta, on the inference thread.
    sink: Callable[[str], None] | None = field(default=None, **_LOCAL)
    # Set inside the replica: the model inputs of this request alone (template applied, tokenized,
    # images processed), made before it joins a batch so that a bad request fails alone.
    inputs: dict[str, Any] | None = field(default=None, **_LOCAL)
    # Set inside the replica when the caller goes away: generation drops this row at its next step.
    cancelled: threading.Event | None = field(default=None, **_LOCAL)

    def sampling_key(self) -> tuple:
        """Requests with equal keys can share one batched generate call."""
        return (self.temperature, self.top_p, self.seed, tuple(self.stop))


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class TranscribeParams:
    model: str
    audio: Any  # float32 mono numpy array
    sample_rate: int
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    detect_language: bool = False  # costs one extra encoder pass per request
    wait_s: float = 0.0
    cancelled: threading.Event | None = field(default=None, **_LOCAL)

    def batch_key(self) -> tuple:
        return (self.language, self.prompt, self.temperature, self.detect_language)


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str


@dataclass
class TranscribeResult:
    text: str
    language: str | None
    duration: float
    segments: list[Segment]


@dataclass
class SpeechParams:
    model: str
    text: str
    voice: str | None = None
    speed: float = 1.0
    wait_s: float = 0.0
    cancelled: threading.Event | None = field(default=None, **_LOCAL)


@dataclass
class SpeechResult:
    waveform: Any  # float32 numpy array
    sample_rate: int
