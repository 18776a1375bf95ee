"""A request keeps the model it was admitted with to its end. It looked the model up by name again after
generating: one evicted (least recently used) or unloaded and re-added meanwhile answered a finished
request with a 503 "still loading"."""

from __future__ import annotations

import asyncio

from deployments.llm import LLMServer
from deployments.options import ChatOptions
from deployments.params import ChatParams
from loading import ModelLoadingInProgress, ModelSpec


def test_a_running_request_finishes_though_its_model_is_gone_from_the_pool(tiny_llm_dirs):
    spec = ModelSpec(name="m", source=str(tiny_llm_dirs[0]), max_new_tokens=24, debug_step_delay_s=0.01)
    server = LLMServer([spec], ChatOptions())

    async def gone(name, wait_s=0.0):
        raise ModelLoadingInProgress(name, "resolving", 0.1, 2.0)

    async def scenario():
        first = ChatParams(model="m", messages=[{"role": "user", "content": "hi"}], max_new_tokens=24,
                           temperature=0, wait_s=60)
        alone = await server.chat(first)
        started = asyncio.Event()
        params = ChatParams(model="m", messages=[{"role": "user", "content": "hi"}], max_new_tokens=24,
                            temperature=0, wait_s=60, logprobs=True)
        params.sink = lambda text: started.set()
        task = asyncio.ensure_future(server.chat(params))
        await asyncio.wait_for(started.wait(), 30)
        server.pool.get = gone  # evicted, or unloaded and added again, while it generates
        return alone, await asyncio.wait_for(task, 30)

    alone, result = asyncio.run(scenario())
    assert result.text == alone.text and result.logprobs


def test_a_batched_transcription_keeps_the_model_it_was_admitted_with(tmp_path):
    """Batched calls (STT, and chat models served through generate()) looked their model up by name again
    when their batch ran: a request admitted with its model loaded, queued behind a batch while another lazy
    model's load evicted it (max_loaded_models), got a 503 "still loading" and loaded the model once more."""
    import numpy as np

    from deployments.options import TranscriptionOptions
    from deployments.params import TranscribeParams
    from deployments.stt import STTServer
    from loading.tiny import build_tiny

    spec = ModelSpec(name="w", source=str(build_tiny("stt", tmp_path / "w")), max_new_tokens=8, loading="lazy")
    server = STTServer([spec], TranscriptionOptions(fallback_temperatures=[0.0]))
    looked_up = server.pool.get

    async def evicted_after_admission(name, wait_s=0.0):
        if evicted_after_admission.calls:  # the model left the pool once this request was admitted
            raise ModelLoadingInProgress(name, "resolving", 0.1, 2.0)
        evicted_after_admission.calls += 1
        return await looked_up(name, wait_s)

    evicted_after_admission.calls = 0
    audio = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)

    async def scenario():
        server.pool.get = evicted_after_admission
        return await server.transcribe(TranscribeParams(model="w", audio=audio, sample_rate=16000, language="en",
                                                        wait_s=60))

    result = asyncio.run(scenario())
    assert result.segments and result.language == "en"
