"""Wire models for the OpenAI-compatible API, plus modelfleet's legacy and vendor routes.

Fields follow the order of the OpenAI API reference; each has a docstring that becomes its
schema description. Request models ignore fields we do not use (OpenAI clients send many)
but constrain every field we do use, so bad input fails validation naming that field.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from fastapi import UploadFile
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)


class OpenAIBaseModel(BaseModel):
    """Shared base: attribute docstrings become field descriptions in the OpenAPI schema."""

    model_config = ConfigDict(use_attribute_docstrings=True)


class NullKeysModel(OpenAIBaseModel):
    """A response part whose `null_keys` OpenAI always sends, as null when unset: they stay in its JSON when
    the rest is written with `exclude_none` (stream chunks are), for clients that read `finish_reason: null`
    as "not finished" and a missing key as something else."""

    null_keys: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")  # no return annotation: the OpenAPI schema stays the model's own
    def _keep_null_keys(self, handler: SerializerFunctionWrapHandler):
        out = handler(self)
        if isinstance(out, dict):
            for key in self.null_keys:
                out.setdefault(key, None)
        return out


class RequestModel(OpenAIBaseModel):
    """Base of request bodies: unknown fields are dropped, not rejected."""

    model_config = ConfigDict(extra="ignore")


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


# --- errors -----------------------------------------------------------------------------


class ErrorInfo(OpenAIBaseModel):
    message: str
    """Human-readable description of what went wrong and, where possible, how to fix it."""
    type: str
    """Error class, e.g. `invalid_request_error`, `service_unavailable`, `internal_error`."""
    param: str | None = None
    """Dotted path of the request field at fault, if any."""
    code: str | None = None
    """Machine-readable code, e.g. `model_not_found`, `timeout`."""


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo
    """The error; OpenAI clients read `error.message`."""


# --- chat completions: request ----------------------------------------------------------


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    """Always `text`."""
    text: str
    """The text."""


class ImageUrl(OpenAIBaseModel):
    url: str
    """`http(s)://` URL or `data:image/...;base64,` URL of the image."""
    detail: Literal["auto", "low", "high"] = "auto"
    """Requested detail level; accepted for compatibility."""


class ImageUrlPart(OpenAIBaseModel):
    type: Literal["image_url"]
    """Always `image_url`."""
    image_url: ImageUrl
    """The image."""


def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "TextPart", "image_url": "ImageUrlPart"}.get(kind)


# Callable discriminators: pydantic then reports one error for the branch that applies,
# instead of one error per union member.
ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[ImageUrlPart, Tag("ImageUrlPart")],
    Discriminator(
        _part_tag,
        custom_error_type="invalid_content_part",
        custom_error_message="content part 'type' must be 'text' or 'image_url'",
    ),
]


def _str_or_list_tag(value: Any) -> str | None:
    return "str" if isinstance(value, str) else "list" if isinstance(value, list) else None


MessageContent = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[ContentPart], Tag("list")],
    Discriminator(
        _str_or_list_tag,
        custom_error_type="invalid_content",
        custom_error_message="content must be a string or a list of content parts",
    ),
]

StopSequence = Annotated[str, Field(min_length=1)]
Stop = Annotated[
    # how many entries is limits.max_stop_sequences' to say (limits.check_chat), not the schema's
    Annotated[StopSequence, Tag("str")] | Annotated[list[StopSequence], Tag("list")],
    Discriminator(
        _str_or_list_tag,
        custom_error_type="invalid_stop",
        custom_error_message="stop must be a string or a list of strings",
    ),
]


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionCallIn(RequestModel):
    name: str
    """The function called."""
    arguments: str
    """Its arguments, as the JSON text the model wrote."""


class ToolCallIn(RequestModel):
    id: str = Field(max_length=256)
    """The call's id; the `tool` message answering it repeats it as `tool_call_id`."""
    type: Literal["function"] = "function"
    """Always `function`."""
    function: FunctionCallIn
    """The call."""


