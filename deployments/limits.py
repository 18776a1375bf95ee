"""Bounds on what one request may ask of the server, checked before any work starts.

Every limit is a field here with its default and why; `args.limits` in serve_config.yaml
overrides them. Refusals name the limit and the value (413 for sizes, 400 for the rest).
Per-model bounds (prompt tokens, audio seconds, new tokens) live on `loading.ModelSpec`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import InvalidRequestError

MiB = 2**20


class RequestLimits(BaseModel):
    """`args.limits`: what the ingress accepts. Defaults suit a server on a shared machine;
    README ("Limits (`args.limits`)", its "Sizing them" paragraph) says how to size them."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    max_json_body_bytes: int = Field(default=16 * MiB, ge=1024)
    """Largest JSON request body (413 past it), counted while it is read. 16 MiB leaves room for
    a ~12 MB image as a base64 data URI; a chat prompt hits `max_prompt_tokens` long before."""
    max_upload_bytes: int = Field(default=25 * MiB, ge=1024)
    """Largest multipart request body (413 past it), counted while it is read. OpenAI's 25 MB."""
    body_timeout_s: float = Field(default=30.0, gt=0)
    """How long the ingress waits for a request body, plus 1 s per `body_min_bytes_per_s` bytes received
    (Apache's mod_reqtimeout rule): a body that stops coming is a 408. HAProxy waits an hour for a silent
    client, and a request waiting for its body holds one of `max_concurrent_requests`' places: 256
    connections that sent headers and no body refused every other request, /health included."""
    body_min_bytes_per_s: int = Field(default=32 * 1024, ge=1)
    """The slowest a body may come in on average after its first `body_timeout_s` (32 KiB/s = 256 kbit/s:
    a 25 MiB upload may take ~830 s)."""
    max_json_depth: int = Field(default=32, ge=4)
    """Deepest nesting of arrays/objects in a JSON body (a chat with image parts uses 6)."""
    max_json_integer: int = Field(default=2**63 - 1, ge=2**31)
    """Largest absolute integer anywhere in a JSON body (seeds and counts are 64-bit)."""
    max_concurrent_requests: int = Field(default=256, ge=1)
    """Requests the ingress works on at once; more get 503 + Retry-After instead of piling up."""
    max_messages: int = Field(default=1024, ge=1)
    """Messages in one chat request."""
    max_stop_sequences: int = Field(default=4, ge=0)
    """Entries of `stop` (OpenAI allows 4)."""
    max_stop_chars: int = Field(default=256, ge=1)
    """Characters in one stop sequence."""
    max_speech_input_chars: int = Field(default=4096, ge=1)
    """Characters of text to speak (`/v1/audio/speech` `input`, `/tts` `text`; OpenAI's 4096)."""
    max_form_field_chars: int = Field(default=32768, ge=64)
    """Characters in one multipart text field (a transcription prompt, a system prompt)."""
    max_images: int = Field(default=8, ge=0)
    """Images in one chat request."""
    max_image_pixels: int = Field(default=4096 * 4096, ge=64 * 64)
    """Pixels (width x height) of one image, read from its header before it is decoded."""
    max_image_aspect_ratio: float = Field(default=200.0, ge=1.0)
    """Longer side over shorter side of one image (from its header; Qwen2-VL's bound). Processors that
    scale the shortest edge up to their size (CLIP, LLaVA: 336) make a 1-pixel strip size x size*ratio
    pixels: a 65 KB PNG of 1 x 16,777,216 would be ~5.6 billion."""
    max_image_bytes: int = Field(default=12 * MiB, ge=1024)
    """Encoded size of one image."""
    min_sample_rate: int = Field(default=8000, ge=1)
    """Lowest accepted audio sample rate (Hz), read from the file's header."""
    max_sample_rate: int = Field(default=192000, ge=8000)
    """Highest accepted audio sample rate (Hz)."""
    max_audio_channels: int = Field(default=8, ge=1)
    """Most channels in an uploaded audio file (they are mixed down to one)."""
    max_audio_seconds: float = Field(default=1800.0, gt=0)
    """Longest upload, from its header, before decoding (a model's own `max_audio_seconds` may be lower)."""
    max_audio_links: int = Field(default=64, ge=1)
    """Streams one chained Ogg upload may hold (Ogg files joined end to end): each is decoded in turn, and
    opening one costs ~1 ms whatever audio it holds (a 25 MiB upload could chain ~200,000 empty ones)."""
    max_choices: int = Field(default=8, ge=1)
    """Choices one request may ask for: chat `n`; completions `n` times the prompts (each is a row of
    the decode loop, so this bounds what one request takes of a batch)."""
    max_tools: int = Field(default=128, ge=0)
    """Functions in one request's `tools` (OpenAI's 128)."""
    max_schema_chars: int = Field(default=65536, ge=256)
    """Characters of a request's JSON schemas together (response_format's, tools' parameters), as
    compact JSON: each is compiled into a grammar (ms per KB, cached) and searched for its shortest
    completion, so size is what costs."""
    max_schema_depth: int = Field(default=16, ge=2)
    """Nesting of one schema: objects and arrays inside each other (a schema's own keywords count, so
    `{"type": "object", "properties": {"a": {...}}}` is 2 deep at `a`)."""
    max_logit_bias: int = Field(default=300, ge=0)
    """Entries of `logit_bias` (OpenAI's 300)."""
    max_template_kwargs_chars: int = Field(default=4096, ge=2)
    """`chat_template_kwargs` (vLLM's), as compact JSON: values the template renders into every prompt."""
    media_workers: int = Field(default=2, ge=1)
    """Audio/image decodes the ingress runs at once, off its event loop (more wait their turn). Audio is
    decoded, and image headers read, in as many worker processes of the ingress (isolated.py): a decoder
    that crashes costs its own request a 400, never the ingress."""
    media_decode_timeout_s: float = Field(default=60.0, gt=0)
    """Longest an audio decode may run. One past it is stopped (its worker process killed) and the request
    refused with a 400 naming this limit: a decoder caught in a loop would otherwise hold a media turn for
    good. A 30-minute FLAC decodes in ~4 s here."""
    media_worker_memory_mb: int = Field(default=1024, ge=256)
    """Most memory one of the ingress's decoder processes may hold (RLIMIT_DATA: heap and arrays, ~100 MB of it
    the interpreter and its libraries). A file whose decode needs more is refused with a 400 naming this limit
    and its worker replaced, where it would otherwise grow the ingress until Ray's memory monitor killed workers
    across the node. Audio needs ~130 MB, ~0.25 MB per second and ~3x the upload's size (a 30-minute Opus file:
    ~430 MB measured); a `max_audio_seconds` and `max_upload_bytes` this cannot hold are refused at start."""
    max_realtime_sessions: int = Field(default=64, ge=1)
    """Realtime WebSocket sessions the ingress holds at once; one more gets an `error` event
    (`max_realtime_sessions`) and is closed (1013, try again later). Each holds at most its audio buffer."""
    max_realtime_event_bytes: int = Field(default=4 * MiB, ge=1024)
    """Largest client event of a Realtime session (an `input_audio_buffer.append` of 4 MiB of base64 is
    ~65 s of 24 kHz pcm16); a larger one is refused with an `error` event, the session goes on."""
    max_realtime_buffer_seconds: float = Field(default=60.0, gt=0)
    """Audio a Realtime session's input buffer holds before a commit; appends past it get an `error` event.
    With server VAD, outside speech the oldest audio is dropped instead (a session listening to silence
    never fills), and a turn this long is committed so far and goes on."""
    max_realtime_items: int = Field(default=64, ge=2)
    """Conversation items a Realtime session keeps for the LLM's context; older ones are dropped first."""
    max_realtime_session_s: float = Field(default=1800.0, gt=0)
    """Longest Realtime session; then an `error` event (`session_expired`) and a close. Ray's proxy also
    ends every request, WebSockets included, after `http_options.request_timeout_s`: keep that above this."""

    @model_validator(mode="after")
    def _sample_rates_in_order(self) -> RequestLimits:
        if self.min_sample_rate > self.max_sample_rate:
            raise ValueError(
                f"limits.min_sample_rate={self.min_sample_rate} is above limits.max_sample_rate="
                f"{self.max_sample_rate}: every audio upload would be refused; lower min_sample_rate or raise "
                "max_sample_rate")
        return self

    @model_validator(mode="after")
    def _decoders_hold_the_longest_upload(self) -> RequestLimits:
        needed = audio_decode_mb(self.max_audio_seconds, self.max_upload_bytes)
        if self.media_worker_memory_mb < needed:
            raise ValueError(
                f"limits.media_worker_memory_mb={self.media_worker_memory_mb} is below the ~{needed} MB a decoder "
                f"needs for an upload of limits.max_audio_seconds={self.max_audio_seconds:g} s in up to "
                f"limits.max_upload_bytes={self.max_upload_bytes:,}: such uploads would be refused; raise "
                f"media_worker_memory_mb to at least {needed}, or lower the other two")
        return self


