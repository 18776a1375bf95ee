"""The shared body of the LLM and VLM deployments: batched and streamed chat completions.

Every request is admitted on its own before it may join a batch: the model looked up, its chat
template applied and tokenized (images processed), its length checked against the model's context
and its working memory against the replica's budget. A request that fails there gets its own 4xx;
its would-be batch-mates never see it. Plain classes: the builder turns them into deployments.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from loading import LoadedModel, ModelSpec

from . import tokenization
from .admission import Held, chat_request_bytes, decoded_image_bytes, settle, to_thread_held
from .batching import Batcher
from .errors import InvalidRequestError, context_length_exceeded
from .family_server import FamilyServer, cancelled, raise_if_error
from .options import ChatOptions
from .params import ChatParams, ChatResult, TokenizeResult, TokenizerQuery
from .wakeups import call_soon


class ChatServer(FamilyServer):
    Options: ClassVar[type[ChatOptions]] = ChatOptions

    def __init__(self, specs: list[ModelSpec], options: ChatOptions):
        super().__init__(specs, options)
        # Continuous batching (decode_loop.py) for models whose positions are plain token counts;
        # whole-request batches through generate() for the others (e.g. Qwen2-VL's 3-D rotary positions).
        self._decoder: Any = None  # the DecodeLoop, made on first use (it imports torch)
        self._decoding: asyncio.Future | None = None  # the inference thread's run of the loop
        self._chat_batch = Batcher(self._chat_batch_call, options.max_batch_size, options.batch_wait_timeout_s,
                                   priority=lambda params: params.priority, abandoned=cancelled)
        self.batch_stats["scheduling_policy"] = options.scheduling_policy  # shown in /health beside the counters
        self.batch_stats["turn_ends_weighed"] = 0  # Realtime semantic_vad pauses scored (end_of_turn)

    # -- to be provided by the family --------------------------------------------------------------
    def encode(self, loaded: LoadedModel, params: ChatParams) -> dict[str, Any]:
        """One request's model inputs (batch dimension 1)."""
        raise NotImplementedError

    def image_size(self, data: bytes) -> tuple[int, int]:
        """An image's (width, height) from its header, for the memory estimate (called in a thread)."""
        from .media import image_size

        return image_size(data)

    def validate(self, spec: ModelSpec, loaded: LoadedModel, params: ChatParams) -> None:
        """Per-request checks that must fail this request alone (400), not its batch."""

    # -- admission ----------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _admitted(self, params: ChatParams) -> AsyncIterator[tuple[ModelSpec, LoadedModel]]:
        """Checks that fail this request alone (4xx) before it can join a batch, then holds the working
        memory it may need for the block; yields the model it is served by. The request keeps that model
        to its end: looked up again by name after generating, one evicted or re-added meanwhile answered a
        finished request with a 503 "still loading"."""
        async with self._encoded(params) as (spec, loaded, held, decoded):
            prompt_tokens = params.prompt_length
            params.max_new_tokens = resolve_max_new_tokens(spec, params.max_new_tokens, prompt_tokens,
                                                           context_length(loaded), params.max_tokens_param,
                                                           params.prompt_param)
            if params.constraint is not None:
                params.grammar = await to_thread_held(self._compile, loaded, params, logits_width(loaded))
            need = chat_request_bytes(loaded.config, prompt_tokens, params.max_new_tokens, len(params.images), decoded,
                                      padding=self.options.batch_length_ratio)
            await held.grow(need, "this chat request", param=params.prompt_param)
            yield spec, loaded

    @contextlib.asynccontextmanager
    async def _encoded(self, params: ChatParams) -> AsyncIterator[tuple[ModelSpec, LoadedModel, Held, int]]:
        """The request's model and checks, then its prompt encoded (`params.inputs`) within the model's prompt
        limit, the memory of its decoded images held for the block: what a chat is admitted with, and what
        /tokenize counts (so its count is a chat's usage.prompt_tokens). Yields the model, the hold and the
        decoded images' bytes."""
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        params.model, params.served = spec.name, (spec, loaded)
        self.validate(spec, loaded, params)
        features = params.loop_features()
        if features and not uses_decode_loop(loaded):
            raise InvalidRequestError(
                f"model {spec.name!r} generates through transformers' generate() (its rotary positions are 3-D, "
                f"as Qwen2-VL's), which does not serve {', '.join(features)} here; send the request without "
                "it, or to a model served by the decode loop", param=features[0])
        width = logits_width(loaded)
        for token in params.logit_bias or {}:
            if token >= width:
                raise InvalidRequestError(f"logit_bias names token {token}, but model {spec.name!r} has "
                                          f"{width} tokens (0-{width - 1})", param="logit_bias")
        if isinstance(params.prompt, list) and params.prompt:  # /v1/completions' token ids: each must have an embedding
            rows, top = embedding_rows(loaded), max(params.prompt)
            if top >= rows:
                raise InvalidRequestError(f"prompt holds token {top}, but model {spec.name!r} has {rows} tokens "
                                          f"(0-{rows - 1})", param="prompt")
        prompt_limit, limit_name = prompt_token_limit(spec, context_length(loaded))
        self._refuse_overlong_text(loaded, params, prompt_limit, limit_name)
        # images arrive encoded; decoding them (in encode) is held to the memory budget like generation
        image_processor = getattr(loaded.processor, "image_processor", None) if params.images else None
        decoded = (await asyncio.to_thread(decoded_image_bytes, params.images, image_processor, self.image_size)
                   if params.images else 0)
        # The decoded size is held from the decode on: a request waiting for the rest of its estimate keeps
        # its processed images (up to ~300 MB per image for Qwen2-VL's largest), and they stay counted.
        async with self.memory.hold(decoded, "the images of this request", param="messages",
                                    priority=params.priority) as held:
            if encodes_inline(params):
                params.inputs = self.encode(loaded, params)
            else:
                params.inputs = await to_thread_held(self.encode, loaded, params)
            if params.prompt_length > prompt_limit:
                raise context_length_exceeded(limit_name, prompt_limit, params.prompt_length,
                                              param=params.prompt_param)
            yield spec, loaded, held, decoded

    # -- the tokenizer routes: /tokenize, /detokenize, /tokenizer_info ---------------------------------
    async def tokenize(self, params: ChatParams, with_strs: bool = False) -> TokenizeResult:
        """The prompt's tokens as a chat completion (or a completion) of the same request counts them: the
        same checks and encoding (`_encoded`), nothing generated."""
        if params.prompt == "":  # a completion continues "" from the start token; here: what the tokenizer says
            spec, loaded = await self.pool.get(params.model, params.wait_s)
            ids = list(loaded.tokenizer("", add_special_tokens=params.add_special_tokens)["input_ids"])
        else:
            async with self._encoded(params) as (spec, loaded, _, _):
                assert params.inputs is not None
                ids = params.inputs["input_ids"][0].tolist()
        strs = tokenization.token_strs(loaded.tokenizer, ids) if with_strs else None
        return TokenizeResult(ids, context_length(loaded), strs)

    async def detokenize(self, query: TokenizerQuery) -> str:
        spec, loaded = await self.pool.get(query.model, query.wait_s)
        limit = context_length(loaded) or prompt_token_limit(spec, None)[0]
        tokenization.check_ids(loaded.tokenizer, query.tokens, spec.name, limit)
        if len(query.tokens) <= INLINE_ENCODE_CHARS:  # ~ms: cheaper than a hop to a thread
            return tokenization.detokenize(loaded.tokenizer, query.tokens)
        return await asyncio.to_thread(tokenization.detokenize, loaded.tokenizer, query.tokens)

    async def tokenizer_info(self, query: TokenizerQuery) -> dict[str, Any]:
        _, loaded = await self.pool.get(query.model, query.wait_s)
        # the template chats are rendered with: a VLM's processor's, else the tokenizer's
        template = getattr(loaded.processor, "chat_template", None) or getattr(loaded.tokenizer, "chat_template", None)
        return tokenization.tokenizer_info(loaded.tokenizer, template if isinstance(template, str) else None)

    # -- Realtime's semantic_vad -----------------------------------------------------------------------
    async def end_of_turn(self, model: str, heard: str, answered: str | None) -> float | None:
        """The probability that the user's words `heard` (after the reply `answered`) end their message
        (end_of_turn.py); None where the model's chat template gives nothing to score."""
        from . import end_of_turn

        _, loaded = await self.pool.get(model, 0)
        owner = loaded.processor if getattr(loaded.processor, "chat_template", None) else loaded.tokenizer
        try:
            ids, closing = end_of_turn.turn_prefix(owner, heard, answered)
        except end_of_turn.NoTurnEnd:
            return None
        probability = await self._infer_model(loaded, end_of_turn.closing_probability, loaded, ids, closing)
        self.batch_stats["turn_ends_weighed"] += 1
        return probability

    def _compile(self, loaded: LoadedModel, params: ChatParams, width: int) -> Any:
        """The request's grammar for its row (cached per grammar and tokenizer); 400 if it cannot be
        enforced or cannot close within max_tokens."""
        from . import structured

        end_ids = _generation().end_token_ids(loaded)
        try:
            return structured.compile_row(params.constraint, loaded.tokenizer, width, end_ids,
                                          params.max_new_tokens or 1)
        finally:  # shown in /health with the batching counters
            stats = structured.CACHE.stats
            self.batch_stats["grammars_compiled"] = stats["compiled"]
            self.batch_stats["grammar_cache_hits"] = stats["cache_hits"]
            self.batch_stats["grammar_compile_ms_total"] = round(stats["compile_ms_total"], 1)

    def _refuse_overlong_text(self, loaded: LoadedModel, params: ChatParams, limit: int, limit_name: str) -> None:
        """A prompt whose characters cannot fit in `limit` tokens is refused before it is tokenized (no
        token decodes to more than the vocabulary's longest entry, so chars / longest <= tokens)."""
        from .row_logits import kept_on

        tokenizer = loaded.tokenizer
        longest = kept_on(tokenizer, "_modelfleet_longest_token",  # most characters one token decodes to
                          lambda: max((len(t) for t in tokenizer.get_vocab()), default=1))
        chars = sum(len(text) for text in rendered_texts(params))
        if chars > limit * longest:
            raise context_length_exceeded(limit_name, limit, chars // longest, at_least=True,
                                          param=params.prompt_param)

    # -- serving ----------------------------------------------------------------------------------
    async def chat(self, params: ChatParams) -> ChatResult:
        arrived = time.monotonic()
        with self._observed(params) as params.running:
            async with self._admitted(params) as (spec, loaded):
                result = raise_if_error(await self._until_cancelled(params, self._generate(params, spec, loaded)))
                echoed = await self._echo(loaded, params) if params.echo else None
        self.metrics.generated(params.model, arrived, params.first_token_at, result.prompt_tokens,
                               result.completion_tokens, result.cached_tokens)
        return self._finish_result(params, result, loaded, echoed)

    def _finish_result(self, params: ChatParams, result: ChatResult, loaded: LoadedModel,
                       echoed: tuple[str, list[dict]] | None) -> ChatResult:
        """Logprobs as OpenAI writes them, tool calls parsed out of the reply, and the `echo`ed prompt."""
        if result.logprobs is not None:
            from .row_logits import as_openai

            result.logprobs = as_openai(loaded.tokenizer, result.logprobs)  # type: ignore[arg-type]
        if params.tools and params.tool_choice != "none":
            content, calls = tools_module().parse_calls(result.text, params.tools, params.parallel_tool_calls)
            if calls:
                result.tool_calls, result.content = calls, content  # a call max_tokens cut stays 'length'
                result.finish_reason = "tool_calls" if result.finish_reason == "stop" else result.finish_reason
        if echoed is not None:
            text, entries = echoed
            result.text = text + result.text
            if result.logprobs is not None:
                result.logprobs = entries + result.logprobs
        return result

    async def _echo(self, loaded: LoadedModel, params: ChatParams) -> tuple[str, list[dict]]:
        """/v1/completions `echo`: the prompt's text and, with `logprobs`, its tokens' logprob entries
        (the model's figures, deployments/prompt_logprobs.py: one forward of the prompt)."""
        from .prompt_logprobs import prompt_logprobs
        from .row_logits import as_openai, special_ids, token_bytes

        tokenizer = loaded.tokenizer
        assert params.inputs is not None
        ids = params.inputs["input_ids"][0].tolist()
        text = params.prompt if isinstance(params.prompt, str) else tokenizer.decode(ids)
        if not params.logprobs:
            return text, []
        scored = await self._infer_model(loaded, prompt_logprobs, loaded, ids, params.top_logprobs)
        if isinstance(params.prompt, str):
            # a start token the tokenizer added (Llama's <s>, <|begin_of_text|>) is not in the client's text:
            # its entry made every text_offset after the prompt point that many characters too far (the
            # tokens after it keep their figures, which it conditioned)
            while ids and ids[0] in special_ids(tokenizer) and not text.startswith(tokenizer.decode(ids[:1])):
                ids, scored = ids[1:], scored[1:]
        entries = []
        for i, (token, entry) in enumerate(zip(ids, scored, strict=True)):
            if entry is None:  # the first token: nothing before it to score it by
                data = token_bytes(tokenizer, token, first=i == 0)  # a SentencePiece decoder strips the first space
                entries.append({"token": data.decode("utf-8", errors="replace"), "logprob": None,
                                "bytes": list(data), "top_logprobs": []})
            else:
                entries += as_openai(tokenizer, [entry], start=i)
        return text, entries

    async def _generate(self, params: ChatParams, spec: ModelSpec, loaded: LoadedModel) -> ChatResult | BaseException:
        if params.max_new_tokens == 0:  # /v1/completions' max_tokens 0 with echo: the prompt alone, scored by _echo
            assert params.inputs is not None
            return ChatResult("", int(params.inputs["input_ids"].shape[1]), 0, "length",
                              logprobs=[] if params.logprobs else None)
        if not uses_decode_loop(loaded):
            return await self._chat_batch(params)
        event_loop = asyncio.get_running_loop()
        outcome: asyncio.Future = event_loop.create_future()

        def done(result: ChatResult | BaseException) -> None:  # on the inference thread
            call_soon(event_loop, lambda: outcome.done() or outcome.set_result(result))

        if self._decoder is None:
            self._decoder = _decode_loop().DecodeLoop.for_options(self.options, self.batch_stats, self._stepped,
                                                                  self.threads.computing)
        self._decoder.submit(spec, loaded, params, done)
        self._keep_decoding()
        return await outcome

    def _cancelled(self) -> None:
        if self._decoder is not None:  # a row held for a place lets go of its memory at the next step
            self._decoder.cancelled()

    def _stepped(self, model: str, rows: int) -> None:
        """After each decode step (inference thread): the batch-size metric, and the step as progress."""
        self._progressed()
        self.metrics.batch(model, rows)

    def _keep_decoding(self) -> None:
        """Run the decode loop on the inference thread while it has rows; restart it for a request that
        arrived just as it was finishing (its done-callback runs on this event loop, after any submit)."""
        # a run left on another event loop (one that ended while it finished: in-process use with several
        # asyncio.run calls) never completes here, so it must not keep a new request from a run of its own
        decoding = self._decoding
        if decoding is None or decoding.done() or decoding.get_loop() is not asyncio.get_running_loop():
            self._decoding = asyncio.ensure_future(self._infer(self._decoder.run, self._calls_waiting))
            # (a run cancelled is its event loop closing: a run started then would never be awaited)
            self._decoding.add_done_callback(
                lambda run: not run.cancelled() and self._decoder.busy() and self._keep_decoding())

    async def _chat_batch_call(self, batch: list[ChatParams]) -> list[ChatResult | BaseException]:
        results = await self._run_groups(
            batch, lambda params: params.sampling_key(self.options.batch_length_ratio),
            lambda spec, loaded, items: _generation().generate_batch(spec, loaded, items)
        )
        for result in results:
            if isinstance(result, ChatResult) and result.finish_reason == "cancelled":
                # tokens made for a caller that left before its row was dropped: shows how soon that was
                cancelled = self.batch_stats.get("cancelled_tokens", 0) + result.completion_tokens
                self.batch_stats["cancelled_tokens"] = cancelled
        return results

    async def chat_stream(self, params: ChatParams) -> AsyncIterator[dict]:
        """Yields {"delta": text, ...}... then {"finish_reason", "usage"}; errors surface before the first
        chunk. A delta item may also carry "logprobs" (of its tokens) and "tool_calls" (call deltas).

        A stream joins the same batches as plain requests: its deltas come from the batch's generate
        call through `params.sink`, and its final text from the batch's result for it."""
        arrived = time.monotonic()
        with self._observed(params) as params.running:
            async for item in self._chat_stream(params):
                yield item
                if "usage" in item:
                    usage = item["usage"]
                    self.metrics.generated(params.model, arrived, params.first_token_at, usage["prompt_tokens"],
                                           usage["completion_tokens"], usage.get("cached_tokens", 0))

    async def _chat_stream(self, params: ChatParams) -> AsyncIterator[dict]:
        async with self._admitted(params) as (spec, loaded):
            calls = None
            if params.tools and params.tool_choice != "none":
                calls = tools_module().CallStream(params.tools, params.parallel_tool_calls)
            loop = asyncio.get_running_loop()
            deltas: asyncio.Queue = asyncio.Queue()
            params.sink = lambda text: call_soon(loop, deltas.put_nowait, text)
            if params.logprobs:
                params.logprob_sink = lambda given: call_soon(loop, deltas.put_nowait, given)
            done = asyncio.ensure_future(self._until_cancelled(params, self._generate(params, spec, loaded)))
            # Runs after every delta the generate call queued: they were scheduled before its result.
            done.add_done_callback(lambda _: deltas.put_nowait(_END))
            sent, entries, emitted = "", [], 0
            try:  # from here on, however the stream ends, the generation is cancelled with it
                if params.echo:
                    text, echoed = await self._echo(loaded, params)
                    yield {"delta": text, "logprobs": echoed or None}
                options = self.options
                interval_ms = options.voice_stream_interval_ms if params.spoken else options.stream_interval_ms
                async for pieces in coalesced(deltas, done, interval_ms / 1000):
                    if params.first_token_at is None:  # generate()'s path: the first token
                        params.first_token_at = time.monotonic()
                        if params.running is not None:
                            params.running()
                    text = ""
                    for piece in pieces:
                        if isinstance(piece, str):
                            text += piece
                        else:
                            entries.extend(piece)
                    if not text:
                        continue
                    sent += text
                    for item in _stream_items(text, entries, calls, loaded.tokenizer, emitted):
                        yield item
                    emitted, entries = emitted + len(entries), []
                result: ChatResult = raise_if_error(done.result())
            finally:
                done.cancel()  # the client went away: the row is dropped at generate's next step
                await settle(done)  # and its memory stays held until then (_until_cancelled)
        tail = result.text[len(sent):] if len(result.text) > len(sent) and result.text.startswith(sent) else ""
        if result.logprobs is not None:  # those of the text held back to the end (a stop string's are not there)
            entries = list(result.logprobs[emitted:])
        for item in _stream_items(tail, entries, calls, loaded.tokenizer, emitted, final=True):
            yield item
        finish = ("tool_calls" if calls is not None and calls.calls and result.finish_reason == "stop"
                  else result.finish_reason)  # a call max_tokens cut stays 'length'
        yield {
            "finish_reason": finish,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "cached_tokens": result.cached_tokens},
        }


