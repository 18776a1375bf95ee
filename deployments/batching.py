"""Request batching that never waits on an idle model.

A request that finds the model idle runs at once; requests that arrive while a batch is running
queue up and go together, up to `max_batch_size`, in the next model call.

Why not Ray's `@serve.batch`: it waits `batch_wait_timeout_s` for company on every batch, so
each request on a quiet replica paid the full wait (10 ms of the ~27 ms that Serve added to a
one-token chat in bench/), and it forms the next batch by arrival window even while the model
is busy, so a shorter window degenerates to batches of one under load (16 concurrent clients:
18 req/s with a 0 s window against 44 req/s with 10 ms; this batcher: see bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Handler = Callable[[list[Any]], Awaitable[list[Any]]]


class Batcher(Generic[Item]):
    def __init__(self, handler: Handler, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.0,
                 priority: Callable[[Any], int] | None = None, abandoned: Callable[[Any], bool] | None = None):
        """`handler(items)` returns one result (or exception instance) per item, in order.
        `batch_wait_timeout_s` > 0 makes a batch that starts on an idle model wait that long to fill.
        `priority(item)`: the next batch takes the waiting items of lowest value first (arrival order
        among equals); None: arrival order. `abandoned(item)`: a waiting item its caller gave up on, dropped
        like a cancelled caller's (one that waits on, shielded, for the item's memory to be let go)."""
        self._handler = handler
        self.priority = priority
        self.abandoned = abandoned
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._queue: deque[tuple[Item, asyncio.Future]] = deque()
        self._worker: asyncio.Task | None = None

    async def __call__(self, item: Item) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Run batches until the queue is empty; callers that arrive meanwhile join the next one."""
        while self._queue:
            if self.batch_wait_timeout_s > 0 and len(self._queue) < self.max_batch_size:
                await asyncio.sleep(self.batch_wait_timeout_s)
            if self.priority is not None and len(self._queue) > self.max_batch_size:
                priority = self.priority
                self._queue = deque(sorted(self._queue, key=lambda entry: priority(entry[0])))  # stable
            batch: list[tuple[Item, asyncio.Future]] = []
            while self._queue and len(batch) < self.max_batch_size:
                item, future = self._queue.popleft()
                if not future.done() and self.abandoned is not None and self.abandoned(item):
                    future.cancel()
                if not future.done():  # a cancelled caller (client went away) is dropped
                    batch.append((item, future))
            if not batch:
                continue
            try:
                results = list(await self._handler([item for item, _ in batch]))
            except asyncio.CancelledError:  # the worker itself is cancelled (shutdown): so are its callers
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # the handler should return exceptions per item; never strand callers
                results = [exc] * len(batch)
            if len(results) != len(batch):  # a handler's bug: each caller still gets an answer
                wrong = RuntimeError(f"the batch handler returned {len(results)} results for {len(batch)} requests")
                results = results[:len(batch)] + [wrong] * (len(batch) - len(results))
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