class ChatMessage(RequestModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    """Author of the message."""
    content: MessageContent | None = None
    """A string, or a list of text and image parts."""
    name: str | None = None
    """Optional participant name."""
    tool_calls: list[ToolCallIn] | None = None
    """An assistant message's calls of tools (what an earlier reply asked for)."""
    tool_call_id: str | None = Field(default=None, max_length=256)
    """A `tool` message's answer to this call."""

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content' (a string or a list of content parts)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has 'tool_calls'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs 'tool_call_id', the id of the call it answers")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The message as HF chat templates expect it (see `ChatCompletionRequest.to_messages`)."""
        # Chat templates know system/user/assistant/tool; OpenAI's `developer` is the new `system`.
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        if self.content is None or isinstance(self.content, str):
            message["content"] = self.content or ""
        else:
            message["content"] = [
                {"type": "text", "text": part.text}
                if isinstance(part, TextPart)
                # HF templates expect {"type": "image"}; the url travels along so the caller can fetch it.
                else {"type": "image", "url": part.image_url.url}
                for part in self.content
            ]
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            # HF templates take the arguments as a mapping (they write it back as JSON themselves)
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text  # not JSON: the template gets the text as it was
    return value if isinstance(value, dict) else text


class JsonSchemaFormat(RequestModel):
    name: str = Field(default="response", pattern=FUNCTION_NAME)
    """Name of the format (letters, digits, `_`, `-`; at most 64)."""
    description: str | None = None
    """What the output is for; the model does not see it."""
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    """The JSON Schema the output must validate against (enforced token by token)."""
    strict: bool | None = None
    """Accepted; the schema is always enforced, strict or not."""


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    """`text` (no constraint), `json_object` (any JSON object) or `json_schema` (the schema given)."""
    json_schema: JsonSchemaFormat | None = None
    """The schema; required with `type: json_schema`."""

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with its 'schema'")
        return self


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=FUNCTION_NAME)
    """The function's name (letters, digits, `_`, `-`; at most 64)."""
    description: str | None = None
    """What it does; shown to the model."""
    parameters: dict[str, Any] | None = None
    """JSON Schema of its arguments (an object); calls made with `tool_choice` required or named are
    enforced to validate against it."""
    strict: bool | None = None
    """Accepted; constrained calls always follow `parameters`."""


class Tool(RequestModel):
    type: Literal["function"]
    """Only `function` tools are served (custom grammar tools are not)."""
    function: FunctionDefinition
    """The function."""


class NamedFunction(RequestModel):
    name: str
    """The function that must be called."""


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    """Always `function`."""
    function: NamedFunction
    """The function that must be called."""


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("str")] | Annotated[NamedToolChoice, Tag("dict")],
    Discriminator(
        lambda value: "str" if isinstance(value, str) else "dict" if isinstance(value, (dict, BaseModel)) else None,
        custom_error_type="invalid_tool_choice",
        custom_error_message="tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                             "\"function\": {\"name\": ...}}",
    ),
]


class StreamOptions(RequestModel):
    include_usage: bool = False
    """Send a last chunk with token usage and no choices."""


REFUSED_CHAT_FIELDS = {
    "audio": "audio output is not served by chat; use /v1/audio/speech or /v1/audio/chat",
    "prediction": "predicted outputs are not served",
    "web_search_options": "web search is not served",
    "reasoning_effort": "the served models have no reasoning-effort control",
    "verbosity": "the served models have no verbosity control",
    "functions": "'functions' is deprecated by OpenAI; send 'tools' instead",
    "function_call": "'function_call' is deprecated by OpenAI; send 'tool_choice' instead",
    "moderation": "moderation is not served",
}


def none_is_default(value: Any, info: ValidationInfo) -> Any:
    """OpenAI types `n`, `stream` and `echo` as "or null": a client that sends an unset option as null
    gets the default, not a 400."""
    if value is None:
        return {"n": 1, "stream": False, "echo": False}[info.field_name or ""]
    return value