def _stream_items(text: str, entries: list, calls: Any, tokenizer: Any, start: int = 0,
                  final: bool = False) -> list[dict]:
    """One streamed piece of text as chunk items: content and/or tool-call deltas, with its logprobs (`start`:
    the reply's position of its first entry)."""
    logprobs = None
    if entries:
        from .row_logits import as_openai

        logprobs = as_openai(tokenizer, entries, start)
    if calls is None:
        return [{"delta": text, "logprobs": logprobs}] if text or logprobs else []
    pieces = calls.feed(text) + (calls.finish() if final else [])
    items: list[dict] = []
    for piece in pieces:
        if "content" in piece:
            items.append({"delta": piece["content"]})
        else:
            items.append({"delta": "", "tool_calls": [piece["tool_call"]]})
    if logprobs:
        if items:
            items[0]["logprobs"] = logprobs
        else:
            items.append({"delta": "", "logprobs": logprobs})
    return items


def uses_decode_loop(loaded: LoadedModel) -> bool:
    """Whether the decode loop can run this model: its rotary positions must be plain token counts
    (multimodal 3-D positions, as Qwen2-VL's, need generate()'s own bookkeeping)."""
    text = getattr(loaded.config, "text_config", None) or loaded.config
    rope = getattr(text, "rope_scaling", None) or getattr(text, "rope_parameters", None) or {}
    return not (isinstance(rope, dict) and "mrope_section" in rope)


