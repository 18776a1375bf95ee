"""The replica's health check under steady traffic: the decode loop runs as one inference-thread call for
as long as requests keep coming, and the check (a call far past every model's time bound is stuck) must
see its steps as progress. Before, a healthy LLM replica under 6 minutes of steady load failed it, and
Serve would have killed it."""

from __future__ import annotations

import asyncio
import time

from deployments.llm import LLMServer
from deployments.options import ChatOptions
from deployments.params import ChatParams
from loading import ModelSpec


def test_a_replica_decoding_without_pause_stays_healthy(tiny_llm_dirs):
    spec = ModelSpec(name="tiny", source=str(tiny_llm_dirs[0]), max_new_tokens=16, generation_timeout_s=0.5,
                     debug_step_delay_s=0.01)
    server = LLMServer([spec], ChatOptions())
    server._stuck_after_s = 1.5  # 3 x generation_timeout_s
    failures: list[str] = []

    async def scenario():
        deadline = time.monotonic() + 4.0

        async def client():
            while time.monotonic() < deadline:
                result = await server.chat(ChatParams(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                      max_new_tokens=16, temperature=0, wait_s=60))
                assert result.completion_tokens > 0

        async def probe():
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                try:
                    server.check_health()
                except RuntimeError as exc:
                    failures.append(str(exc))

        await asyncio.gather(client(), client(), probe())

    asyncio.run(scenario())
    assert failures == []
    assert server.batch_stats.get("decode_steps", 0) > 100  # it did decode throughout


def test_a_silent_controller_costs_health_one_thread_not_one_per_probe():
    """serve.status() waits on Serve's controller without a bound: each /health probe while it did not
    answer left a blocked thread in the default executor, which also runs the guard's JSON checks and media
    decoding, and after ~5 probes those requests hung. One fetch is in flight at a time, on its own thread."""
    import threading

    from deployments.app_config import AppConfig
    from deployments.health import HealthMonitor

    config = AppConfig.model_validate({"models": [{"name": "m", "source": "m", "family": "llm"}],
                                       "status_timeout_s": 0.05})
    monitor = HealthMonitor(config, None, ["llm"], [], {})
    release, calls = threading.Event(), []

    def silent_controller() -> dict:
        calls.append(1)
        release.wait(10)
        return {"llm": {"status": "HEALTHY"}}

    monitor._fetch_deployments = silent_controller

    async def scenario() -> tuple[list, dict]:
        views = []
        for _ in range(6):
            monitor._deployments = None  # past the 1 s cache
            views.append(await monitor.deployment_states())
        default_pool_free = await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 1.0)
        assert len(calls) == 1  # six probes, one fetch waiting on the controller
        release.set()
        await asyncio.sleep(0.2)
        monitor._deployments = None
        return views + [default_pool_free], await monitor.deployment_states()

    views, answered = asyncio.run(scenario())
    assert views == [{}] * 6 + ["free"]
    assert answered == {"llm": {"status": "HEALTHY"}}