def stream_options_need_stream(value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
    """OpenAI's rule: stream_options only with stream: true (a plain reply has no last chunk to carry usage)."""
    if value is not None and not info.data.get("stream", False):
        raise ValueError("stream_options is only allowed when stream is true")
    return value


class ChatCompletionRequest(RequestModel):
    model: str
    """Model id or alias, as listed by `/v1/models`."""
    messages: list[ChatMessage] = Field(min_length=1)
    """The conversation so far."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Deprecated by OpenAI in favour of `max_completion_tokens`; still honoured."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """Upper bound on generated tokens; wins over `max_tokens`."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature; 0 means greedy decoding. Omitted: the model's generation_config.json's, else 1
    (OpenAI's default)."""
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    """Nucleus sampling probability mass."""
    stop: Stop | None = None
    """Non-empty sequences at which generation stops (at most `limits.max_stop_sequences`, 4 by default)."""
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    """Seed for reproducible sampling."""
    priority: int = Field(default=0, ge=-(2**31), lt=2**31)
    """vLLM's extension: where requests wait in a replica (a full batch, the memory budget), lower values go
    first, arrivals in order among equals; running requests are not preempted. Only with the family's
    `scheduling_policy: priority`; otherwise anything but 0 is refused (400)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM's extension: variables for the model's chat template, such as Qwen3's `{"enable_thinking": false}`.
    Each key must be a variable the template reads and the request's other fields do not set (`messages`,
    `tools`, the special tokens...); another is refused (400) naming those it reads. At most
    `limits.max_template_kwargs_chars` characters as JSON."""
    stream: bool = False
    """Stream the reply as server-sent events."""
    stream_options: StreamOptions | None = None
    """Options for streaming; only with `stream: true`."""
    _stream_options = field_validator("stream_options")(stream_options_need_stream)
    n: int = Field(default=1, ge=1)
    """Number of choices, each sampled on its own (at most `limits.max_choices`)."""
    _nullable = field_validator("n", "stream", mode="before")(none_is_default)
    user: str | None = None
    """End-user id, for logs."""
    response_format: ResponseFormat | None = None
    """`json_object` or `json_schema`: the output is constrained token by token to parse (and validate)."""
    tools: list[Tool] | None = None
    """Functions the model may call."""
    tool_choice: ToolChoice | None = None
    """`auto` (default with tools), `none`, `required` or a named function; required and named calls are
    constrained to the functions' parameters."""
    parallel_tool_calls: bool | None = None
    """Whether one reply may call several tools (default true)."""
    logprobs: bool | None = None
    """Return the log probability of each output token."""
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """With `logprobs`, also the most likely tokens at each position (0-20)."""
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    """Subtracted from the logit of every token already generated."""
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    """Subtracted from the logit of every token once per time it was generated."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> bias from -100 to 100, added to its logit before sampling."""
    # -- OpenAI fields accepted for compatibility: they change nothing here, honestly so --
    store: bool | None = None
    """Accepted only as false/absent: completions are never stored."""
    metadata: dict[str, str] | None = None
    """Accepted; not stored (nothing is)."""
    service_tier: Literal["auto", "default"] | None = None
    """`auto`/`default`: there is one tier."""
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    """Accepted; there is no prompt cache to steer."""
    safety_identifier: str | None = Field(default=None, max_length=1024)
    """End-user id, for logs."""
    # -- OpenAI fields refused with a 400 when set: not served here --
    audio: Any = None
    """Refused: no audio output from chat (use /v1/audio/speech or /v1/audio/chat)."""
    modalities: list[str] | None = None
    """Only `["text"]`."""
    prediction: Any = None
    """Refused: predicted outputs are not served."""
    web_search_options: Any = None
    """Refused: no web search."""
    reasoning_effort: Any = None
    """Refused: the served models have no reasoning-effort control."""
    verbosity: Any = None
    """Refused: the served models have no verbosity control."""
    functions: Any = None
    """Refused: deprecated by OpenAI; use `tools`."""
    function_call: Any = None
    """Refused: deprecated by OpenAI; use `tool_choice`."""
    moderation: Any = None
    """Refused: no moderation here."""

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit()) or len(key) > 9:  # "²".isdigit(), yet int("²") fails
                raise ValueError(f"keys must be token ids as strings, got {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {key} must be within [-100, 100], got {bias}")
        return value

    @field_validator("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity", "functions",
                     "function_call", "moderation")
    @classmethod
    def _refused(cls, value: Any, info: Any) -> Any:
        if value is not None:
            raise ValueError(REFUSED_CHAT_FIELDS[info.field_name])
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and value != ["text"]:
            raise ValueError('only ["text"] is served (speech: /v1/audio/speech or /v1/audio/chat)')
        return value

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("completions are not stored here; send false or leave it out")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: Any) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def requested_max_tokens(self) -> int | None:
        """The generation limit the client asked for, if any."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_list(self) -> list[str]:
        """`stop` as a list (empty when not given)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def has_images(self) -> bool:
        """Whether any message carries an image part."""
        return any(
            isinstance(part, ImageUrlPart)
            for message in self.messages
            if isinstance(message.content, list)
            for part in message.content
        )

    def to_messages(self) -> list[dict[str, Any]]:
        """Plain dicts for `tokenizer.apply_chat_template` / `processor.apply_chat_template`.

        Content is a string, or a list of `{"type": "text", "text"}` and
        `{"type": "image", "url"}` dicts; `developer` becomes `system`.
        """
        return [message.to_dict() for message in self.messages]


# --- chat completions: response ---------------------------------------------------------


def new_completion_id() -> str:
    """A fresh OpenAI-style completion id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0
    """Prompt tokens whose keys and values came from the prefix cache (`prefix_cache_mb`) instead of
    being computed again."""


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    """Tokens in the prompt (after the chat template)."""
    completion_tokens: int = 0
    """Tokens generated."""
    total_tokens: int = 0
    """Sum of the two."""
    prompt_tokens_details: PromptTokensDetails | None = None
    """Of the prompt tokens, how many the prefix cache supplied."""

    @classmethod
    def counted(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class TopLogprob(OpenAIBaseModel):
    token: str
    """The token's text."""
    logprob: float
    """Its log probability under the model."""
    bytes: list[int] | None = None
    """Its UTF-8 bytes (a token may hold part of a character)."""


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)
    """The most likely tokens at this position, `top_logprobs` of them."""


class ChoiceLogprobs(OpenAIBaseModel):
    content: list[TokenLogprob] | None = None
    """One entry per output token the model sampled (tokens the server wrote to close a constrained
    reply cut by max_tokens have none)."""
    refusal: list[TokenLogprob] | None = None
    """Always null."""


class FunctionCall(OpenAIBaseModel):
    name: str
    """The function called."""
    arguments: str
    """Its arguments as JSON text."""


class ToolCall(OpenAIBaseModel):
    id: str
    """The call's id, to be repeated as `tool_call_id` in the tool's answer."""
    type: Literal["function"] = "function"
    """Always `function`."""
    function: FunctionCall
    """The call."""


class ChatCompletionMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    """Always `assistant`."""
    content: str | None = None
    """The generated text (null when the reply is only tool calls)."""
    refusal: str | None = None
    """Always null: the server never refuses in words."""
    tool_calls: list[ToolCall] | None = None
    """The tools the reply calls."""


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatCompletionChoice(OpenAIBaseModel):
    index: int = 0
    """Position of this choice."""
    message: ChatCompletionMessage
    """The generated message."""
    finish_reason: FinishReason | None = None
    """`stop`: end of turn or a stop sequence; `length`: the token limit was reached (a constrained
    reply is still complete JSON); `tool_calls`: the reply calls tools."""
    logprobs: ChoiceLogprobs | None = None
    """With `logprobs: true`."""


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=new_completion_id)
    """Completion id."""
    object: Literal["chat.completion"] = "chat.completion"
    """Always `chat.completion`."""
    created: int = Field(default_factory=_now)
    """Unix time (seconds) of creation."""
    model: str
    """The model that answered."""
    choices: list[ChatCompletionChoice]
    """The generated choices (`n` of them)."""
    usage: UsageInfo
    """Token counts (completion tokens of every choice; the prompt once)."""


class FunctionCallDelta(OpenAIBaseModel):
    name: str | None = None
    """In a call's first chunk."""
    arguments: str | None = None
    """The next piece of the arguments' JSON text."""


class ToolCallDelta(OpenAIBaseModel):
    index: int
    """Which call of the reply this piece belongs to."""
    id: str | None = None
    """In a call's first chunk."""
    type: Literal["function"] | None = None
    """In a call's first chunk."""
    function: FunctionCallDelta
    """Name and/or the next piece of arguments."""


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    """Set on the first chunk only."""
    content: str | None = None
    """Newly generated text."""
    refusal: str | None = None
    """Null on the first chunk (OpenAI's), left out after: the server never refuses in words."""
    tool_calls: list[ToolCallDelta] | None = None
    """Newly generated pieces of tool calls."""

    @model_serializer(mode="wrap")  # no return annotation: the OpenAPI schema stays the model's own
    def _refusal_with_role(self, handler: SerializerFunctionWrapHandler):
        out = handler(self)
        if isinstance(out, dict) and self.role is not None:
            out.setdefault("refusal", None)
        return out


class ChatCompletionChunkChoice(NullKeysModel):
    null_keys = ("logprobs", "finish_reason")

    index: int = 0
    """Position of this choice."""
    delta: DeltaMessage
    """What changed since the previous chunk."""
    finish_reason: FinishReason | None = None
    """Set on the last content chunk."""
    logprobs: ChoiceLogprobs | None = None
    """With `logprobs: true`: those of this chunk's tokens."""


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    """Completion id, the same in every chunk of one stream."""
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    """Always `chat.completion.chunk`."""
    created: int = Field(default_factory=_now)
    """Unix time (seconds) of creation, the same in every chunk."""
    model: str
    """The model that answered."""
    choices: list[ChatCompletionChunkChoice]
    """Empty in the final usage chunk."""
    usage: UsageInfo | None = None
    """Only in the final chunk, with `stream_options.include_usage`."""


# --- text completions (/v1/completions) --------------------------------------------------


def _prompt_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        if value and all(isinstance(v, str) for v in value):
            return "strs"
        if value and all(isinstance(v, int) for v in value):
            return "ids"
        if value and all(isinstance(v, list) for v in value):
            return "id_lists"
    return None


TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1)]
Prompt = Annotated[
    Annotated[str, Tag("str")]
    | Annotated[list[str], Field(min_length=1), Tag("strs")]
    | Annotated[TokenIds, Tag("ids")]
    | Annotated[list[TokenIds], Field(min_length=1), Tag("id_lists")],
    Discriminator(
        _prompt_tag,
        custom_error_type="invalid_prompt",
        custom_error_message="prompt must be a string, a list of strings, a list of token ids or a list of such lists",
    ),
]


COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens of a text completion


