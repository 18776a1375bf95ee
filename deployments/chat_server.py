"""The shared body of the LLM and VLM deployments: batched and streamed chat completions.

Every request is admitted on its own before it may join a batch: the model looked up, its chat
template applied and tokenized (images processed), its length checked against the model's context
and its working memory against the replica's budget. A request that fails there gets its own 4xx;
its would-be batch-mates never see it. Plain classes: the builder turns them into deployments.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, ClassVar

from loading import LoadedModel, ModelSpec

from .admission import chat_request_bytes, decoded_image_bytes
from .batching import Batcher
from .errors import InvalidRequestError, context_length_exceeded
from .family_server import FamilyServer, raise_if_error
from .options import ChatOptions
from .params import ChatParams, ChatResult


class ChatServer(FamilyServer):
    Options: ClassVar[type[ChatOptions]] = ChatOptions

    def __init__(self, specs: list[ModelSpec], options: ChatOptions):
        super().__init__(specs, options)
        # Continuous batching (decode_loop.py) for models whose positions are plain token counts;
        # whole-request batches through generate() for the others (e.g. Qwen2-VL's 3-D rotary positions).
        self._decoder: Any = None  # the DecodeLoop, made on first use (it imports torch)
        self._decoding: asyncio.Future | None = None  # the inference thread's run of the loop
        self._chat_batch = Batcher(self._chat_batch_call, options.max_batch_size, options.batch_wait_timeout_s)
        self._longest_token: dict[int, int] = {}  # id(tokenizer) -> most characters one token decodes to

    # -- to be provided by the family --------------------------------------------------------------
    def encode(self, loaded: LoadedModel, params: ChatParams) -> dict[str, Any]:
        """One request's model inputs (batch dimension 1)."""
        raise NotImplementedError

    def validate(self, spec: ModelSpec, loaded: LoadedModel, params: ChatParams) -> None:
        """Per-request checks that must fail this request alone (400), not its batch."""

    # -- admission ----------------------------------------------------------------------------------
    async def _admit(self, params: ChatParams) -> int:
        """Checks that fail this request alone (4xx) before it can join a batch; returns the bytes
        of working memory it may need."""
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        params.model = spec.name
        self.validate(spec, loaded, params)
        context = context_length(loaded)
        prompt_limit, limit_name = prompt_token_limit(spec, context)
        self._refuse_overlong_text(loaded, params, prompt_limit, limit_name)
        # images arrive encoded; decoding them (in encode) is held to the memory budget like generation
        decoded = decoded_image_bytes(params.images)
        async with self.memory.hold(decoded, "the images of this request", param="messages"):
            params.inputs = await asyncio.to_thread(self.encode, loaded, params)
        prompt_tokens = int(params.inputs["input_ids"].shape[-1])
        if prompt_tokens > prompt_limit:
            raise context_length_exceeded(limit_name, prompt_limit, prompt_tokens)
        params.max_new_tokens = resolve_max_new_tokens(spec, params.max_new_tokens, prompt_tokens, context)
        return chat_request_bytes(loaded.config, prompt_tokens, params.max_new_tokens, len(params.images), decoded)

    def _refuse_overlong_text(self, loaded: LoadedModel, params: ChatParams, limit: int, limit_name: str) -> None:
        """A prompt whose characters cannot fit in `limit` tokens is refused before it is tokenized (no
        token decodes to more than the vocabulary's longest entry, so chars / longest <= tokens)."""
        tokenizer = loaded.tokenizer
        longest = self._longest_token.get(id(tokenizer))
        if longest is None:
            longest = self._longest_token[id(tokenizer)] = max((len(t) for t in tokenizer.get_vocab()), default=1)
        chars = sum(len(text) for text in message_texts(params.messages))
        if chars > limit * longest:
            raise context_length_exceeded(limit_name, limit, chars // longest, at_least=True)

    # -- serving ----------------------------------------------------------------------------------
    async def chat(self, params: ChatParams) -> ChatResult:
        need = await self._admit(params)
        async with self.memory.hold(need, "this chat request", param="messages"):
            return raise_if_error(await self._until_cancelled(params, self._generate(params)))

    async def _generate(self, params: ChatParams) -> ChatResult | BaseException:
        spec, loaded = await self.pool.get(params.model)
        if not uses_decode_loop(loaded):
            return await self._chat_batch(params)
        event_loop = asyncio.get_running_loop()
        outcome: asyncio.Future = event_loop.create_future()

        def done(result: ChatResult | BaseException) -> None:  # on the inference thread
            event_loop.call_soon_threadsafe(lambda: outcome.done() or outcome.set_result(result))

        if self._decoder is None:
            self._decoder = _decode_loop().DecodeLoop(self.options.max_batch_size, self.batch_stats)
        self._decoder.submit(spec, loaded, params, done)
        self._keep_decoding()
        return await outcome

    def _keep_decoding(self) -> None:
        """Run the decode loop on the inference thread while it has rows; restart it for a request that
        arrived just as it was finishing (its done-callback runs on this event loop, after any submit)."""
        if self._decoding is None or self._decoding.done():
            self._decoding = asyncio.ensure_future(self._infer(self._decoder.run))
            self._decoding.add_done_callback(lambda _: self._decoder.busy() and self._keep_decoding())

    async def _chat_batch_call(self, batch: list[ChatParams]) -> list[ChatResult | BaseException]:
        results = await self._run_groups(
            batch, ChatParams.sampling_key, lambda spec, loaded, items: _generation().generate_batch(spec, loaded, items)
        )
        for result in results:
            if isinstance(result, ChatResult) and result.finish_reason == "cancelled":
                # tokens made for a caller that left before its row was dropped: shows how soon that was
                self.batch_stats["cancelled_tokens"] = self.batch_stats.get("cancelled_tokens", 0) + result.completion_tokens
        return results

    async def chat_stream(self, params: ChatParams) -> AsyncIterator[dict]:
        """Yields {"delta": text}... then {"finish_reason", "usage"}; errors surface before the first chunk.

        A stream joins the same batches as plain requests: its deltas come from the batch's generate
        call through `params.sink`, and its final text from the batch's result for it."""
        need = await self._admit(params)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.memory.hold(need, "this chat request", param="messages"))
            loop = asyncio.get_running_loop()
            deltas: asyncio.Queue = asyncio.Queue()
            params.sink = lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text)
            done = asyncio.ensure_future(self._until_cancelled(params, self._generate(params)))
            # Runs after every delta the generate call queued: they were scheduled before its result.
            done.add_done_callback(lambda _: deltas.put_nowait(_END))
            sent = ""
            try:
                while (piece := await deltas.get()) is not _END:
                    sent += piece
                    yield {"delta": piece}
                result: ChatResult = raise_if_error(done.result())
            finally:
                done.cancel()  # the client went away: the row is dropped at generate's next step
        if len(result.text) > len(sent) and result.text.startswith(sent):
            yield {"delta": result.text[len(sent):]}  # what was held back for a possible stop string
        yield {
            "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
        }