# A text prompt this short is templated and tokenized on the event loop: ~1 ms (0.6 ms for 1,000
# characters, 0.7 ms for 32 short messages with the tiny ChatML tokenizer; 1,024 messages took 21 ms),
# less than a hop to a worker thread costs under load.
INLINE_ENCODE_CHARS = 2048
INLINE_ENCODE_MESSAGES = 32


def encodes_inline(params: ChatParams) -> bool:
    """Whether encoding this request is cheap enough for the event loop: short text, no images, no tools
    (whose schemas the template renders); anything longer goes to a thread, so one long prompt never
    holds up the replica's other requests."""
    if params.images or params.tools or len(params.messages) > INLINE_ENCODE_MESSAGES:
        return False
    if params.prompt is not None:
        return len(params.prompt) <= INLINE_ENCODE_CHARS  # characters, or token ids
    return sum(len(text) for text in message_texts(params.messages)) <= INLINE_ENCODE_CHARS


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


def rendered_texts(params: ChatParams) -> list[str]:
    """Text the prompt holds at least once whatever the chat template: the messages' contents and names, the
    names and arguments of past tool calls, the tools' names and descriptions, or the raw prompt. A template
    may add more (JSON around a tool), never less, so its characters bound the prompt's tokens from below:
    12 MB in a tool description was tokenized (19 s, +2.2 GB) before the same refusal a message gets at once."""
    texts = message_texts(params.messages)
    for message in params.messages:
        texts.append(str(message.get("name") or ""))
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                texts += [str(function.get("name") or ""), str(function.get("arguments") or "")]
    for tool in params.tools or []:
        texts += [str(tool.get("name") or ""), str(tool.get("description") or "")]
    if isinstance(params.prompt, str):
        texts.append(params.prompt)
    return texts


