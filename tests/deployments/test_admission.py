"""The memory gate and the estimates behind it; text splitting for synthesis; sub-batched audio."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from transformers import LlamaConfig, WhisperConfig

from deployments.admission import MB, MemoryGate, chat_request_bytes, transcription_request_bytes
from deployments.errors import RequestTooLargeError, to_error
from deployments.text_split import split_text


def test_a_request_that_could_never_fit_is_a_413_naming_the_budget():
    gate = MemoryGate(100 * MB)
    with pytest.raises(RequestTooLargeError) as info:
        gate.check(300 * MB, "this chat request", param="messages")
    status, body, _ = to_error(info.value)
    assert status == 413 and body.error.param == "messages" and body.error.code == "request_too_large"
    assert "memory_budget_mb=100" in body.error.message and "300 MiB" in body.error.message


def test_requests_wait_their_turn_while_the_budget_is_in_use():
    async def scenario():
        gate, order = MemoryGate(100 * MB), []

        async def job(name: str, need: int, hold_s: float):
            async with gate.hold(need * MB, name):
                order.append(f"{name} in ({gate.in_use // MB} MB)")
                await asyncio.sleep(hold_s)
            order.append(f"{name} out")

        await asyncio.gather(job("a", 60, 0.05), job("b", 60, 0.0), job("c", 30, 0.0))
        return gate, order

    gate, order = asyncio.run(scenario())
    assert order[:2] == ["a in (60 MB)", "c in (90 MB)"]  # b (60) does not fit beside a; c (30) does
    assert order.index("b in (60 MB)") > order.index("a out")
    assert gate.in_use == 0 and gate.peak == 90 * MB


def test_the_chat_estimate_grows_with_tokens_and_is_dominated_by_attention_at_long_prompts():
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
                         intermediate_size=1536, vocab_size=49152)
    short = chat_request_bytes(config, 100, 100)
    long = chat_request_bytes(config, 8000, 100)
    assert short < 20 * MB < long
    assert long > 9 * 8000 * 8000 * 4  # the heads x prompt x prompt score matrix alone
    assert chat_request_bytes(config, 100, 100, batch=4) > 3 * short


def test_the_audio_estimate_is_bounded_by_chunks_per_call_not_by_the_audio_length():
    config = WhisperConfig(d_model=768, encoder_attention_heads=12)
    ten_minutes = transcription_request_bytes(config, 600 * 16000, 8)
    assert ten_minutes - transcription_request_bytes(config, 300 * 16000, 8) == 300 * 16000 * 4 * 2  # only the samples
    assert transcription_request_bytes(config, 16000, 16) > transcription_request_bytes(config, 16000, 8)


@pytest.mark.parametrize("limit", [16, 40, 400])
def test_text_is_split_at_sentences_then_clauses_then_words_never_past_the_limit(limit):
    text = ("The first sentence is short. The second one, which has a clause, is a little longer! "
            "Is the third a question? " + "Averyveryverylongwordwithoutanyspacesatall " * 2).strip()
    pieces = split_text(text, limit)
    assert all(0 < len(p) <= limit for p in pieces), pieces
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")  # nothing lost or reordered
    if limit == 40:
        assert pieces[0] == "The first sentence is short."  # a sentence end, not a word boundary


def test_split_text_edge_cases():
    assert split_text("", 10) == [] and split_text("   ", 10) == []
    assert split_text("Hello.", 10) == ["Hello."]
    assert split_text("abcdefghij" * 3, 10) == ["abcdefghij"] * 3


def test_long_audio_in_sub_batches_gives_the_same_transcript(tmp_path):
    from deployments.params import TranscribeParams
    from deployments.transcription import transcribe_batch
    from loading import ModelSpec, load_model
    from loading.tiny import build_tiny

    path = build_tiny("stt", tmp_path / "tiny-whisper")
    spec = ModelSpec(name="w", source=str(path), max_new_tokens=8)
    loaded = load_model(spec)
    rng = np.random.default_rng(0)
    audio = [rng.normal(0, 0.1, int(s * 16000)).astype(np.float32) for s in (95, 40)]  # 4 + 2 chunks

    def run(chunks_per_call: int):
        batch = [TranscribeParams(model="w", audio=a, sample_rate=16000, language="en") for a in audio]
        return transcribe_batch(spec, loaded, batch, chunks_per_call)

    whole, pieces = run(8), run(2)
    assert [len(r.segments) for r in whole] == [4, 2]
    assert [r.text for r in pieces] == [r.text for r in whole]
    assert [[s.start for s in r.segments] for r in pieces] == [[0.0, 30.0, 60.0, 90.0], [0.0, 30.0]]


def test_a_budget_left_unset_is_sized_from_free_memory_at_the_first_request():
    measured = []

    def measure():
        measured.append(1)
        return 8000 * MB, "RAM"

    gate = MemoryGate(None, fraction=0.25, measure=measure)
    assert gate.status()["budget_mb"] is None and not measured  # /health does not size it
    with pytest.raises(RequestTooLargeError) as info:
        gate.check(3000 * MB, "this chat request", param="messages")
    assert gate.budget == 2000 * MB and len(measured) == 1  # sized once
    message = to_error(info.value)[1].error.message
    assert "memory_budget_mb=2,000 MiB" in message and "0.25 x 8,000 MiB free in RAM" in message
    assert gate.status()["budget_mb"] == 2000 and "8,000 MiB free" in gate.status()["sized_from"]


def test_a_sized_budget_has_a_floor_and_free_memory_is_measured_here():
    from deployments.admission import MIN_SIZED_BUDGET, free_memory

    assert MemoryGate(None, measure=lambda: (10 * MB, "RAM")).budget == MIN_SIZED_BUDGET
    free, where = free_memory()  # this machine: no GPU, so RAM (or the container's limit)
    assert 0 < free < 2**50 and where in ("RAM", "the container's memory limit")


def test_the_family_option_defaults_to_sized_and_refuses_a_bad_fraction():
    from pydantic import ValidationError

    from deployments.options import ChatOptions

    assert ChatOptions().memory_budget_mb is None and ChatOptions().memory_budget_fraction == 0.25
    with pytest.raises(ValidationError, match="memory_budget_fraction"):
        ChatOptions(memory_budget_fraction=1.5)


def test_a_waiter_of_lower_priority_goes_first_and_is_not_starved_by_smaller_ones():
    """scheduling_policy: priority. While `big` (priority -1) waits for room, `small` (priority 0), which
    would fit, waits behind it; among equals a request that fits still goes in at once."""

    async def scenario():
        gate, order = MemoryGate(100 * MB), []

        async def job(name: str, need: int, priority: int, hold_s: float, start_s: float = 0.0):
            await asyncio.sleep(start_s)
            async with gate.hold(need * MB, name, priority=priority):
                order.append(f"{name} in")
                await asyncio.sleep(hold_s)
            order.append(f"{name} out")

        await asyncio.gather(job("first", 60, 0, 0.1), job("level", 30, 0, 0.0, 0.01),
                             job("big", 80, -1, 0.0, 0.02), job("small", 10, 0, 0.0, 0.03))
        return gate, order

    gate, order = asyncio.run(scenario())
    assert order.index("level in") < order.index("first out")  # equal priority, fits: in at once
    assert order.index("big in") > order.index("first out")
    assert order.index("small in") > order.index("big in"), order  # it fitted, but big waited ahead of it
    assert gate.in_use == 0 and not gate._waiters


def test_a_cancelled_waiter_of_lower_priority_lets_the_others_go():
    async def scenario():
        gate, order = MemoryGate(100 * MB), []

        async def job(name: str, need: int, priority: int):
            async with gate.hold(need * MB, name, priority=priority):
                order.append(name)

        async with gate.hold(100 * MB, "everything"):
            urgent = asyncio.ensure_future(job("urgent", 90, -5))
            await asyncio.sleep(0.01)
            later = asyncio.ensure_future(job("later", 10, 0))
            await asyncio.sleep(0.01)
            urgent.cancel()  # its caller went away while it waited
            await asyncio.sleep(0.01)
            assert order == []  # nothing fits yet
        await asyncio.wait_for(later, 5)
        return gate, order

    gate, order = asyncio.run(scenario())
    assert order == ["later"] and gate.in_use == 0 and not gate._waiters


def test_a_hold_grows_keeping_what_it_holds_and_counted_while_it_waits():
    """A chat with images holds their decoded size from the decode on and grows to its whole estimate:
    while it waits for room, what it holds is in use (others cannot take it) and shown as held while waiting."""

    async def scenario():
        gate, seen = MemoryGate(100 * MB), {}
        release = asyncio.Event()

        async def running():
            async with gate.hold(70 * MB, "running"):
                await release.wait()

        async def images():
            async with gate.hold(20 * MB, "images") as held:
                await held.grow(50 * MB, "this chat request")
                seen["grown"] = (gate.in_use, held.amount)

        first = asyncio.ensure_future(running())
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(images())
        await asyncio.sleep(0.01)
        seen["waiting"] = (gate.in_use, gate.waiting_held, gate.status()["held_while_waiting_mb"])
        with pytest.raises(asyncio.TimeoutError):  # 10 MB free: a third request cannot take the images' 20
            await asyncio.wait_for(gate.hold(20 * MB, "third").__aenter__(), 0.05)
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        return gate, seen

    gate, seen = asyncio.run(scenario())
    assert seen["waiting"] == (90 * MB, 20 * MB, 20.0)
    assert seen["grown"] == (50 * MB, 50 * MB)
    assert gate.in_use == 0 and gate.waiting_held == 0 and not gate._waiters


def test_holds_that_all_wait_to_grow_do_not_deadlock():
    """Two requests hold 40 of 100 each and wait to grow to 90: neither fits beside the other, and
    nothing else will free memory. The first goes (over budget by at most what the waiting ones hold),
    then the second fits."""

    async def scenario():
        gate, order = MemoryGate(100 * MB), []

        async def job(name: str, start_s: float):
            await asyncio.sleep(start_s)
            async with gate.hold(40 * MB, name) as held:
                await asyncio.sleep(0.02 - start_s)  # both hold their 40 before either grows
                await held.grow(90 * MB, name)
                order.append(f"{name} in ({gate.in_use // MB} MB)")
                await asyncio.sleep(0.01)
            order.append(f"{name} out")

        await asyncio.wait_for(asyncio.gather(job("a", 0.0), job("b", 0.005)), 5)
        return gate, order

    gate, order = asyncio.run(scenario())
    assert order == ["a in (130 MB)", "a out", "b in (90 MB)", "b out"]
    assert gate.peak == 130 * MB and gate.in_use == 0 and gate.waiting_held == 0


def test_growing_past_the_budget_is_a_413_and_the_hold_is_released():
    async def scenario():
        gate = MemoryGate(100 * MB)
        with pytest.raises(RequestTooLargeError, match="this chat request needs an estimated 120 MiB"):
            async with gate.hold(10 * MB, "images") as held:
                await held.grow(120 * MB, "this chat request", param="messages")
        return gate

    gate = asyncio.run(scenario())
    assert gate.in_use == 0 and gate.waiting_held == 0


def test_a_grower_of_lower_priority_goes_before_a_new_hold():
    async def scenario():
        gate, order = MemoryGate(100 * MB), []
        release = asyncio.Event()

        async def running():
            async with gate.hold(60 * MB, "running"):
                await release.wait()
            order.append("running out")

        async def grower():
            async with gate.hold(10 * MB, "urgent", priority=-1) as held:
                await held.grow(50 * MB, "urgent")
                order.append("urgent in")

        async def newcomer():
            async with gate.hold(20 * MB, "newcomer", priority=0):
                order.append("newcomer in")

        tasks = [asyncio.ensure_future(running())]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.ensure_future(grower()))
        await asyncio.sleep(0.01)
        tasks.append(asyncio.ensure_future(newcomer()))  # 20 would fit beside 70, but urgent waits ahead
        await asyncio.sleep(0.01)
        assert order == []
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return order

    assert asyncio.run(scenario()) == ["running out", "urgent in", "newcomer in"]


def test_the_deadlock_breaker_waits_while_a_more_urgent_waiter_fits():
    """R holds 50; G (priority 0) holds 40 and waits to grow to 90; H (priority -1) waits for 50. When R
    leaves, only waiting holders hold memory, but H fits beside G's 40 and is more urgent: H goes, not G."""

    async def scenario():
        gate, order = MemoryGate(100 * MB), []
        release = asyncio.Event()

        async def running():
            async with gate.hold(50 * MB, "R"):
                await release.wait()

        async def grower():
            async with gate.hold(40 * MB, "G", priority=0) as held:
                await held.grow(90 * MB, "G")
                order.append(f"G in ({gate.in_use // MB} MB)")
                await asyncio.sleep(0.01)

        async def urgent():
            async with gate.hold(50 * MB, "H", priority=-1):
                order.append(f"H in ({gate.in_use // MB} MB)")
                await asyncio.sleep(0.01)
            order.append("H out")

        tasks = [asyncio.ensure_future(running())]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.ensure_future(grower()))
        await asyncio.sleep(0.01)
        tasks.append(asyncio.ensure_future(urgent()))
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return gate, order

    gate, order = asyncio.run(scenario())
    assert order == ["H in (90 MB)", "H out", "G in (90 MB)"]
    assert gate.peak == 90 * MB and gate.in_use == 0