def uses_decode_loop(loaded: LoadedModel) -> bool:
    """Whether the decode loop can run this model: its rotary positions must be plain token counts
    (multimodal 3-D positions, as Qwen2-VL's, need generate()'s own bookkeeping)."""
    text = getattr(loaded.config, "text_config", None) or loaded.config
    rope = getattr(text, "rope_scaling", None) or getattr(text, "rope_parameters", None) or {}
    return not (isinstance(rope, dict) and "mrope_section" in rope)


def message_texts(messages: list[dict]) -> list[str]:
    """Every piece of text in chat messages (string contents and text parts)."""
    texts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(part.get("text", "") for part in content if isinstance(part, dict))
    return texts


def context_length(loaded: LoadedModel) -> int | None:
    """Tokens the model can attend to (prompt + completion), from its config; None if it does not say."""
    config = getattr(loaded.config, "text_config", None) or loaded.config
    value = getattr(config, "max_position_embeddings", None)
    if not value:
        max_length = getattr(loaded.tokenizer, "model_max_length", None)
        value = max_length if isinstance(max_length, int) and max_length < 10**7 else None
    return int(value) if value else None


def prompt_token_limit(spec: ModelSpec, context: int | None) -> tuple[int, str]:
    """The bound on a prompt's tokens and its name for the error message."""
    context_limit = context - 1 if context else None  # room for at least one new token
    if spec.max_prompt_tokens is not None and (context_limit is None or spec.max_prompt_tokens < context_limit):
        return spec.max_prompt_tokens, "max_prompt_tokens"
    if context_limit is None:
        return 10**6, "max_prompt_tokens"  # a model with no stated context: still bounded
    return context_limit, "maximum context length"


def resolve_max_new_tokens(spec: ModelSpec, requested: int | None, prompt_tokens: int = 0,
                           context: int | None = None) -> int:
    """The request's generation limit: at most the model's max_new_tokens; an explicit request must also
    fit the context with the prompt (400), a default is cut to what fits."""
    room = context - prompt_tokens if context else None
    if requested is None:
        return max(1, min(spec.max_new_tokens, room if room is not None else spec.max_new_tokens))
    if requested > spec.max_new_tokens:
        raise InvalidRequestError(
            f"max_tokens={requested} exceeds the limit of model {spec.name!r} ({spec.max_new_tokens}; "
            "raise max_new_tokens for it in serve_config.yaml)",
            param="max_tokens",
        )
    if room is not None and requested > room:
        raise context_length_exceeded("maximum context length", context, prompt_tokens, requested)
    return requested


_END = object()  # closes a stream's queue of deltas


def _decode_loop():
    from . import decode_loop  # torch side, imported on first use

    return decode_loop


def _generation():
    """The torch-side module, imported on first use: by then the model (and torch) is loaded, and
    replica start-up stays free of ~5 s of imports on 2 cores."""
    from . import generation

    return generation
