"""LoRA adapters on one base: one copy of the base weights serves the base and every adapter."""

from __future__ import annotations

import threading

import torch

from loading import ModelSpec, attach_adapter, load_model
from loading.tiny import build_tiny


def logits(loaded, text="The weather today is"):
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with loaded.active() as model, torch.inference_mode():
        return model(input_ids=ids).logits[0, -1]


def test_adapters_share_the_base_weights_and_each_call_sees_only_its_own(tiny, tmp_path, isolated_env):
    second = build_tiny("llm-lora", tmp_path / "lora-2", base=tiny["llm"], seed=7)
    base = load_model(ModelSpec(name="base", source=str(tiny["llm"])))
    before = logits(base)

    one = attach_adapter(ModelSpec(name="one", source=str(tiny["llm-lora"]), base_model="base"), base)
    two = attach_adapter(ModelSpec(name="two", source=str(second), base_model="base"), base)

    # one set of weights in memory: the same module objects answer for all three names
    assert one.model is two.model is base.model
    assert one.lock is base.lock
    assert one.report.base_resolved_from == "shared with served model 'base'"
    # the base still answers as the base, each adapter as itself
    assert torch.allclose(logits(base), before, atol=1e-6)
    standalone = load_model(ModelSpec(name="alone", source=str(tiny["llm-lora"])))
    assert torch.allclose(logits(one), logits(standalone), atol=1e-5)
    assert not torch.allclose(logits(one), before, atol=1e-4)
    assert not torch.allclose(logits(one), logits(two), atol=1e-4)


def test_interleaved_calls_from_threads_keep_their_adapter(tiny, isolated_env):
    base = load_model(ModelSpec(name="base", source=str(tiny["llm"])))
    adapter = attach_adapter(ModelSpec(name="lora", source=str(tiny["llm-lora"]), base_model="base"), base)
    expected = {"base": logits(base), "lora": logits(adapter)}
    mismatches = []

    def worker(name, loaded):
        for _ in range(20):
            if not torch.allclose(logits(loaded), expected[name], atol=1e-5):
                mismatches.append(name)

    threads = [threading.Thread(target=worker, args=item) for item in (("base", base), ("lora", adapter))] * 1
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mismatches == []


def test_a_base_call_leaves_adapter_layers_off_and_the_next_adapter_call_or_attach_turns_them_on(tiny, tmp_path,
                                                                                               isolated_env,
                                                                                               monkeypatch):
    """Where no base view can be built (loading/base_view.py), base calls switch the adapter layers off
    once and leave them so (PEFT's disable_adapter() context walked every module twice per call: half the
    tiny model's decode speed); whatever needs them on (a call with an adapter, an attach) turns them on
    first."""
    monkeypatch.setattr("loading.report.base_view", lambda model: None)
    second = build_tiny("llm-lora", tmp_path / "lora-2", base=tiny["llm"], seed=7)
    base = load_model(ModelSpec(name="base", source=str(tiny["llm"])))
    before = logits(base)
    one = attach_adapter(ModelSpec(name="one", source=str(tiny["llm-lora"]), base_model="base"), base)
    with_one = logits(one)
    assert torch.allclose(logits(base), before, atol=1e-6)
    assert base.model._adapters_disabled  # left off after the base call
    two = attach_adapter(ModelSpec(name="two", source=str(second), base_model="base"), base)  # attached while off
    standalone_two = load_model(ModelSpec(name="alone", source=str(second)))
    for _ in range(2):  # any order of calls answers as each model
        assert torch.allclose(logits(two), logits(standalone_two), atol=1e-5)
        assert torch.allclose(logits(base), before, atol=1e-6)
        assert torch.allclose(logits(one), with_one, atol=1e-6)
