"""The decode loop shares its replica's one inference thread: other model calls waiting for it go first.

The loop runs as one call for as long as requests keep coming, so a generate() batch of a model it cannot
run (3-D rotary positions, as Qwen2-VL's, beside a LLaVA in one VLM replica) waited for a pause in the
other model's traffic: with 8 clients of the decode-loop model it got no answer in 20 s (0.1 s alone)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

from deployments.chat_server import uses_decode_loop
from deployments.llm import LLMServer
from deployments.options import ChatOptions
from deployments.params import ChatParams
from loading import ModelSpec


def test_a_generate_call_does_not_wait_for_the_decode_loops_traffic_to_stop(tiny_llm_dirs, tmp_path):
    mrope = shutil.copytree(tiny_llm_dirs[0], tmp_path / "tiny-llm-mrope")  # positions as Qwen2-VL's
    config = json.loads((mrope / "config.json").read_text())
    config["rope_parameters"]["mrope_section"] = [4, 2, 2]
    (mrope / "config.json").write_text(json.dumps(config))
    server = LLMServer([ModelSpec(name="loop", source=str(tiny_llm_dirs[0]), max_new_tokens=32, loading="eager",
                                  debug_step_delay_s=0.005),
                        ModelSpec(name="gen", source=str(mrope), max_new_tokens=16, loading="eager")],
                       ChatOptions(memory_budget_mb=1024))
    assert not uses_decode_loop(server.pool.handles["gen"].loaded)

    def chat(model: str, tokens: int) -> ChatParams:
        return ChatParams(model=model, messages=[{"role": "user", "content": "hi"}], max_new_tokens=tokens,
                          temperature=0)

    async def scenario():
        stop = asyncio.Event()

        async def client(tokens: int) -> None:  # rows of different lengths: the loop never runs dry
            while not stop.is_set():
                await server.chat(chat("loop", tokens))

        clients = [asyncio.ensure_future(client(8 + 3 * i)) for i in range(8)]
        await asyncio.sleep(1)
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(server.chat(chat("gen", 16)), 10)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        return result, time.monotonic() - started

    result, waited = asyncio.run(scenario())
    assert result.completion_tokens > 0 and waited < 5, f"the generate() request waited {waited:.1f} s"
