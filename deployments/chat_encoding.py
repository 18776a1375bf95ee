"""A chat request as model inputs: the messages (and `tools`) through the chat template, then the
tokenizer; or, for /v1/completions, the prompt as it is.

No Ray and no HTTP here: the LLM and VLM replicas encode with it, and so do the in-process benchmark
(bench/continuous.py) and the GPU checks (tests/loading/test_on_gpu.py), which run where Ray is not
installed.
"""

from __future__ import annotations

import functools
from typing import Any

from jinja2 import TemplateError

from .params import ChatParams


class PromptRefused(ValueError):
    """The model's chat template or processor refused these messages: a template's own
    `raise_exception` ("roles must alternate", "system role not supported"), or an image placeholder in
    the text without its image. The client's to fix: a 400 on `param` (`messages`, or /v1/completions'
    `prompt`)."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


def render_chat(owner: Any, messages: list[dict], tools: list[dict] | None, params: ChatParams) -> str:
    """`owner`'s (a tokenizer's or processor's) apply_chat_template for a reply's prompt: the generation
    prompt after the messages, or (/tokenize's continue_final_message) the last message left open; with the
    request's chat_template_kwargs, each a variable of the template's own."""
    extra = template_kwargs(owner, params.template_kwargs)
    try:
        return owner.apply_chat_template(messages, tools=tools, add_generation_prompt=params.add_generation_prompt,
                                         continue_final_message=params.continue_final_message, tokenize=False,
                                         **extra)
    except TemplateError as exc:
        raise PromptRefused(f"the model's chat template refused these messages: {exc}") from None
    except ValueError as exc:
        if not params.continue_final_message:
            raise
        # transformers' own check: the last message must be there, with text the template writes
        raise PromptRefused(f"continue_final_message cannot continue these messages: {exc}",
                            param="continue_final_message") from None
    except (TypeError, KeyError, IndexError) as exc:  # a message shape the template does not handle
        raise PromptRefused(f"the model's chat template cannot render these messages ({type(exc).__name__}: "
                            f"{exc}); send each message's content as a string") from None


# Set by the server, never by a request's chat_template_kwargs: the conversation and what the request's own
# fields decide, and transformers' helpers (the special tokens' names are added per tokenizer).
RESERVED_TEMPLATE_VARIABLES = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "return_assistant_tokens_mask", "raise_exception", "strftime_now"})


def template_kwargs(owner: Any, requested: dict[str, Any] | None) -> dict[str, Any]:
    """A request's chat_template_kwargs (vLLM's field: Qwen3's `enable_thinking`, a template's date or
    persona), each checked to be a variable the model's template reads. vLLM drops the others without a
    word; a key the template does not read would change nothing, so it is refused, naming those it reads."""
    if not requested:
        return {}
    tokenizer = getattr(owner, "tokenizer", owner)
    special = set(getattr(tokenizer, "special_tokens_map", None) or {})
    offered = template_variables(getattr(owner, "chat_template", None)) - RESERVED_TEMPLATE_VARIABLES - special
    for key in requested:
        if key not in offered:
            reads = ", ".join(sorted(offered)) or "none a request may set"
            raise PromptRefused(f"chat_template_kwargs sets {key[:64]!r}, which this model's chat template does "
                                f"not take from a request (it takes: {reads})", param="chat_template_kwargs")
    return dict(requested)


@functools.lru_cache(maxsize=64)
def _variables(template: str) -> frozenset[str]:
    import jinja2
    import jinja2.meta

    try:  # transformers' own environment, with its {% generation %} tag (private: a plain one if it moves)
        from transformers.utils.chat_template_utils import _compile_jinja_template

        environment = _compile_jinja_template(template).environment
    except Exception:
        environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        names = jinja2.meta.find_undeclared_variables(environment.parse(template))
    except jinja2.TemplateError:
        return frozenset()
    return frozenset(names) - set(environment.globals)  # range, dict, namespace, ...: Jinja's, not inputs


def template_variables(template: str | dict[str, str] | None) -> frozenset[str]:
    """The variables a chat template reads from its context (a tokenizer's named templates: all of theirs)."""
    if isinstance(template, dict):
        return frozenset().union(*(_variables(t) for t in template.values() if isinstance(t, str)))
    return _variables(template) if isinstance(template, str) else frozenset()


def template_inputs(template: str | None, params: ChatParams) -> tuple[list[dict], list[dict] | None]:
    """The messages and `tools` to render: through the model's own template when it takes tools, else
    the documented fallback (tools.py). `tool_choice: none` renders no tools."""
    offered = params.tools if params.tools and params.tool_choice != "none" else None
    has_tool_history = any(m.get("tool_calls") or m.get("role") == "tool" for m in params.messages)
    if not offered and not has_tool_history:
        return params.messages, None
    from . import tools  # grammar support (llguidance) loads only when a request uses tools

    if tools.template_takes_tools(template):
        return params.messages, tools.template_tools(offered) if offered else None
    return tools.fallback_messages(params.messages, offered), None


def encode_prompt(tokenizer: Any, params: ChatParams) -> dict[str, Any]:
    """/v1/completions: the prompt as it is (text with the tokenizer's own special tokens, or ids)."""
    import torch

    if isinstance(params.prompt, list):
        ids = torch.tensor([params.prompt], dtype=torch.long)
    else:
        ids = tokenizer(params.prompt, return_tensors="pt", add_special_tokens=params.add_special_tokens)["input_ids"]
    if ids.shape[-1] == 0:  # "" (OpenAI continues from its start token) was a 500 in the model's forward
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise PromptRefused("the prompt is empty and this model's tokenizer has no start token to begin from",
                                param="prompt")
        ids = torch.tensor([[start]], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def encode_text_chat(tokenizer: Any, params: ChatParams) -> dict[str, Any]:
    """A text-only model's inputs (batch dimension 1). The template writes the special tokens, so the
    tokenizer adds none of its own (a second BOS would change the answer)."""
    if params.prompt is not None:
        return encode_prompt(tokenizer, params)
    messages, tools = template_inputs(tokenizer.chat_template, params)
    text = render_chat(tokenizer, [as_text(message) for message in messages], tools, params)
    return dict(tokenizer(text, return_tensors="pt", add_special_tokens=False))


def as_text(message: dict) -> dict:
    """A message whose content is a list of text parts (what LangChain, LiteLLM and the openai SDK's typed
    parts send) with that content as one string, the parts joined by newlines as vLLM joins them: most
    text models' templates concatenate `message['content']` to a string (SmolLM2's, Qwen2.5's), and a
    list there was a 500."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    return {**message, "content": "\n".join(part.get("text", "") for part in content if part.get("type") == "text")}