def test_the_deadlock_breaker_does_not_pass_the_budget_while_a_waiter_of_equal_priority_fits():
    """G1 holds 40 and waits to grow to 90, G2 holds 30 and waits to grow to 80, T waits for 20. When R
    leaves, every byte in use is the growers', but T fits: T goes, and the breaker (which lets a grower
    in over the budget) waits until nothing else can go."""

    async def scenario():
        gate, order = MemoryGate(100 * MB), []
        release = asyncio.Event()

        async def running():
            async with gate.hold(30 * MB, "R"):
                await release.wait()

        async def grower(name: str, hold: int, grow: int):
            async with gate.hold(hold * MB, name) as held:
                await held.grow(grow * MB, name)
                order.append(f"{name} in ({gate.in_use // MB} MB)")
                await asyncio.sleep(0.01)
            order.append(f"{name} out")

        async def text():
            async with gate.hold(20 * MB, "T"):
                order.append(f"T in ({gate.in_use // MB} MB)")
                await asyncio.sleep(0.01)
            order.append("T out")

        tasks = [asyncio.ensure_future(running())]
        for job in (grower("G1", 40, 90), grower("G2", 30, 80), text()):
            await asyncio.sleep(0.01)
            tasks.append(asyncio.ensure_future(job))
        await asyncio.sleep(0.01)
        assert order == []  # 100 MB in use
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return gate, order

    gate, order = asyncio.run(scenario())
    assert order == ["T in (90 MB)", "T out", "G1 in (120 MB)", "G1 out", "G2 in (80 MB)", "G2 out"]
    assert gate.peak == 120 * MB and gate.in_use == 0