class CompletionRequest(RequestModel):
    model: str
    """Model id or alias (LLM or VLM; the prompt is used as it is, without a chat template)."""
    prompt: Prompt
    """The text to continue: a string, several (one choice each), token ids, or lists of them."""
    suffix: str | None = None
    """Refused when set: insertion (fill-in-the-middle) is not served."""
    max_tokens: int | None = Field(default=None, ge=0)
    """Upper bound on generated tokens per choice. Left out or null: OpenAI's default, 16, or the model's
    `max_new_tokens` where that is lower (`default_max_tokens`). 0 only with `echo`: the prompt alone (scored
    with `logprobs`), nothing generated, as OpenAI's legacy models served it."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature; 0 means greedy decoding. Omitted: the model's generation_config.json's, else 1
    (OpenAI's default)."""
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    """Nucleus sampling probability mass."""
    n: int = Field(default=1, ge=1)
    """Choices per prompt (prompts times n at most `limits.max_choices`)."""
    best_of: int | None = Field(default=None, ge=1)
    """Only equal to n: ranking extra samples is not served."""
    stream: bool = False
    """Stream the completion as server-sent events."""
    stream_options: StreamOptions | None = None
    """`include_usage`: a last chunk with token usage; only with `stream: true`."""
    _stream_options = field_validator("stream_options")(stream_options_need_stream)
    _nullable = field_validator("n", "stream", "echo", mode="before")(none_is_default)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    """Log probabilities of each output token and of this many most likely alternatives (0-5)."""
    echo: bool = False
    """The prompt is returned before the completion; with `logprobs`, its tokens' log probabilities too (the
    first token's null: nothing comes before it)."""
    stop: Stop | None = None
    """Sequences at which generation stops (at most `limits.max_stop_sequences`, 4 by default)."""
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    """Subtracted from the logit of every token already generated."""
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    """Subtracted from the logit of every token once per time it was generated."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> bias from -100 to 100."""
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    """Seed for reproducible sampling."""
    priority: int = Field(default=0, ge=-(2**31), lt=2**31)
    """vLLM's extension: where requests wait in a replica (a full batch, the memory budget), lower values go
    first, arrivals in order among equals; running requests are not preempted. Only with the family's
    `scheduling_policy: priority`; otherwise anything but 0 is refused (400)."""
    user: str | None = None
    """End-user id, for logs."""

    _bias = field_validator("logit_bias")(ChatCompletionRequest._bias.__func__)  # type: ignore[attr-defined]

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not served: the models here only continue a prompt")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: Any) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError(f"best_of={value}: ranking extra samples is not served; send best_of equal to n")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def default_max_tokens(self, model_limit: int) -> int:
        """`max_tokens`, or where the client left it out, OpenAI's default within the model's own limit: a
        default the client never sent is not refused as if it had asked for more than the model allows."""
        return self.max_tokens if self.max_tokens is not None else min(COMPLETION_MAX_TOKENS, model_limit)

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class CompletionLogprobs(OpenAIBaseModel):
    tokens: list[str] = Field(default_factory=list)
    """Each token's text."""
    token_logprobs: list[float | None] = Field(default_factory=list)
    """Each token's log probability (null for an echoed prompt's first token)."""
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    """The most likely tokens at each position, text -> logprob."""
    text_offset: list[int] = Field(default_factory=list)
    """Where each token starts in `text`."""


class CompletionChoice(NullKeysModel):
    null_keys = ("logprobs", "finish_reason")

    text: str
    """The completion (after the prompt, with `echo`)."""
    index: int
    """Position of this choice: prompt index times n plus the sample's."""
    logprobs: CompletionLogprobs | None = None
    """With `logprobs`."""
    finish_reason: Literal["stop", "length"] | None = None
    """`stop`: the model ended or a stop sequence; `length`: the token limit."""


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    """Completion id."""
    object: Literal["text_completion"] = "text_completion"
    """Always `text_completion`."""
    created: int = Field(default_factory=_now)
    """Unix time (seconds) of creation."""
    model: str
    """The model that answered."""
    choices: list[CompletionChoice]
    """The completions."""
    usage: UsageInfo | None = None
    """Token counts (every prompt and every choice)."""


# --- models -----------------------------------------------------------------------------


class ModelCard(OpenAIBaseModel):
    id: str
    """Model id to pass as `model`."""
    object: Literal["model"] = "model"
    """Always `model`."""
    created: int = Field(default_factory=_now)
    """Unix time (seconds) the model was registered."""
    owned_by: str = "modelfleet"
    """Owner; always `modelfleet`."""

    # --- modelfleet extensions (not in OpenAI's schema) ---
    family: str | None = None
    """`llm`, `stt`, `tts` or `vlm`: which routes accept this model."""
    state: str | None = None
    """Loading state, e.g. `loading`, `ready`, `failed`."""
    device: str | None = None
    """Where the weights live, e.g. `cpu`, `cuda:0`."""
    loading_strategy: str | None = None
    """The placement/quantization strategy that succeeded."""
    demo: bool = False
    """Whether this is a tiny random-weight demo model."""
    aliases: list[str] = Field(default_factory=list)
    """Other names that route to this model."""
    adapter_targets: list[str] | None = None
    """A loaded LoRA adapter's parts of its base that it changes, by the model's own names: `language_model`,
    and for an adapter over a whole VLM also `vision_tower`, `multi_modal_projector` (LLaVA) or `visual`."""


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    """Always `list`."""
    data: list[ModelCard]
    """The served models."""


# --- audio ------------------------------------------------------------------------------

TranscriptionResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]


