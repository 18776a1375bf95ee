"""POST /v1/completions: OpenAI's legacy text completion, for the tools that still use it.

The prompt is continued as it is (no chat template), by the same LLM and VLM replicas and decode
loop as chats: each prompt times `n` is one row. `suffix` is refused (no insertion); `echo` returns
the prompt first (with `logprobs`, its tokens' own: what evaluation harnesses score a text by);
`logprobs` (0-5) gives OpenAI's legacy shape.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from loading import Family

from ..errors import InvalidRequestError, error_sse_event
from ..limits import check_chat, check_choices, check_generation_features
from ..params import ChatParams, ChatResult
from ..protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo
from ..sse import DONE, merged, prepend, with_null_usage
from .chat import fan_out
from .common import ERRORS, IngressDep, WaitDep, all_or_cancelled, first_items

router = APIRouter(tags=["completions"], responses=ERRORS)


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "A text_completion, or with `stream: true` text_completion events"}},
)
async def create_completion(body: CompletionRequest, ingress: IngressDep, wait_s: WaitDep):
    prompts = body.prompts()
    if body.max_tokens == 0 and not body.echo:
        raise InvalidRequestError("max_tokens=0 generates nothing: it is served with echo (the prompt returned, "
                                  "scored with logprobs); send max_tokens >= 1 otherwise", param="max_tokens")
    if len(prompts) > 1:  # each prompt is n choices: the list of prompts is what a client may not know to shorten
        check_choices(len(prompts) * body.n, ingress.limits, "prompt", f"{len(prompts)} prompts times n={body.n}")
    check_choices(body.n, ingress.limits)
    check_chat(1, body.stop_list(), ingress.limits)
    check_generation_features(0, len(body.logit_bias or {}), [], ingress.limits)
    spec = ingress.spec(body.model, Family.LLM, Family.VLM)
    max_tokens = body.default_max_tokens(spec.max_new_tokens)
    choices: list[ChatParams] = []
    for prompt in prompts:
        params = await ingress.chat_params(
            spec, [], wait_s, prompt=prompt, echo=body.echo, max_new_tokens=max_tokens,
            temperature=body.temperature, top_p=body.top_p, stop=body.stop_list(), seed=body.seed,
            priority=body.priority,
            logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias={int(k): float(v) for k, v in body.logit_bias.items()} if body.logit_bias else None,
        )
        choices += fan_out(params, body.n)
    if body.stream:
        streams = [ingress.chat_stream(p) for p in choices]
        firsts = await first_items(streams)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        items = merged([prepend(first, rest) for first, rest in zip(firsts, streams, strict=True)])
        return StreamingResponse(completion_events(body.model, items, include_usage, body.n),
                                 media_type="text/event-stream")
    results: list[ChatResult] = await all_or_cancelled(ingress.chat(p) for p in choices)
    prompt_tokens = sum(r.prompt_tokens for r in results[:: body.n])  # each prompt once
    completion_tokens = sum(r.completion_tokens for r in results)
    return CompletionResponse(
        model=body.model,
        usage=UsageInfo.counted(prompt_tokens, completion_tokens, sum(r.cached_tokens for r in results[:: body.n])),
        choices=[CompletionChoice(text=r.text, index=i, finish_reason=r.finish_reason,  # type: ignore[arg-type]
                                  logprobs=legacy_logprobs(r.logprobs) if r.logprobs is not None else None)
                 for i, r in enumerate(results)],
    )


class TextOffsets:
    """Characters of a choice's text before each of its tokens, from the tokens' bytes: a token may hold part
    of a character (counted once whole; invalid bytes as the U+FFFD the text shows). Kept across a stream's
    chunks, whose text lengths do not follow the tokens (a stop string's last characters are held back)."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0

    def take(self, data: bytes) -> int:
        offset = self.chars
        self.chars += len(self.decoder.decode(data))
        return offset


def legacy_logprobs(entries: list[dict], offsets: TextOffsets | None = None) -> CompletionLogprobs:
    """OpenAI chat-style logprob entries in the completions API's older shape. A token that is part of a
    character (CJK, emoji on byte-level vocabularies) is named by its bytes, "bytes:\\xe4\\xbd", as OpenAI
    names it: as "\ufffd" several alternatives were one key of top_logprobs. `text_offset` counts the
    characters of the text before each token (`offsets`: the choice's count so far, in a stream)."""
    out = CompletionLogprobs()
    offsets = offsets or TextOffsets()
    for entry in entries:
        out.tokens.append(legacy_token(entry))
        out.token_logprobs.append(entry["logprob"])
        out.top_logprobs.append({legacy_token(top): top["logprob"] for top in entry["top_logprobs"]}
                                if entry["logprob"] is not None else None)
        out.text_offset.append(offsets.take(bytes(entry["bytes"])))
    return out


def legacy_token(entry: dict) -> str:
    data = bytes(entry["bytes"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)


async def completion_events(model: str, items: AsyncIterator[tuple[int, dict]], include_usage: bool,
                            n: int) -> AsyncIterator[str]:
    """text_completion chunks: text deltas per choice, a finish_reason per choice, optional usage, [DONE]."""
    response = CompletionResponse(model=model, choices=[])  # one id and one `created` for every chunk
    offsets: dict[int, TextOffsets] = {}
    prompt_tokens, completion_tokens, cached_tokens = 0, 0, 0

    def event(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        chunk = response.model_copy(update={"choices": choices, "usage": usage})
        return f"data: {with_null_usage(chunk.model_dump_json(exclude_none=True), include_usage and usage is None)}\n\n"

    held: list[str] = []  # a finish_reason goes out with what follows it: one write to the socket, not two
    try:
        async for index, item in items:
            if "delta" in item:
                logprobs = (legacy_logprobs(item["logprobs"], offsets.setdefault(index, TextOffsets()))
                            if item.get("logprobs") else None)
                yield "".join(held) + event([CompletionChoice(text=item["delta"], index=index, logprobs=logprobs)])
                held = []
                continue
            held.append(event([CompletionChoice(text="", index=index, finish_reason=item["finish_reason"])]))
            if index % n == 0:
                prompt_tokens += item["usage"]["prompt_tokens"]
                cached_tokens += item["usage"].get("cached_tokens", 0)
            completion_tokens += item["usage"]["completion_tokens"]
        if include_usage:
            held.append(event([], UsageInfo.counted(prompt_tokens, completion_tokens, cached_tokens)))
    except Exception as exc:  # headers are sent: report the failure in-band, then end the stream
        held.append(error_sse_event(exc))
    yield "".join(held) + DONE
