"""Wire models of vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info.

Shapes and defaults are vLLM's (entrypoints/serve/tokenize/protocol.py), so that what reads a vLLM server's
tokenizer (lm-evaluation-harness's `tokenizer_backend=remote`, chat apps counting tokens) reads ours. Where
vLLM serves one model, `model` may be left out here too: the first configured LLM (else VLM) answers.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator

from .protocol import ChatMessage, OpenAIBaseModel, RequestModel, Tool

MODEL_DOC = ("Model id or alias (an LLM or VLM, or a LoRA adapter on one); left out: the first configured "
             "LLM, else VLM (vLLM serves one model, and lm-evaluation-harness's remote tokenizer sends none).")


def _null_is_false(value: Any) -> Any:
    """vLLM types return_token_strs `bool | None`: null is its default, false."""
    return False if value is None else value


class TokenizeCompletionRequest(RequestModel):
    model: str | None = Field(default=None, description=MODEL_DOC)
    prompt: str
    """The text, tokenized as `/v1/completions` tokenizes a string prompt (no chat template)."""
    add_special_tokens: bool = True
    """Add the tokenizer's own special tokens (a BOS, where the tokenizer adds one), as a completion does."""
    return_token_strs: bool = False
    """Also return each token as the vocabulary spells it (`token_strs`); null: false."""

    _strs = field_validator("return_token_strs", mode="before")(_null_is_false)


def _refuse_true(value: bool) -> bool:
    """add_special_tokens with messages: only false is served."""
    if value:
        raise ValueError("true is not served with messages: the chat template writes the special tokens, as for "
                         "a chat completion; send false, or tokenize the rendered text as a prompt")
    return value


def _refuse_given(value: Any, info: ValidationInfo) -> Any:
    """vLLM's fields that render a prompt as a chat completion here never renders one: a count made with them
    would not be a chat's count, so they are refused by name."""
    if value:
        raise ValueError(f"{UNSERVED_CHAT_FIELDS[info.field_name or '']}; leave it out")
    return value


UNSERVED_CHAT_FIELDS = {
    "chat_template": "a request's own chat template is not served (chats here render the model's)",
    "mm_processor_kwargs": "processor arguments are not served (chats here use the model's processor as it is)",
    "media_io_kwargs": "media arguments are not served",
}


class TokenizeChatRequest(RequestModel):
    model: str | None = Field(default=None, description=MODEL_DOC)
    messages: list[ChatMessage] = Field(min_length=1)
    """A conversation, rendered exactly as `/v1/chat/completions` renders it (`count` is that request's
    `usage.prompt_tokens`); with a VLM, image parts count the tokens the processor gives them."""
    add_generation_prompt: bool | None = None
    """End with the template's generation prompt (the assistant's turn), as a chat completion does. Left
    out: true, unless `continue_final_message`."""
    continue_final_message: bool = False
    """Leave the last message open (no end-of-turn after it), to count a prefilled reply; not with
    `add_generation_prompt: true`."""
    add_special_tokens: bool = False
    """Only false (vLLM's default): the chat template writes the special tokens, as for a chat completion."""
    return_token_strs: bool = False
    """Also return each token as the vocabulary spells it (`token_strs`)."""
    tools: list[Tool] | None = None
    """Functions, rendered as a chat completion with these `tools` renders them (the model's template, or
    the documented fallback)."""
    chat_template: str | None = None
    """vLLM's; refused: chats here render the model's own template."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Variables for the model's chat template, as a chat completion's `chat_template_kwargs` (the count is that
    chat's)."""
    mm_processor_kwargs: dict[str, Any] | None = None
    """vLLM's; refused."""
    media_io_kwargs: dict[str, Any] | None = None
    """vLLM's; refused."""

    _special = field_validator("add_special_tokens")(_refuse_true)
    _strs = field_validator("return_token_strs", mode="before")(_null_is_false)
    _unserved = field_validator(*UNSERVED_CHAT_FIELDS)(_refuse_given)

    @field_validator("continue_final_message")
    @classmethod
    def _one_ending(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("add_generation_prompt"):
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: the first "
                             "leaves the last message open, the second starts a new assistant turn")
        return value

    def generation_prompt(self) -> bool:
        return not self.continue_final_message if self.add_generation_prompt is None else self.add_generation_prompt

    def to_messages(self) -> list[dict[str, Any]]:
        return [message.to_dict() for message in self.messages]


def _tokenize_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        # the other kind's field sent as null is left out (vLLM's union takes such a body too)
        prompt, messages = value.get("prompt") is not None, value.get("messages") is not None
        return None if prompt == messages else "TokenizeCompletionRequest" if prompt else "TokenizeChatRequest"
    return type(value).__name__


# Tags are the class names: errors.py reads CamelCase parts of an error's location as labels, not fields.
TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("TokenizeCompletionRequest")]
    | Annotated[TokenizeChatRequest, Tag("TokenizeChatRequest")],
    Discriminator(
        _tokenize_kind,
        custom_error_type="invalid_tokenize_request",
        custom_error_message="a /tokenize body has either 'prompt' (a text) or 'messages' (a chat), one of them",
    ),
]


class TokenizeResponse(OpenAIBaseModel):
    count: int
    """Tokens in `tokens`."""
    max_model_len: int | None
    """The model's context (prompt and completion together), from its config; null where it states none."""
    tokens: list[int]
    """The token ids."""
    token_strs: list[str] | None = None
    """With `return_token_strs`: each token as the vocabulary spells it (byte-level BPE writes a space `Ġ`)."""


class DetokenizeRequest(RequestModel):
    model: str | None = Field(default=None, description=MODEL_DOC)
    tokens: list[Annotated[int, Field(ge=0)]]
    """Token ids of the model's vocabulary (at most its context's worth), decoded with their special tokens."""


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
    """The text of the tokens."""


class TokenizerInfoResponse(OpenAIBaseModel):
    """The tokenizer's configuration, as its tokenizer_config.json gives it (the keys transformers read it
    with), less file paths; the special tokens as text."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    """The tokenizer's class in this server's transformers."""
    chat_template: str | None = None
    """The template chats are rendered with (a VLM's processor's)."""
    bos_token: str | None = None
    """Start-of-text token, if the tokenizer has one."""
    eos_token: str | None = None
    """End-of-text (or end-of-turn) token."""
    pad_token: str | None = None
    """Padding token."""
    unk_token: str | None = None
    """Unknown-token token."""
