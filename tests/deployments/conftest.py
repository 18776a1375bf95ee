"""Shared fixtures: the tiny Llama and a LoRA adapter on it, built once per session."""

from __future__ import annotations

import pytest

from loading import ModelSpec, attach_adapter, load_model
from loading.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny_llm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-llm-models")
    base_dir = build_tiny("llm", root / "tiny-llm")
    return base_dir, build_tiny("llm-lora", root / "tiny-llm-lora", base=base_dir)


@pytest.fixture(scope="session")
def tiny_llm_models(tiny_llm_dirs):
    """`make(max_new_tokens)`: {"tiny": (spec, loaded base), "lora": (spec, the adapter on that base)},
    a fresh load each call (a module's adapters and cache state stay its own)."""
    base_dir, lora_dir = tiny_llm_dirs

    def make(max_new_tokens: int) -> dict:
        spec = ModelSpec(name="tiny", source=str(base_dir), max_new_tokens=max_new_tokens)
        base = load_model(spec)
        lora_spec = ModelSpec(name="lora", source=str(lora_dir), base_model="tiny", max_new_tokens=max_new_tokens)
        return {"tiny": (spec, base), "lora": (lora_spec, attach_adapter(lora_spec, base))}

    return make
