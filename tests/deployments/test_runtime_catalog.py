"""Models and adapters added at run time: the catalog's own checks, and when a removed one's memory goes.

Found by review: an adapter whose base was unloaded while the adapter was being added outlived its base
(the ingress checked only the records written before), and a model unloaded and added again under its
name kept its old copy in memory for as long as the new copy had traffic (requests counted by name)."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.llm import LLMServer
from deployments.options import ChatOptions
from deployments.params import ChatParams
from deployments.runtime_catalog import BaseGone, BaseInUse, CatalogActor, NameTaken, RuntimeRecord, Snapshot
from loading import Family, LoadingMode, ModelSpec


def _model(name: str, source: str = "/nowhere") -> RuntimeRecord:
    return RuntimeRecord("model", ModelSpec(name=name, source=source, family=Family.LLM, loading=LoadingMode.LAZY,
                                            max_new_tokens=400, debug_step_delay_s=0.01))  # ~10 ms a step


def _adapter(name: str, base: str) -> RuntimeRecord:
    return RuntimeRecord("adapter", ModelSpec(name=name, source="/nowhere-lora", family=Family.LLM, base_model=base))


def test_the_catalog_refuses_an_adapter_whose_base_went_and_a_base_that_adapters_sit_on():
    catalog = CatalogActor()
    base = _model("base")
    catalog.put(base)
    catalog.remove("base")  # unloaded while the adapter's files were checked
    with pytest.raises(BaseGone):
        catalog.put(_adapter("a", "base"), base.uid)
    again = _model("base")
    catalog.put(again)
    with pytest.raises(BaseGone):  # the base of that name now is another addition
        catalog.put(_adapter("a", "base"), base.uid)
    catalog.put(_adapter("a", "base"), again.uid)
    with pytest.raises(BaseInUse) as refused:
        catalog.remove("base")
    assert refused.value.users == ["a"]
    assert [r.spec.name for r in catalog.snapshot().records] == ["base", "a"]
    with pytest.raises(NameTaken):
        catalog.put(_adapter("a", "base"), again.uid)
    catalog.put(_adapter("b", "configured-base"))  # a configured base: nothing to check here
    catalog.remove("a")
    catalog.remove("base")
    assert [r.spec.name for r in catalog.snapshot().records] == ["b"]


def test_a_removed_copy_goes_once_its_own_requests_end_not_those_of_a_copy_added_again(tiny_llm_dirs):
    configured = ModelSpec(name="configured", source=str(tiny_llm_dirs[0]), family=Family.LLM)
    server = LLMServer([configured], ChatOptions())
    source = str(tiny_llm_dirs[0])

    def slow(tokens: int) -> ChatParams:
        return ChatParams(model="x", messages=[{"role": "user", "content": "hi"}], max_new_tokens=tokens,
                          temperature=0, wait_s=60)

    async def started(tokens: int) -> tuple[asyncio.Task, asyncio.Event]:
        params, first = slow(tokens), asyncio.Event()
        params.sink = lambda text: first.set()
        task = asyncio.ensure_future(server.call("", "chat", params))
        await asyncio.wait_for(first.wait(), 60)
        return task, first

    async def scenario():
        old = _model("x", source)
        server.runtime._apply(Snapshot("e:1", (old,)))
        old_request, _ = await started(40)
        server.runtime._apply(Snapshot("e:2", ()))  # unloaded while old_request runs
        assert old.uid in server.runtime.retiring
        new = _model("x", source)
        server.runtime._apply(Snapshot("e:3", (new,)))  # and added again under its name
        new_request, _ = await started(400)
        state = await server.runtime.state(["x"], 0.0)
        assert state["in_flight"] == {"x": 2}  # the admin route's figure: both copies' requests
        await asyncio.wait_for(old_request, 60)
        deadline = time.monotonic() + 5
        while old.uid in server.runtime.retiring and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        released_while_new_runs = old.uid not in server.runtime.retiring and not new_request.done()
        old_gone = "x" not in server.pool.retired
        result = await asyncio.wait_for(new_request, 60)
        return released_while_new_runs, old_gone, result, await server.runtime.state(["x"], 0.0)

    released, old_gone, result, state = asyncio.run(scenario())
    assert released, "the removed copy waited for the traffic of the copy added again under its name"
    assert old_gone
    assert result.completion_tokens > 0 and state["in_flight"] == {"x": 0}


def test_an_adapter_dropped_and_given_back_as_it_was_keeps_serving(tiny_llm_dirs):
    """With several ingress replicas a family replica can be told a catalog without an adapter, then one with
    the very same addition again (an admin change on a restarted ingress replica before the survivor gave its
    additions back). The addition came back under its old PEFT name while the removed copy waited for its
    requests to end, and then deleted the adapter from the base: every later request for it failed (ValueError:
    Adapter runtime_... not found)."""
    base_dir, lora_dir = tiny_llm_dirs
    server = LLMServer([ModelSpec(name="base", source=str(base_dir), family=Family.LLM)], ChatOptions())

    def lora(name: str) -> RuntimeRecord:
        return RuntimeRecord("adapter", ModelSpec(name=name, source=str(lora_dir), family=Family.LLM,
                                                  base_model="base", debug_step_delay_s=0.02))

    adapter, other = lora("a"), lora("b")  # two: PEFT's last adapter on a base is never deleted

    def ask(tokens: int) -> ChatParams:
        return ChatParams(model="a", messages=[{"role": "user", "content": "hi"}], max_new_tokens=tokens,
                          temperature=0, wait_s=60)

    async def scenario():
        server.runtime._apply(Snapshot("e1:2", (other, adapter)))
        before = await server.call("", "chat", ask(8))
        running, first = ask(100), asyncio.Event()
        running.sink = lambda text: first.set()
        request = asyncio.ensure_future(server.call("", "chat", running))  # ~2 s
        await asyncio.wait_for(first.wait(), 60)
        server.runtime._apply(Snapshot("e2:1", (other,)))
        server.runtime._apply(Snapshot("e2:2", (other, adapter)))
        await asyncio.to_thread(server.pool.handles["a"].get, 30)  # attached again while the request runs
        await asyncio.wait_for(request, 60)
        deadline = time.monotonic() + 30
        while adapter.uid in server.runtime.retiring and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert adapter.uid not in server.runtime.retiring, "the removed copy was never released"
        return before, await server.call("", "chat", ask(8))

    before, after = asyncio.run(scenario())
    assert after.text == before.text and after.completion_tokens == before.completion_tokens