def logits_width(loaded: LoadedModel) -> int:
    """Tokens the model scores at each step (its output layer may be wider than the tokenizer)."""
    config = getattr(loaded.config, "text_config", None) or loaded.config
    return max(int(getattr(config, "vocab_size", 0) or 0), len(loaded.tokenizer))


def embedding_rows(loaded: LoadedModel) -> int:
    """Token ids the model can read: rows of its input embedding (a token id past them is an index error
    in the forward, and on a GPU a device-side assert)."""
    try:
        return int(loaded.model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        config = getattr(loaded.config, "text_config", None) or loaded.config
        return int(getattr(config, "vocab_size", 0) or 0) or len(loaded.tokenizer)


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
                           context: int | None = None, param: str = "max_tokens",
                           prompt_param: str = "messages") -> int:
    """The request's generation limit: at most the model's max_new_tokens; an explicit request must also
    fit the context with the prompt (400 on `prompt_param`), a default is cut to what fits."""
    room = context - prompt_tokens if context else None
    if requested is None:
        return max(1, min(spec.max_new_tokens, room if room is not None else spec.max_new_tokens))
    if requested > spec.max_new_tokens:
        raise InvalidRequestError(
            f"{param}={requested} exceeds the limit of model {spec.name!r} ({spec.max_new_tokens}; "
            "raise max_new_tokens for it in serve_config.yaml)",
            param=param,
        )
    if room is not None and requested > room:
        raise context_length_exceeded("maximum context length", context, prompt_tokens, requested,
                                      param=prompt_param)
    return requested


