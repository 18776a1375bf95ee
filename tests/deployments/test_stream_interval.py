"""A stream's deltas go to the ingress as chunks: the first at once, then at most one per stream
interval carrying all that was made meanwhile, and the last as soon as generation ends."""

from __future__ import annotations

import asyncio

from deployments.chat_server import _END, coalesced


async def chunks_of(feed: list[tuple[float, str]], interval_s: float, end_at: float) -> list[tuple[float, list]]:
    """Put each (time, delta) of `feed` on a queue, finish the generation at `end_at`; the chunks with
    the time each came out."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    start = loop.time()

    async def generate() -> None:
        for at, text in feed:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            deltas.put_nowait(text)
        await asyncio.sleep(max(0.0, start + end_at - loop.time()))

    finished = asyncio.ensure_future(generate())
    finished.add_done_callback(lambda _: deltas.put_nowait(_END))
    return [(loop.time() - start, pieces) async for pieces in coalesced(deltas, finished, interval_s)]


def test_the_first_delta_goes_at_once_and_the_rest_within_the_interval_go_together():
    feed = [(0.0, "a"), (0.01, "b"), (0.02, "c"), (0.03, "d")]
    out = asyncio.run(chunks_of(feed, interval_s=5.0, end_at=0.05))
    assert [pieces for _, pieces in out] == [["a"], ["b", "c", "d"]]
    assert out[0][0] < 0.5  # not held for the interval
    assert out[1][0] < 1.0  # the end of generation cuts the interval short: 5 s would have held it


def test_no_interval_sends_whatever_is_queued_when_the_consumer_asks():
    feed = [(0.0, "a"), (0.05, "b"), (0.1, "c")]
    out = asyncio.run(chunks_of(feed, interval_s=0.0, end_at=0.12))
    assert [pieces for _, pieces in out] == [["a"], ["b"], ["c"]]


def test_deltas_slower_than_the_interval_each_go_alone():
    feed = [(0.0, "a"), (0.1, "b"), (0.2, "c")]
    out = asyncio.run(chunks_of(feed, interval_s=0.02, end_at=0.25))
    assert [pieces for _, pieces in out] == [["a"], ["b"], ["c"]]
    assert "".join(p for _, pieces in out for p in pieces) == "abc"