class FormModel(OpenAIBaseModel):
    """Base of multipart forms: only the declared parts are accepted (400 naming any other)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _stt_temperature(value: Any) -> Any:
    """OpenAI's range for transcriptions and translations, 0 to 1, with the value sent in the refusal (a form
    sends text: "nan" and "inf" parse as floats)."""
    try:
        temperature = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number from 0 to 1, got {value!r}") from None
    if not 0 <= temperature <= 1:
        raise ValueError(f"must be from 0 to 1 (0, the default, decodes greedily and falls back to higher "
                         f"temperatures where Whisper's thresholds fail), got {value}")
    return value


class TranscriptionForm(FormModel):
    """The multipart form of `/v1/audio/transcriptions`."""

    file: UploadFile
    """The audio file: WAV, FLAC, OGG (Vorbis/Opus), MP3, WebM (Opus), MP4/M4A (AAC, ALAC), AAC (ADTS) or AIFF,
    told apart by its bytes (not its name); any rate (8-192 kHz), mixed to mono."""
    model: str
    """Speech-to-text model id or alias."""
    language: str | None = None
    """ISO-639-1 (or -3) code of the spoken language; detected when omitted."""
    prompt: str | None = None
    """Text to guide the style or continue a previous segment."""
    response_format: TranscriptionResponseFormat = "json"
    """Output format."""
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    """0 (the default): greedy, and each piece of the audio that fails Whisper's thresholds is decoded again at
    higher temperatures (the STT family's `fallback_temperatures`); above 0: sampled at that temperature."""
    timestamp_granularities: list[Literal["segment", "word"]] = Field(
        default_factory=lambda: ["segment"], alias="timestamp_granularities[]")
    """Timestamp detail for `verbose_json` (the openai client sends `timestamp_granularities[]`): `segment`
    (one per piece the audio is cut into), `word` (Whisper's cross-attention alignment: `words` with start/end)."""
    stream: bool = False
    """Answer with server-sent events: `transcript.text.delta` per piece of the audio as it is
    transcribed, then `transcript.text.done` with the whole text and usage."""
    chunking_strategy: str | None = None
    """`auto` (the default: long audio cut at silences found by voice-activity detection), or a
    `server_vad` object as JSON. The openai client sends an object as the `chunking_strategy[...]` fields."""
    chunking_strategy_type: Literal["server_vad"] | None = Field(default=None, alias="chunking_strategy[type]")
    """`server_vad`: cut long audio at the silences the voice-activity detector finds, tuned by the fields below."""
    chunking_strategy_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, alias="chunking_strategy[threshold]")
    """Speech probability above which a 32 ms frame counts as speech (default 0.5)."""
    chunking_strategy_prefix_padding_ms: int | None = Field(
        default=None, ge=0, le=10000, alias="chunking_strategy[prefix_padding_ms]")
    """Silence kept before the speech that follows a cut (default 300 ms)."""
    chunking_strategy_silence_duration_ms: int | None = Field(
        default=None, ge=0, le=10000, alias="chunking_strategy[silence_duration_ms]")
    """A pause at least this long is preferred for a cut (default 500 ms)."""

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature(cls, value: Any) -> Any:
        return _stt_temperature(value)

    @field_validator("language")
    @classmethod
    def _language_code(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z]{2,3}", value):
            raise ValueError(f"must be an ISO-639-1 code such as 'en', got {value!r}")
        return value.lower() if value is not None else None

    @field_validator("chunking_strategy")
    @classmethod
    def _chunking(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        try:
            ServerVadChunking.model_validate_json(value)
        except ValueError:
            raise ValueError("must be 'auto' or a JSON object {\"type\": \"server_vad\", \"threshold\", "
                             "\"prefix_padding_ms\", \"silence_duration_ms\"}") from None
        return value

    def vad_options(self) -> ServerVadChunking | None:
        """The detector's settings asked for (None: the defaults)."""
        if self.chunking_strategy not in (None, "auto"):
            return ServerVadChunking.model_validate_json(self.chunking_strategy)
        fields = {"threshold": self.chunking_strategy_threshold,
                  "prefix_padding_ms": self.chunking_strategy_prefix_padding_ms,
                  "silence_duration_ms": self.chunking_strategy_silence_duration_ms}
        if self.chunking_strategy_type is None and all(v is None for v in fields.values()):
            return None
        return ServerVadChunking(**{k: v for k, v in fields.items() if v is not None})


class ServerVadChunking(RequestModel):
    """OpenAI's `server_vad` chunking strategy (and the Realtime session's turn detection knobs)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["server_vad"] = "server_vad"
    """Always `server_vad`."""
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    """Speech probability above which a 32 ms frame counts as speech."""
    prefix_padding_ms: int = Field(default=300, ge=0, le=10000)
    """Audio kept before detected speech."""
    silence_duration_ms: int = Field(default=500, ge=0, le=10000)
    """Pause that ends a turn, or that a cut prefers to fall in."""


class TranslationForm(FormModel):
    """The multipart form of `/v1/audio/translations` (Whisper's translate task: speech in any language
    to English text)."""

    file: UploadFile
    """The audio file: WAV, FLAC, OGG (Vorbis/Opus), MP3, WebM (Opus), MP4/M4A (AAC, ALAC), AAC (ADTS) or AIFF,
    told apart by its bytes (not its name); any rate (8-192 kHz), mixed to mono."""
    model: str
    """Speech-to-text model id or alias (a multilingual Whisper)."""
    prompt: str | None = None
    """Text to guide the style, in English."""
    response_format: TranscriptionResponseFormat = "json"
    """Output format."""
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    """0 (the default): greedy, with Whisper's temperature fallback; above 0: sampled at that temperature."""

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature(cls, value: Any) -> Any:
        return _stt_temperature(value)


class TranscriptionWord(OpenAIBaseModel):
    word: str
    """The word."""
    start: float
    """Start time in seconds."""
    end: float
    """End time in seconds."""


class TranscriptionSegment(OpenAIBaseModel):
    id: int
    """Index of the segment."""
    seek: int = 0
    """Where the segment's audio starts, in 10 ms frames (Whisper's seek offset)."""
    start: float
    """Start time in seconds."""
    end: float
    """End time in seconds."""
    text: str
    """Text of the segment."""
    tokens: list[int] = []
    """Token ids of the text."""
    temperature: float = 0.0
    """Temperature of the decode that stands (above the request's 0 where the temperature fallback ran)."""
    avg_logprob: float = 0.0
    """Average log-probability of its tokens and the end token (below -1: the decoding is doubtful)."""
    compression_ratio: float = 0.0
    """Length of the text over its zlib-compressed length (above 2.4: repetitive, likely a loop)."""
    no_speech_prob: float = 0.0
    """Probability of the <|nospeech|> token at the start of the segment (high with a low avg_logprob: silence)."""


class TranscriptionDurationUsage(OpenAIBaseModel):
    """whisper-1's usage: billed by the audio's length."""

    type: Literal["duration"] = "duration"
    """Always `duration`."""
    seconds: int
    """The decoded audio's duration, rounded up to a whole second as OpenAI's (8.47 s: 9)."""


class TranscriptionResponse(OpenAIBaseModel):
    text: str
    """The transcript."""
    usage: TranscriptionDurationUsage | None = None
    """The audio's duration (transcriptions; a translation has none, as OpenAI's)."""


class TranscriptionVerboseResponse(OpenAIBaseModel):
    task: Literal["transcribe", "translate"] = "transcribe"
    """`transcribe`, or `translate` from /v1/audio/translations."""
    language: str
    """Language of the audio (of the output, `english`, for a translation)."""
    duration: float
    """Duration of the audio in seconds."""
    text: str
    """The transcript."""
    segments: list[TranscriptionSegment] | None = None
    """Timed segments of the transcript (with `timestamp_granularities[]=segment`, the default)."""
    words: list[TranscriptionWord] | None = None
    """Timed words (with `timestamp_granularities[]=word`)."""
    usage: TranscriptionDurationUsage | None = None
    """The audio's duration (transcriptions; a translation has none, as OpenAI's)."""


class TranscriptionInputTokenDetails(OpenAIBaseModel):
    audio_tokens: int
    """The encoder positions the audio took (Whisper: 50 per second)."""
    text_tokens: int
    """The prompt's tokens the decoder read."""


class TranscriptionUsage(OpenAIBaseModel):
    type: Literal["tokens"] = "tokens"
    """Always `tokens`."""
    input_tokens: int
    """Audio tokens and the prompt's text tokens."""
    output_tokens: int
    """Text tokens generated."""
    total_tokens: int
    """Sum of the two."""
    input_token_details: TranscriptionInputTokenDetails
    """The input tokens by kind, as OpenAI's."""


class TranscriptTextDelta(OpenAIBaseModel):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str
    """The text of the next piece of the audio (with a leading space after the first)."""


class TranscriptTextDone(OpenAIBaseModel):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
    """The whole transcript."""
    usage: TranscriptionUsage
    """Token counts."""


SpeechFormat = Literal["wav", "flac", "pcm", "mp3", "opus", "aac"]


class CustomVoice(RequestModel):
    id: str = Field(max_length=256)
    """A custom voice's id (OpenAI's `{"id": "voice_..."}`): as a voice name here."""


class SpeechRequest(RequestModel):
    model: str
    """Text-to-speech model id or alias."""
    input: str = Field(min_length=1)
    """Text to speak (at most `limits.max_speech_input_chars`, 4096 by default)."""
    voice: str | CustomVoice | None = None
    """Voice name (or OpenAI's custom-voice object, whose id is taken as the name); models with a single
    voice ignore it."""
    response_format: SpeechFormat | None = None
    """Audio container/encoding; `pcm` is raw 16-bit little-endian mono, `aac` ADTS. Left out: `mp3`, as OpenAI's
    (`wav` where this machine's libsndfile cannot write mp3)."""
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    """Playback speed factor."""
    instructions: str | None = None
    """Style instructions; models that cannot follow them ignore them."""
    stream_format: Literal["audio", "sse"] = "audio"
    """`audio`: the audio itself, sent as it is synthesized (sentence by sentence) for `pcm`, `wav` (a
    streaming header), `opus` and `aac`, at once for `flac` and `mp3`; `sse`: server-sent events
    `speech.audio.delta` (base64 audio) then `speech.audio.done` (usage)."""

    _check_input = field_validator("input")(_not_blank)

    @property
    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, CustomVoice) else self.voice


