"""Internal request/result objects passed between the ingress and the family deployments.

The wire models (protocol.py) are converted to these once, in the ingress; the family
deployments never see HTTP.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PADDED_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")  # one row per request, padded


def length_band(tokens: int, ratio: float) -> int:
    """Lengths in one band are within `ratio` of each other (band k: ratio**k <= tokens < ratio**(k+1)), so
    a batch of one band, padded to its longest row, holds at most `ratio` times its rows' own lengths."""
    return int(math.log(max(tokens, 1)) / math.log(ratio)) if ratio > 1 else tokens

# Fields set inside the replica (never sent over the wire) are excluded from repr and comparison.


@dataclass
class ChatParams:
    model: str
    messages: list[dict]  # role + content (str or [{"type": "text"|"image", ...}])
    images: list[bytes] = field(default_factory=list)  # encoded, headers checked; in order of appearance
    max_new_tokens: int | None = None
    max_tokens_param: str = "max_tokens"  # the field the client set it with, for a refusal to name
    messages_param: str = "messages"  # the field a refusal of the prompt's length names (voice: system_prompt, file)
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    priority: int = 0  # lower first where requests wait in the replica (scheduling_policy: priority)
    wait_s: float = 0.0  # how long to wait for a model that is still loading
    spoken: bool = False  # a reply the voice paths speak: streamed at the family's voice_stream_interval_ms
    # Per-row generation features (decode loop only; generate()-fallback models refuse them by name)
    constraint: Any = None  # structured.Constraint: a JSON schema or grammar the output must follow
    tools: list[dict] | None = None  # OpenAI function tools: {"name", "description", "parameters"}
    tool_choice: Any = "auto"  # "auto" | "none" | "required" | {"name": ...}
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    prompt: str | list[int] | None = None  # /v1/completions: raw text (or token ids), no chat template
    echo: bool = False  # /v1/completions: the prompt is part of the returned text
    # How the prompt is made (a chat's are fixed; /tokenize may set them, as vLLM's does): the template's
    # generation prompt or the last message left open, and a text prompt's tokenizer-added special tokens
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = True
    template_kwargs: dict[str, Any] | None = None  # chat_template_kwargs: variables of the model's template
    # Set inside the replica for a streamed request: called with each text delta, on the inference thread.
    sink: Callable[[str], None] | None = field(default=None, repr=False, compare=False)
    # ... and (with `logprobs`) with the logprob entries of the tokens a delta's text comes from, just before it
    logprob_sink: Callable[[list], None] | None = field(default=None, repr=False, compare=False)
    # Set inside the replica: the compiled grammar of `constraint` for this request's row
    grammar: Any = field(default=None, repr=False, compare=False)
    # Set inside the replica: the model inputs of this request alone (template applied, tokenized,
    # images processed), made before it joins a batch so that a bad request fails alone.
    inputs: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # Set inside the replica when the caller goes away: generation drops this row at its next step.
    cancelled: threading.Event | None = field(default=None, repr=False, compare=False)
    # Set inside the replica: called once, on the inference thread, when the first token is made (metrics)
    running: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    first_token_at: float | None = field(default=None, repr=False, compare=False)  # time.monotonic()
    # Set inside the replica: the (spec, loaded model) it was admitted with, which serves it to its end
    served: tuple[Any, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def prompt_length(self) -> int:
        """Tokens of the encoded prompt (0 before it is encoded)."""
        return int(self.inputs["input_ids"].shape[-1]) if self.inputs and "input_ids" in self.inputs else 0

    @property
    def prompt_param(self) -> str:
        """The request field that holds the prompt, for a refusal to name: /v1/completions' `prompt`, a chat's
        `messages` (the voice round trip's: its `system_prompt`, else the `file` whose transcript it is)."""
        return "prompt" if self.prompt is not None else self.messages_param

    def sampling_key(self, length_ratio: float = 2.0) -> tuple:
        """Requests with equal keys can share one batched generate call:
        - the same sampling; a seeded sampled request batches with none (generate() draws every row from
          torch's one global generator, so its output would depend on its batch-mates);
        - the same kinds of model input (collate concatenates pixel values and the like; a row without them
          cannot join rows that have them);
        - prompt and max_tokens each within `length_ratio` of the others' (the batch's cache is as long as
          its longest prompt plus its largest max_tokens, for every row: padding the budget counts)."""
        key: tuple = (self.temperature, self.top_p, self.seed, tuple(self.stop), self.input_kinds(),
               length_band(self.prompt_length, length_ratio), length_band(self.max_new_tokens or 0, length_ratio))
        if self.seed is not None and self.temperature != 0:
            key += (id(self),)
        return key

    def input_kinds(self) -> tuple[str, ...]:
        """The names of the encoded inputs, token rows included: rows batch only with rows of the same
        names (Qwen2-VL's processor gives a chat mm_token_type_ids, which a completion's prompt lacks)."""
        return tuple(sorted(self.inputs or {}))

    def has_non_token_inputs(self) -> bool:
        """Inputs besides the padded token rows (pixel values, image sizes, ...)."""
        return any(key not in PADDED_KEYS for key in self.inputs or {})

    def loop_features(self) -> list[str]:
        """The request fields only the decode loop serves (per-row logits processing)."""
        features = {"response_format": self.constraint is not None and not self.tools,
                    "tool_choice": self.constraint is not None and bool(self.tools),
                    "logprobs": self.logprobs, "presence_penalty": bool(self.presence_penalty),
                    "frequency_penalty": bool(self.frequency_penalty), "logit_bias": bool(self.logit_bias)}
        return [name for name, used in features.items() if used]


@dataclass
class TokenizerQuery:
    """A /detokenize or /tokenizer_info call: the model whose tokenizer answers it."""

    model: str
    wait_s: float = 0.0
    tokens: list[int] = field(default_factory=list)  # /detokenize's ids


@dataclass
class TokenizeResult:
    tokens: list[int]
    max_model_len: int | None  # the model's context (prompt + completion), where its config says
    token_strs: list[str] | None = None  # the vocabulary's spelling of each token, when asked for


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "tool_calls"
    # [{"token", "logprob", "bytes", "top_logprobs": [...]}] per sampled token, with `logprobs`
    logprobs: list[dict] | None = None
    tool_calls: list[dict] | None = None  # [{"id", "type": "function", "function": {"name", "arguments"}}]
    content: str | None = None  # with tool calls: the text outside them (None: `text` is all content)
    cached_tokens: int = 0  # of prompt_tokens, those the prefix cache supplied


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
    task: str = "transcribe"  # or "translate" (Whisper's task: into English)
    word_timestamps: bool = False  # words with start/end from the cross-attention alignment heads
    vad: Any = None  # vad.VadOptions: how long audio is cut at silences (None: the defaults)
    # Set inside the replica: (start, end) sample ranges the audio is transcribed in (VAD cuts), and the
    # offset in seconds of this audio in a longer one (a streamed request's pieces)
    cuts: list[tuple[int, int]] | None = field(default=None, repr=False, compare=False)
    offset_s: float = field(default=0.0, repr=False, compare=False)
    cancelled: threading.Event | None = field(default=None, repr=False, compare=False)
    # Set inside the replica: called when its model call starts (metrics)
    running: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    # Set inside the replica: the (spec, loaded model) it was admitted with, which serves it to its end
    served: tuple[Any, Any] | None = field(default=None, repr=False, compare=False)

    def batch_key(self) -> tuple:
        return (self.language, self.prompt, self.temperature, self.detect_language, self.task, self.word_timestamps)


@dataclass(frozen=True)
class TemperatureFallback:
    """openai-whisper's temperature fallback (its transcribe() and decode_with_fallback()), from the STT
    family's options: a piece asked for at temperature 0 is decoded greedily, then again at each next
    temperature (sampling) while its decode fails a threshold; the last decode stands. A threshold of None
    is not checked. A piece asked for at a temperature above 0 is decoded once, at that temperature."""

    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 2.4  # above: a repetitive (looping) transcript
    logprob_threshold: float | None = -1.0  # below: an unlikely transcript
    no_speech_threshold: float | None = 0.6  # above, with a low avg_logprob: silence, not a failed decode
    best_of: int = 5  # samples drawn at each fallback temperature above 0; the likeliest stands

    def temperatures_for(self, temperature: float) -> tuple[float, ...]:
        return self.temperatures if temperature == 0 else (temperature,)

    def is_silence(self, avg_logprob: float, no_speech_prob: float) -> bool:
        """<|nospeech|> likely and the text not (openai-whisper's skip): the piece gives no segment."""
        if self.no_speech_threshold is None or no_speech_prob <= self.no_speech_threshold:
            return False
        return self.logprob_threshold is None or avg_logprob <= self.logprob_threshold

    def needs_fallback(self, avg_logprob: float, compression_ratio: float, no_speech_prob: float) -> bool:
        ratio, logprob, no_speech = self.compression_ratio_threshold, self.logprob_threshold, self.no_speech_threshold
        failed = (ratio is not None and compression_ratio > ratio) or (logprob is not None and avg_logprob < logprob)
        silent = (no_speech is not None and logprob is not None
                  and no_speech_prob > no_speech and avg_logprob < logprob)  # not a failed decode: nothing said
        return failed and not silent


@dataclass
class Word:
    word: str
    start: float
    end: float


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    token_ids: list[int] = field(default_factory=list)  # those of its text, as the model generated them
    temperature: float = 0.0  # of the decode that stands (a fallback's: above the request's 0)
    avg_logprob: float = 0.0  # of its tokens and the end token, as Whisper reports it
    compression_ratio: float = 0.0  # its text's length over its zlib-compressed length (> 2.4: repetitive)
    no_speech_prob: float = 0.0  # of <|nospeech|> right after <|startoftranscript|>

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class TranscribeResult:
    text: str
    language: str | None
    duration: float
    segments: list[Segment]
    words: list[Word] = field(default_factory=list)
    language_name: str | None = None  # as OpenAI's verbose_json gives it ("english" for "en")
    fallback_decodes: int = 0  # its pieces' decodes past their first (the temperature fallback's cost)
    silent_pieces: int = 0  # its pieces dropped as silence (no segment)
    prompt_tokens: int = 0  # the text tokens of its prompt the decoder read (its last half-context's worth)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.segments)


@dataclass
class SpeechParams:
    model: str
    text: str
    voice: str | None = None
    speed: float = 1.0
    wait_s: float = 0.0
    cancelled: threading.Event | None = field(default=None, repr=False, compare=False)


@dataclass
class SpeechResult:
    waveform: Any  # float32 numpy array
    sample_rate: int
    tokens: int = 0  # the model's input tokens
