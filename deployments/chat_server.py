"""The shared body of the LLM and VLM deployments: batched and streamed chat completions.

Plain classes: the builder turns them into Serve deployments.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from loading import LoadedModel, ModelSpec

from .batching import Batcher
from .errors import InvalidRequestError
from .params import ChatParams, ChatResult
from .family_server import FamilyServer, raise_if_error


class ChatServer(FamilyServer):
    def __init__(
        self,
        models: list[dict],
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.0,
        max_loaded_models: int = 4,
    ):
        super().__init__(models, max_loaded_models)
        self._chat_batch = Batcher(self._chat_batch_call, max_batch_size, batch_wait_timeout_s)

    # -- to be provided by the family --------------------------------------------------------------
    def encode(self, loaded: LoadedModel, batch: list[ChatParams]) -> Any:
        raise NotImplementedError

    def validate(self, spec: ModelSpec, loaded: LoadedModel, params: ChatParams) -> None:
        """Per-request checks that must fail this request alone (400), not its batch."""

    # -- serving ----------------------------------------------------------------------------------
    async def _admit(self, params: ChatParams) -> None:
        """Checks that fail this request alone (4xx) before it can join a batch."""
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        params.model = spec.name
        params.max_new_tokens = resolve_max_new_tokens(spec, params.max_new_tokens)
        self.validate(spec, loaded, params)

    async def chat(self, params: ChatParams) -> ChatResult:
        await self._admit(params)
        return raise_if_error(await self._chat_batch(params))

    async def _chat_batch_call(self, batch: list[ChatParams]) -> list[ChatResult | BaseException]:
        return await self._run_groups(
            batch, ChatParams.sampling_key, lambda spec, loaded, items: _generation().generate_batch(
                spec, loaded, items, self.encode)
        )

    async def chat_stream(self, params: ChatParams) -> AsyncIterator[dict]:
        """Yields {"delta": text}... then {"finish_reason", "usage"}; errors surface before the first chunk.

        A stream joins the same batches as plain requests: its deltas come from the batch's generate
        call through `params.sink`, and its final text from the batch's result for it."""
        await self._admit(params)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        params.sink = lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text)
        done = asyncio.ensure_future(self._chat_batch(params))
        # Runs after every delta the generate call queued: they were scheduled before its result.
        done.add_done_callback(lambda _: deltas.put_nowait(_END))
        sent = ""
        try:
            while (piece := await deltas.get()) is not _END:
                sent += piece
                yield {"delta": piece}
            result: ChatResult = raise_if_error(done.result())
        finally:
            done.cancel()  # the client went away: leave the batch if it has not started
        if len(result.text) > len(sent) and result.text.startswith(sent):
            yield {"delta": result.text[len(sent):]}  # what was held back for a possible stop string
        yield {
            "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
        }


def resolve_max_new_tokens(spec: ModelSpec, requested: int | None) -> int:
    if requested is None:
        return spec.max_new_tokens
    if requested > spec.max_new_tokens:
        raise InvalidRequestError(
            f"max_tokens={requested} exceeds the limit of model {spec.name!r} ({spec.max_new_tokens}; "
            "raise max_new_tokens for it in serve_config.yaml)",
            param="max_tokens",
        )
    return requested


_END = object()  # closes a stream's queue of deltas


def _generation():
    """The torch-side module, imported on first use: by then the model (and torch) is loaded, and
    replica start-up stays free of ~5 s of imports on 2 cores."""
    from . import generation

    return generation