_END = object()  # closes a stream's queue of deltas


async def coalesced(deltas: asyncio.Queue, finished: asyncio.Future, interval_s: float) -> AsyncIterator[list]:
    """A stream's queued deltas as chunks, until the _END put after the last one: the first at once, then
    everything queued while the last chunk was on its way or within `interval_s` after it (cut short when
    `finished`). Each chunk is a Ray streaming-object hop to the ingress (~ms of CPU on both sides): one
    per token made the consumer fall behind the decode loop (the voice round trip's first piece waited
    on it) and cost 16 tiny-model streams a quarter of their throughput (82 vs 110 req/s)."""
    loop = asyncio.get_running_loop()
    last_sent: float | None = None
    while True:
        pieces = [await deltas.get()]
        if last_sent is not None and pieces[0] is not _END:
            wait = last_sent + interval_s - loop.time()
            if wait > 0 and not finished.done():
                await asyncio.wait([finished], timeout=wait)
        while not deltas.empty():
            pieces.append(deltas.get_nowait())
        ended = pieces[-1] is _END  # put after every delta: it is always the last
        if ended:
            pieces.pop()
        if pieces:
            yield pieces
            last_sent = loop.time()
        if ended:
            return


def tools_module():
    from . import tools

    return tools


def _decode_loop():
    from . import decode_loop  # torch side, imported on first use

    return decode_loop


def _generation():
    """The torch-side module, imported on first use: by then the model (and torch) is loaded, and
    replica start-up stays free of ~5 s of imports on 2 cores."""
    from . import generation

    return generation
