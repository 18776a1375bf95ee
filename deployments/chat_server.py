"""The shared body of the LLM and VLM deployments: batched and streamed chat completions.

Plain classes: the builder turns them into Serve deployments.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from loading import LoadedModel, ModelSpec

from .batching import Batcher
from .params import ChatParams, ChatResult
from .family_server import FamilyServer, raise_if_error

log = logging.getLogger(__name__)


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
    async def chat(self, params: ChatParams) -> ChatResult:
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        params.model = spec.name
        self.validate(spec, loaded, params)
        return raise_if_error(await self._chat_batch(params))

    async def _chat_batch_call(self, batch: list[ChatParams]) -> list[ChatResult | BaseException]:
        return await self._run_groups(
            batch, ChatParams.sampling_key, lambda spec, loaded, items: _generation().generate_batch(
                spec, loaded, items, self.encode)
        )

    async def chat_stream(self, params: ChatParams) -> AsyncIterator[dict]:
        """Yields {"delta": text}... then {"finish_reason", "usage"}; errors surface before the first chunk."""
        spec, loaded = await self.pool.get(params.model, params.wait_s)
        self.validate(spec, loaded, params)
        stream = _generation().StreamingGeneration(spec, loaded, params, self.encode)
        done = asyncio.ensure_future(self._infer(stream.run))
        pieces = stream.deltas()
        sentinel = object()
        while (piece := await asyncio.to_thread(next, pieces, sentinel)) is not sentinel:
            yield {"delta": piece}
        await done  # re-raises a generate failure
        yield {
            "finish_reason": stream.finish_reason,
            "usage": {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens},
        }


def _generation():
    """The torch-side module, imported on first use: by then the model (and torch) is loaded, and
    replica start-up stays free of ~5 s of imports on 2 cores."""
    from . import generation

    return generation