class SpeechUsage(OpenAIBaseModel):
    input_tokens: int
    """The speech model's input tokens (characters or phonemes, by its tokenizer)."""
    output_tokens: int = 0
    """Audio tokens; 0: waveform models make samples, not tokens."""
    total_tokens: int
    """Sum of the two."""


class SpeechAudioDelta(OpenAIBaseModel):
    type: Literal["speech.audio.delta"] = "speech.audio.delta"
    audio: str
    """The next bytes of the audio, in `response_format`, base64-encoded."""


class SpeechAudioDone(OpenAIBaseModel):
    type: Literal["speech.audio.done"] = "speech.audio.done"
    usage: SpeechUsage
    """Token counts."""


# --- legacy seed routes -----------------------------------------------------------------


class GenerateRequest(RequestModel):
    query: str = Field(min_length=1)
    """The user's message."""
    system_prompt: str | None = None
    """Optional system prompt."""
    max_new_tokens: int | None = Field(default=None, ge=1)
    """Upper bound on generated tokens."""


class GenerateResponse(OpenAIBaseModel):
    response: str
    """The generated reply."""
    model: str
    """The model that answered."""


class TtsRequest(RequestModel):
    text: str = Field(min_length=1)
    """Text to speak (at most `limits.max_speech_input_chars`)."""

    _check_text = field_validator("text")(_not_blank)