def audio_decode_mb(seconds: float, upload_bytes: int = 0) -> int:
    """Memory a decoder process needs for `seconds` of audio sent as `upload_bytes`: its ~130 MB at rest, the
    upload (held whole, and read through buffers), and the samples at their largest (bench/HOSTILE.md: a 1,790 s
    Opus file at 48 kHz stereo decoded within 428 MB, not below; a 28 MB 8 kHz WAV of the same length in 195 MB).
    Rounded up, so that what this admits decodes."""
    return int(128 + 0.25 * seconds + 3 * upload_bytes / MiB) + 1


def image_decode_mb(pixels: int, image_bytes: int = 0) -> int:
    """Memory a decoder process needs for an image of `pixels` sent as `image_bytes`: ~130 MB at rest, the
    encoded image, the RGB pixels and Pillow's buffers (bench/HOSTILE.md: a 4096x4096 JPEG of 1.5 MB decoded
    within 285 MB, a PNG of 33 MB within 360 MB: ~9 bytes a pixel and ~2.4 per encoded byte over the rest)."""
    return int(128 + 14 * pixels / MiB + 3 * image_bytes / MiB) + 1


# --- checks of parsed requests against the limits (the schema in protocol.py checks the shape) ---


def largest_family_call_bytes(limits: RequestLimits, decoded_rate: int = 16000) -> int:
    """The most one ingress -> family call can carry under `limits`: the decoded audio of the longest upload
    (float32 at the rate uploads are decoded to), or a chat body with its images read from `file://` URLs
    besides; with an eighth more for what is pickled around them. Ray Serve's gRPC bound between replicas
    (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH, serve.env) must be above it: the builder notes it when not."""
    audio = int(limits.max_audio_seconds * decoded_rate) * 4
    chat = limits.max_json_body_bytes + limits.max_images * limits.max_image_bytes
    return max(audio, chat, limits.max_upload_bytes) * 9 // 8