def test_of_waiters_of_equal_priority_that_fit_the_first_to_arrive_goes_first():
    """W waits for 50. The task holding G's images (10) and R (80) lets R go and at once asks to grow G
    to 60: W and G each fit then, not both. W, which waited first, goes first; before, G took the room
    in the same turn of the event loop, before W woke."""

    async def scenario():
        gate, order = MemoryGate(100 * MB), []

        async def waiter():
            async with gate.hold(50 * MB, "W"):
                order.append(f"W in ({gate.in_use // MB} MB)")
                await asyncio.sleep(0.01)
            order.append("W out")

        async def images_then_growth():
            async with gate.hold(10 * MB, "G") as held:
                async with gate.hold(80 * MB, "R"):
                    task = asyncio.ensure_future(waiter())
                    await asyncio.sleep(0.01)  # W waits: 90 + 50 > 100
                await held.grow(60 * MB, "G")
                order.append(f"G in ({gate.in_use // MB} MB)")
            await task

        await asyncio.wait_for(images_then_growth(), 5)
        return order

    assert asyncio.run(scenario()) == ["W in (60 MB)", "W out", "G in (60 MB)"]


def test_free_memory_is_measured_where_the_models_compute(monkeypatch):
    """A GPU CUDA lists but cannot open: the load fell back to the CPU, but the memory gate asked cuda:0 for
    its free memory at every request, which raised: a 500 for a model that had loaded. Free memory is now
    read where the replica's models are (a model on the CPU: RAM), and a GPU that cannot answer is not asked."""
    import torch

    from deployments.admission import free_memory

    asked: list[int] = []

    def mem_get_info(index: int = 0):
        asked.append(index)
        if index == 0:
            raise RuntimeError("CUDA error: CUDA-capable device(s) is/are busy or unavailable")
        return 5 * 2**30, 8 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert free_memory("cpu")[1] in ("RAM", "the container's memory limit") and asked == []
    assert free_memory("cuda:1") == (5 * 2**30, "cuda:1") and asked == [1]
    assert free_memory(None)[1] in ("RAM", "the container's memory limit") and asked == [1, 0]  # cuda:0 broken


def test_a_replica_sizes_its_budget_where_its_loaded_model_is(tiny_llm_dirs, monkeypatch):
    import torch

    from deployments.llm import LLMServer
    from deployments.options import ChatOptions
    from deployments.params import ChatParams
    from loading import ModelSpec

    server = LLMServer([ModelSpec(name="t", source=str(tiny_llm_dirs[0]), max_new_tokens=4)], ChatOptions())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU listed, that cannot be opened
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (_ for _ in ()).throw(RuntimeError("busy")))
    result = asyncio.run(server.chat(ChatParams(model="t", messages=[{"role": "user", "content": "hi"}],
                                                max_new_tokens=2, temperature=0, wait_s=60)))
    assert result.completion_tokens > 0 and server._compute_device() == "cpu"
    assert "RAM" in server.memory.sized_from or "container" in server.memory.sized_from
