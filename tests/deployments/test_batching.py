"""The replica's batcher: no wait on an idle model, batches whatever arrives while it is busy."""

from __future__ import annotations

import asyncio

import pytest

from deployments.batching import Batcher


class Recorder:
    def __init__(self, delay: float = 0.05, fail_on: object = None):
        self.calls: list[list] = []
        self.delay, self.fail_on = delay, fail_on

    async def __call__(self, items):
        self.calls.append(list(items))
        await asyncio.sleep(self.delay)
        if self.fail_on in items:
            raise RuntimeError("model call failed")
        return [ValueError(f"bad {i}") if i == "bad" else i * 2 for i in items]


class TimerLoop(asyncio.SelectorEventLoop):
    """An event loop that records every timer scheduled on it (asyncio.sleep(d > 0), wait_for's
    timeout, call_later...): "runs at once" is then a fact about the code, not a wall time that a
    loaded machine may miss."""

    def __init__(self):
        super().__init__()
        self.timers: list[float] = []

    def call_at(self, when, callback, *args, context=None):
        self.timers.append(round(when - self.time(), 3))
        return super().call_at(when, callback, *args, context=context)


def run_on_timer_loop(coro) -> tuple[object, list[float]]:
    loop = TimerLoop()
    try:
        return loop.run_until_complete(coro), loop.timers
    finally:
        loop.close()


def test_a_request_on_an_idle_model_runs_at_once():
    recorder = Recorder(delay=0)

    async def main():
        return await Batcher(recorder, max_batch_size=8)(21)

    result, timers = run_on_timer_loop(main())
    assert result == 42 and recorder.calls == [[21]]
    assert timers == [], f"an idle model's request waited for a timer: {timers}"


def test_requests_arriving_while_busy_share_the_next_call_up_to_the_limit():
    async def main():
        recorder = Recorder(delay=0.05)
        batcher = Batcher(recorder, max_batch_size=4)
        first = asyncio.ensure_future(batcher(0))
        await asyncio.sleep(0.01)  # the first call is running
        rest = await asyncio.gather(*(batcher(i) for i in range(1, 10)))
        return recorder.calls, await first, rest

    calls, first, rest = asyncio.run(main())
    assert first == 0 and rest == [i * 2 for i in range(1, 10)]
    assert calls == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]


def test_errors_go_to_their_own_callers_and_a_failed_call_to_its_batch_only():
    async def main():
        batcher = Batcher(Recorder(delay=0.02, fail_on=3), max_batch_size=2)
        return await asyncio.gather(*(batcher(i) for i in ["bad", 1, 3, 4, 5]), return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[0], ValueError)  # its own error, returned per item
    assert results[1] == 2
    assert all(isinstance(r, RuntimeError) for r in results[2:4])  # 3 and 4 shared the failed call
    assert results[4] == 10


def test_a_caller_that_went_away_is_not_run():
    async def main():
        recorder = Recorder(delay=0.05)
        batcher = Batcher(recorder, max_batch_size=8)
        busy = asyncio.ensure_future(batcher(1))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher(2))
        await asyncio.sleep(0)
        gone.cancel()
        assert await batcher(3) == 6
        await busy
        return recorder.calls

    assert asyncio.run(main()) == [[1], [3]]


def test_an_item_its_caller_abandoned_while_it_waited_is_not_run_and_its_caller_is_told():
    """A cancelled request waits on, shielded, for what it holds to be let go (_until_cancelled); its item
    still queued must not then run for nobody."""
    async def main():
        recorder = Recorder(delay=0.05)
        abandoned: set[int] = set()
        batcher = Batcher(recorder, max_batch_size=8, abandoned=abandoned.__contains__)
        busy = asyncio.ensure_future(batcher(1))
        await asyncio.sleep(0.01)
        left = asyncio.ensure_future(batcher(2))
        await asyncio.sleep(0)
        abandoned.add(2)
        assert await batcher(3) == 6
        await busy
        with pytest.raises(asyncio.CancelledError):
            await left
        return recorder.calls

    assert asyncio.run(main()) == [[1], [3]]


@pytest.mark.parametrize("wait", [0.03])
def test_a_batch_wait_lets_an_idle_model_collect_company(wait):
    async def main():
        recorder = Recorder(delay=0)
        batcher = Batcher(recorder, max_batch_size=8, batch_wait_timeout_s=wait)
        await asyncio.gather(*(batcher(i) for i in range(3)))
        return recorder.calls

    calls, timers = run_on_timer_loop(main())
    assert calls == [[0, 1, 2]]
    assert timers == [pytest.approx(wait, abs=0.002)]  # the batch waited once, for `wait`


def test_with_a_priority_key_the_next_batch_takes_the_lowest_values_first_in_arrival_order_among_equals():
    async def main():
        recorder = Recorder(delay=0.05)
        batcher = Batcher(recorder, max_batch_size=2, priority=lambda item: -1 if item >= 100 else 0)
        first = asyncio.ensure_future(batcher(0))
        await asyncio.sleep(0.01)  # the first call is running; the rest queue in this order
        rest = await asyncio.gather(*(batcher(i) for i in (1, 2, 100, 3, 101)))
        return recorder.calls, await first, rest

    calls, first, rest = asyncio.run(main())
    assert rest == [2, 4, 200, 6, 202]
    assert calls == [[0], [100, 101], [1, 2], [3]]


def test_a_handler_that_answers_too_few_or_is_cancelled_strands_no_caller():
    async def short(items):
        return [i * 2 for i in items[:1]]

    async def scenario():
        batcher = Batcher(short, max_batch_size=4)
        answers = await asyncio.gather(*(batcher(i) for i in (1, 2, 3)))
        assert answers[0] == 2
        assert all(isinstance(a, RuntimeError) and "returned 1 results for 3 requests" in str(a) for a in answers[1:])

        started = asyncio.Event()

        async def hangs(items):
            started.set()
            await asyncio.sleep(60)

        batcher = Batcher(hangs, max_batch_size=4)
        callers = [asyncio.ensure_future(batcher(i)) for i in (1, 2)]
        await started.wait()
        batcher._worker.cancel()  # the replica shutting down
        done, pending = await asyncio.wait(callers, timeout=5)
        assert not pending and all(c.cancelled() for c in callers)

    asyncio.run(scenario())