def _refuse(message: str, param: str) -> None:
    raise InvalidRequestError(message, param=param)


def check_chat(messages: int, stops: list[str], limits: RequestLimits) -> None:
    if messages > limits.max_messages:
        _refuse(f"{messages} messages; at most max_messages={limits.max_messages} are accepted", "messages")
    if len(stops) > limits.max_stop_sequences:
        _refuse(f"{len(stops)} stop sequences; at most max_stop_sequences={limits.max_stop_sequences}", "stop")
    for index, stop in enumerate(stops):
        if len(stop) > limits.max_stop_chars:
            _refuse(f"stop sequence {index} has {len(stop)} characters; at most max_stop_chars="
                    f"{limits.max_stop_chars}", "stop")


def check_template_kwargs(kwargs: dict[str, Any] | None, limits: RequestLimits) -> None:
    if kwargs:
        size = len(json.dumps(kwargs, separators=(",", ":"), ensure_ascii=False))
        if size > limits.max_template_kwargs_chars:
            _refuse(f"chat_template_kwargs is {size} characters as JSON; at most max_template_kwargs_chars="
                    f"{limits.max_template_kwargs_chars}", "chat_template_kwargs")


def check_choices(choices: int, limits: RequestLimits, param: str = "n", counted: str = "") -> None:
    """`counted`: how the choices add up, where more than `n` makes them (/v1/completions' prompts times n)."""
    if choices > limits.max_choices:
        how = f" ({counted})" if counted else ""
        _refuse(f"{choices} choices asked for{how}; at most max_choices={limits.max_choices}", param)


def check_generation_features(tools: int, logit_bias: int, schemas: list[tuple[str, object]],
                              limits: RequestLimits) -> None:
    """Tools, logit_bias and JSON schemas (each with the request field it came from)."""
    if tools > limits.max_tools:
        _refuse(f"{tools} tools; at most max_tools={limits.max_tools}", "tools")
    if logit_bias > limits.max_logit_bias:
        _refuse(f"{logit_bias} logit_bias entries; at most max_logit_bias={limits.max_logit_bias}", "logit_bias")
    total = 0
    for param, schema in schemas:
        total += len(json.dumps(schema, separators=(",", ":")))
        if total > limits.max_schema_chars:
            _refuse(f"the request's JSON schemas take more than max_schema_chars={limits.max_schema_chars} "
                    "characters (compact JSON)", param)
        depth = _depth(schema)
        if depth > limits.max_schema_depth:
            _refuse(f"the schema nests {depth} deep; at most max_schema_depth={limits.max_schema_depth}", param)


def _depth(value: object) -> int:
    """Nesting of JSON containers, without recursion (the body's depth is bounded, but be safe)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_speech_text(text: str, limits: RequestLimits, param: str) -> None:
    if len(text) > limits.max_speech_input_chars:
        _refuse(f"{param} has {len(text)} characters; at most max_speech_input_chars="
                f"{limits.max_speech_input_chars}", param)


def check_form_fields(fields: dict[str, object], limits: RequestLimits) -> None:
    """Text fields of a multipart form, bounded like JSON strings."""
    for name, value in fields.items():
        if isinstance(value, str) and len(value) > limits.max_form_field_chars:
            _refuse(f"{name} has {len(value)} characters; at most max_form_field_chars="
                    f"{limits.max_form_field_chars}", name)
