"""The per-request path does no avoidable thread hops and wakes the event loop once per decode step.

Under 16 tiny-model streams, each hop to a worker thread or wake-up of the event loop from the
inference thread cost milliseconds of queueing: FastAPI ran our two plain-`def` dependencies in its
thread pool (14 ms p50 between the outermost middleware and the route), and every streamed token
was its own `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import inspect
import threading

from fastapi.routing import APIRoute

from deployments.chat_server import INLINE_ENCODE_CHARS, INLINE_ENCODE_MESSAGES, encodes_inline
from deployments.params import ChatParams
from deployments.routes import ROUTERS, admin, ui
from deployments.wakeups import batched, call_soon


def _dependencies(dependant):
    for sub in dependant.dependencies:
        yield sub
        yield from _dependencies(sub)


def test_no_route_or_dependency_runs_in_fastapis_thread_pool():
    """FastAPI runs a plain `def` endpoint or dependency in its thread pool: a hop per request."""
    checked = 0
    for router in [*ROUTERS, ui.router, admin.router]:
        for route in router.routes:
            if not isinstance(route, APIRoute):
                continue
            assert inspect.iscoroutinefunction(route.endpoint), f"{route.path}: {route.endpoint.__name__} is not async"
            for dependency in _dependencies(route.dependant):
                if dependency.call is not None:
                    assert inspect.iscoroutinefunction(dependency.call), (
                        f"{route.path}: dependency {dependency.call.__name__} is not async")
                    checked += 1
    assert checked >= 10  # the chat, audio, admin... routes' ingress, wait and admin dependencies


class CountingLoop:
    """An event loop running in its own thread, counting the cross-thread calls it is sent."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.sent = 0
        send = self.loop.call_soon_threadsafe

        def counted(*args):
            self.sent += 1
            return send(*args)

        self.loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def settle(self):
        done = threading.Event()
        self.loop.call_soon_threadsafe(done.set)
        assert done.wait(5)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def test_calls_in_a_batch_reach_each_loop_as_one_call_in_order():
    first, second = CountingLoop(), CountingLoop()
    seen: list = []
    try:
        with batched():
            for i in range(16):
                call_soon(first.loop, seen.append, ("first", i))
                call_soon(second.loop, seen.append, ("second", i))
            with batched():  # nested: the outer block sends
                call_soon(first.loop, seen.append, ("first", 16))
            assert seen == [] and first.sent == second.sent == 0  # nothing is sent before the block ends
        first.settle(), second.settle()
        assert first.sent == 1 + 1 and second.sent == 1 + 1  # one call each (+ settle's own)
        assert [i for loop, i in seen if loop == "first"] == list(range(17))
        assert [i for loop, i in seen if loop == "second"] == list(range(16))
    finally:
        first.close(), second.close()


def test_calls_outside_a_batch_go_at_once():
    target = CountingLoop()
    seen: list = []
    try:
        call_soon(target.loop, seen.append, 1)
        call_soon(target.loop, seen.append, 2)
        target.settle()
        assert seen == [1, 2] and target.sent == 3
    finally:
        target.close()


def test_a_failing_callback_costs_the_others_nothing_and_a_closed_loop_drops_the_call():
    target = CountingLoop()
    seen: list = []
    errors: list = []
    target.loop.set_exception_handler(lambda loop, context: errors.append(context["exception"]))

    def fails(_):
        raise ValueError("receiver gone")

    try:
        with batched():
            call_soon(target.loop, seen.append, 1)
            call_soon(target.loop, fails, 2)
            call_soon(target.loop, seen.append, 3)
        target.settle()
        assert seen == [1, 3] and isinstance(errors[0], ValueError)
    finally:
        target.close()
    call_soon(target.loop, seen.append, 4)  # closed: nobody waits, nothing raises
    with batched():
        call_soon(target.loop, seen.append, 5)
    assert seen == [1, 3]


def test_short_text_prompts_encode_on_the_event_loop_long_ones_many_messages_and_images_in_a_thread():
    def params(**fields):
        return ChatParams(model="m", messages=fields.pop("messages", [{"role": "user", "content": "hi"}]), **fields)

    assert encodes_inline(params())
    assert encodes_inline(params(messages=[{"role": "user", "content": [{"type": "text", "text": "x" * 100}]}]))
    assert not encodes_inline(params(messages=[{"role": "user", "content": "x" * (INLINE_ENCODE_CHARS + 1)}]))
    assert not encodes_inline(params(messages=[{"role": "user", "content": "x" * 1500},
                                               {"role": "assistant", "content": "y" * 1500}]))
    assert not encodes_inline(params(images=[b"png"]))
    many = [{"role": "user", "content": ""}] * (INLINE_ENCODE_MESSAGES + 1)  # no text, but a long template
    assert not encodes_inline(params(messages=many))
    assert encodes_inline(params(messages=many[:INLINE_ENCODE_MESSAGES]))
    assert not encodes_inline(params(tools=[{"name": "f", "parameters": {}}]))
    assert encodes_inline(params(messages=[], prompt="Once upon a time"))
    assert not encodes_inline(params(messages=[], prompt=list(range(INLINE_ENCODE_CHARS + 1))))


def _writes(events) -> list[str]:
    async def collect():
        return [text async for text in events]

    return asyncio.run(collect())


async def _items(*items):
    for item in items:
        yield item


def test_a_chat_stream_writes_its_role_with_the_first_delta_and_its_finish_with_usage_and_done():
    """Each string a streaming route yields is one socket write and one more segment for HAProxy and the
    client; the events are OpenAI's, in OpenAI's order, but the role chunk and the end go out together."""
    import json

    from deployments.routes.completions import completion_events
    from deployments.sse import chat_events

    usage = {"prompt_tokens": 3, "completion_tokens": 2}
    writes = _writes(chat_events("m", _items((0, {"delta": "Hel"}), (0, {"delta": "lo"}),
                                              (0, {"finish_reason": "stop", "usage": usage})), True))
    assert len(writes) == 3
    events = [[json.loads(e[6:]) if e != "data: [DONE]" else "[DONE]" for e in w.split("\n\n") if e]
              for w in writes]
    assert [c["choices"][0]["delta"] for c in events[0]] == [{"role": "assistant", "content": "", "refusal": None},
                                                             {"content": "Hel"}]
    assert events[1][0]["choices"][0]["delta"] == {"content": "lo"}
    assert events[2][0]["choices"][0]["finish_reason"] == "stop"
    assert events[2][1]["usage"]["total_tokens"] == 5 and events[2][2] == "[DONE]"

    failing = _writes(chat_events("m", _failing(), False))  # role, then the in-band error, then [DONE]
    assert len(failing) == 2 and '"role":"assistant"' in failing[0] and failing[1].count("data: ") == 2
    assert '"error"' in failing[1] and failing[1].endswith("data: [DONE]\n\n")

    legacy = _writes(completion_events("m", _items((0, {"delta": "a"}), (0, {"finish_reason": "length",
                                                                             "usage": usage})), True, 1))
    assert len(legacy) == 2 and legacy[1].count("data: ") == 3 and legacy[1].endswith("data: [DONE]\n\n")


async def _failing():
    yield 0, {"delta": "x"}
    raise RuntimeError("the replica died")
