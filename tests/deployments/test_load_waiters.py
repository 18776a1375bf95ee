"""Requests that wait for a model still loading (X-Wait-For-Model) hold no thread while they wait.

They waited in `asyncio.to_thread(handle.get, wait_s)`: each held one of the replica's default-executor
threads (cores + 4) for up to wait_s, even after its client left, and every other request's thread work
(tokenizing a long prompt, compiling a grammar, processing an image, an upload's VAD) queued behind them:
on this 2-core machine a JSON-schema chat to a ready model took 24.5 s instead of 0.02 s after 8 clients
had given up waiting for a lazy model's 25 s load."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from deployments.pool import ModelPool
from loading import ModelLoadingInProgress, ModelSpec

LOAD_S = 3.0


def test_waiters_for_a_loading_model_leave_the_replicas_threads_free(tiny_llm_dirs):
    source = str(tiny_llm_dirs[0])
    pool = ModelPool([ModelSpec(name="ready", source=source, loading="eager"),
                      ModelSpec(name="slow", source=source, loading="lazy", debug_load_delay_s=LOAD_S)])

    async def scenario():
        executor = ThreadPoolExecutor(2)  # few threads, as a 2-core replica's default executor has 6
        asyncio.get_running_loop().set_default_executor(executor)
        left = [asyncio.ensure_future(pool.get("slow", 60)) for _ in range(4)]
        stays = asyncio.ensure_future(pool.get("slow", 60))
        short = asyncio.ensure_future(pool.get("slow", 0.3))
        await asyncio.sleep(0.2)
        for waiter in left:  # their clients leave
            waiter.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        started = time.monotonic()
        await asyncio.to_thread(time.sleep, 0)  # any request's thread work: a grammar, a long prompt
        other_work_s = time.monotonic() - started
        outcomes = await asyncio.gather(short, stays, return_exceptions=True)
        executor.shutdown(wait=False)
        return other_work_s, outcomes

    other_work_s, (short, stays) = asyncio.run(scenario())
    assert other_work_s < 0.5, f"thread work waited {other_work_s:.1f} s for the load the waiters had asked for"
    assert isinstance(short, ModelLoadingInProgress)  # a short wait still ends in a 503 + Retry-After
    spec, loaded = stays
    assert spec.name == "slow" and loaded is pool.handles["slow"].loaded  # the one that stayed got its model