# --- voice round trip (STT -> LLM -> TTS) -----------------------------------------------


class VoiceChatForm(FormModel):
    """The multipart form of `/v1/audio/chat`."""

    file: UploadFile
    """What the user said, as an audio file."""
    stt_model: str | None = None
    """Speech-to-text model (default: the first configured)."""
    llm_model: str | None = None
    """Chat model (default: the first configured LLM)."""
    tts_model: str | None = None
    """Text-to-speech model (default: the first configured)."""
    language: str | None = None
    """Spoken language, ISO-639-1; detected when omitted."""
    system_prompt: str | None = None
    """System prompt for the chat model."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Upper bound on the reply's tokens."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """The chat model's sampling temperature; 0 means greedy. Omitted: the model's generation_config.json's,
    else 1 (as a chat request's)."""
    response_format: SpeechFormat = "wav"
    """Format of the spoken reply."""
    stream: bool = False
    """Answer with server-sent events as the reply is made: `transcript` (what was heard), `reply.delta`
    (the LLM's text), `audio.delta` (base64 audio in `response_format`, each sentence synthesized while the
    LLM writes the next), then `done` with the whole reply and token usage."""

    _language = field_validator("language")(TranscriptionForm._language_code.__func__)  # type: ignore[attr-defined]


class LegacySttForm(FormModel):
    """The seed servers' `/stt` form."""

    audio: UploadFile
    """The audio file."""


class VoiceChatResponse(OpenAIBaseModel):
    transcript: str
    """What the speech-to-text model heard."""
    reply: str
    """What the language model answered."""
    audio: str
    """The spoken reply, base64-encoded."""
    audio_format: str
    """Format of `audio`, e.g. `wav`."""
    sample_rate: int
    """Sample rate of `audio` in Hz."""
    models: dict[str, str]
    """Model used for each step: keys `stt`, `llm`, `tts`."""


# --- /v1/audio/chat with stream=true: server-sent events ----------------------------------------


class VoiceTranscriptEvent(OpenAIBaseModel):
    type: Literal["transcript"] = "transcript"
    text: str
    """What the speech-to-text model heard."""


class VoiceReplyDelta(OpenAIBaseModel):
    type: Literal["reply.delta"] = "reply.delta"
    delta: str
    """The next text of the LLM's reply."""


class VoiceAudioDelta(OpenAIBaseModel):
    type: Literal["audio.delta"] = "audio.delta"
    audio: str
    """The next bytes of the spoken reply in `response_format`, base64-encoded."""


class VoiceUsage(OpenAIBaseModel):
    prompt_tokens: int = 0
    """The LLM's prompt tokens."""
    completion_tokens: int = 0
    """The LLM's reply tokens."""
    transcription_tokens: int = 0
    """Tokens the speech-to-text model generated."""
    speech_input_tokens: int = 0
    """The speech model's input tokens."""


class VoiceDone(OpenAIBaseModel):
    type: Literal["done"] = "done"
    transcript: str
    """What was heard."""
    reply: str
    """The whole reply."""
    finish_reason: str
    """`stop` or `length`, as a chat completion's."""
    audio_format: str
    """Format of the audio deltas."""
    sample_rate: int
    """Sample rate of the audio."""
    models: dict[str, str]
    """Model used for each step: keys `stt`, `llm`, `tts`."""
    usage: VoiceUsage
    """Token counts."""


def _form_aliases() -> frozenset[str]:
    """Multipart field names that are not Python identifiers (`timestamp_granularities[]`,
    `chunking_strategy[threshold]`): errors.py names them as the field at fault, not as a type label."""
    return frozenset(field.alias for form in (TranscriptionForm, TranslationForm, VoiceChatForm)
                     for field in form.model_fields.values() if field.alias)


FORM_ALIASES = _form_aliases()
