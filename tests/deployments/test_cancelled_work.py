"""A request whose caller leaves stops costing anything it is counted for: its generation is dropped,
and memory it holds stays counted until the work using that memory has really ended."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.admission import MB, MemoryGate, to_thread_held
from deployments.llm import LLMServer
from deployments.options import ChatOptions
from deployments.params import ChatParams
from loading import ModelSpec


def test_a_request_cancelled_during_its_thread_work_keeps_its_hold_until_the_work_ends():
    """Decoding images or resampling audio runs on a thread, which cannot be stopped: a request
    cancelled meanwhile keeps its hold until the thread is done, so the gate never admits others into
    memory that is still in use."""

    async def scenario():
        gate = MemoryGate(100 * MB)
        started, finish = threading.Event(), threading.Event()

        def decode() -> str:
            started.set()
            finish.wait(10)
            return "decoded"

        async def request():
            async with gate.hold(60 * MB, "the images"):
                await to_thread_held(decode)

        task = asyncio.ensure_future(request())
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)
        during = (task.done(), gate.in_use)
        with pytest.raises(asyncio.TimeoutError):  # 40 MB free while the decode runs: 60 more must wait
            await asyncio.wait_for(gate.hold(60 * MB, "the next request").__aenter__(), 0.05)
        finish.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return during, gate.in_use

    during, after = asyncio.run(scenario())
    assert during == (False, 60 * MB)
    assert after == 0


def test_thread_work_that_is_not_cancelled_returns_its_value_and_raises_its_error():
    def fails():
        raise ValueError("bad audio")

    async def scenario():
        assert await to_thread_held(sum, [1, 2, 3]) == 6
        with pytest.raises(ValueError, match="bad audio"):
            await to_thread_held(fails)

    asyncio.run(scenario())


def test_a_stream_closed_at_its_echo_drops_its_generation(tiny_llm_dirs):
    """/v1/completions with `echo` streams the prompt first. A client that leaves at that chunk must
    take its generation with it; before, the echo was sent outside the block that cancels it, and the
    generation ran to max_tokens for nobody, its memory hold already released."""
    base_dir, _ = tiny_llm_dirs
    spec = ModelSpec(name="tiny-llm", source=str(base_dir), max_new_tokens=200)
    server = LLMServer([spec], ChatOptions(stream_interval_ms=0))

    async def scenario():
        warm = ChatParams(model="tiny-llm", messages=[], prompt="Hello", max_new_tokens=4, temperature=0, wait_s=60)
        await server.chat(warm)  # the model is loaded and the decode loop has run once
        steps_before = server.batch_stats.get("decode_steps", 0)
        params = ChatParams(model="tiny-llm", messages=[], prompt="Tell me a long story", echo=True,
                            max_new_tokens=150, temperature=0, wait_s=60)
        stream = server.chat_stream(params)
        first = await stream.__anext__()
        await stream.aclose()
        for _ in range(300):  # until the decode loop has nothing left to do
            await asyncio.sleep(0.01)
            if server._decoding is None or server._decoding.done():
                break
        await asyncio.sleep(0.2)
        return first, server.batch_stats.get("decode_steps", 0) - steps_before, server.memory.in_use

    first, steps, in_use = asyncio.run(scenario())
    assert first["delta"] == "Tell me a long story"
    assert steps < 20, f"{steps} decode steps ran after the client left at the echo"
    assert in_use == 0


def test_a_request_cancelled_in_a_generate_batch_keeps_its_hold_until_the_batch_lets_go(tiny_llm_dirs, monkeypatch):
    """generate() (Qwen2-VL's path; the tiny Llama is sent down it here) ends a cancelled row at its next
    step, but the batch's cache keeps the row until the batch ends. The request's memory stays counted
    until then; before, it was released at the cancellation (found by review)."""
    from deployments import chat_server

    monkeypatch.setattr(chat_server, "uses_decode_loop", lambda loaded: False)
    spec = ModelSpec(name="tiny-llm", source=str(tiny_llm_dirs[0]), max_new_tokens=200, debug_step_delay_s=0.01)
    server = LLMServer([spec], ChatOptions(batch_wait_timeout_s=0.2))

    async def scenario():
        await server.chat(ChatParams(model="tiny-llm", messages=[{"role": "user", "content": "hi"}], max_new_tokens=2,
                                     temperature=0, wait_s=60))  # loaded
        calls_before = server.batch_stats["model_calls"]
        requests = [asyncio.ensure_future(server.chat(ChatParams(
            model="tiny-llm", messages=[{"role": "user", "content": "Tell me a story"}], max_new_tokens=tokens,
            temperature=0, wait_s=60))) for tokens in (150, 130)]  # one max_tokens band: one batch
        while server.batch_stats["model_calls"] == calls_before:  # the batch starts after batch_wait_timeout_s
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # ~10 of its steps
        both = server.memory.in_use
        requests[1].cancel()
        await asyncio.sleep(0.15)
        during = (requests[1].done(), server.memory.in_use)
        longer = await asyncio.wait_for(requests[0], 60)
        with pytest.raises(asyncio.CancelledError):
            await requests[1]
        return server.batch_stats["model_calls"] - calls_before, both, during, longer, server.memory.in_use

    calls, both, during, longer, after = asyncio.run(scenario())
    assert calls == 1  # the two rows shared one generate call
    assert during == (False, both), "the cancelled row's memory was released while its batch kept it"
    assert longer.completion_tokens == 150 and after == 0


def test_health_counts_a_request_whose_caller_left_before_any_model_call_once(tiny_llm_dirs, tmp_path):
    """/health's `cancelled` counted a request only if a model call dropped it: one whose client left while it
    waited for memory (the STT's queue under load) was counted nowhere (20 of 60 transcriptions cancelled in a
    run here: 0), nor a transcription stream closed between its pieces; one with several pieces in flight counted
    each of them. Now each request whose caller left counts once."""
    import numpy as np

    from deployments.options import TranscriptionOptions
    from deployments.params import TranscribeParams
    from deployments.stt import STTServer
    from loading.tiny import build_tiny

    spec = ModelSpec(name="m", source=str(tiny_llm_dirs[0]), max_new_tokens=200, debug_step_delay_s=0.02)
    chat_server = LLMServer([spec], ChatOptions())
    stt = ModelSpec(name="w", source=str(build_tiny("stt", tmp_path / "w")), max_new_tokens=8)
    stt_server = STTServer([stt], TranscriptionOptions(max_chunks_per_call=2, fallback_temperatures=[0.0]))
    audio = (np.random.default_rng(0).standard_normal(16000 * 150) * 0.1).astype(np.float32)  # 5+ pieces

    def chat() -> ChatParams:
        return ChatParams(model="m", messages=[{"role": "user", "content": "hi"}], max_new_tokens=100,
                          temperature=0, wait_s=60)

    async def scenario():
        await chat_server.chat(chat())
        chat_server.memory._budget = chat_server.memory.in_use + 200_000  # room for one request
        running = asyncio.ensure_future(chat_server.chat(chat()))
        await asyncio.sleep(0.3)
        waiting = asyncio.ensure_future(chat_server.chat(chat()))  # waits for memory
        await asyncio.sleep(0.2)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        left_waiting = chat_server.batch_stats["cancelled"]
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        counts = [left_waiting, chat_server.batch_stats["cancelled"]]
        for items in (1, 2):  # a stream closed at its first piece (none in flight), then one with pieces in flight
            stream = stt_server.transcribe_stream(TranscribeParams(model="w", audio=audio, sample_rate=16000,
                                                                   language="en", wait_s=60))
            for _ in range(items):
                await stream.__anext__()
            await stream.aclose()
            counts.append(stt_server.batch_stats["cancelled"])
        return counts

    assert asyncio.run(scenario()) == [1, 2, 1, 2]
