"""Fixtures for the loading/ tests: tiny real-architecture models (built once per session, offline)
and an environment isolated from the machine's own models, caches and offline flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from loading.offline import reset_probe_cache
from loading.tiny import build_tiny

from loading_testutil import TIMINGS

# Every variable that changes where models are looked up or whether the Hub is used.
ISOLATED_VARIABLES = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OFFLINE", "HF_FORCE_OFFLINE", "TRANSFORMERS_CACHE",
    "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
    "MODELFLEET_HUB_PROBE_TIMEOUT_S", "MODELFLEET_HUB_READ_TIMEOUT_S", "OFFLOAD_FOLDER",
)
@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny(tiny_root) -> dict[str, Path]:
    """kind -> directory of a tiny model: llm, stt, tts, vlm, llm-lora (absolute base), llm-seed1."""
    out: dict[str, Path] = {}
    for kind in ("llm", "stt", "tts", "vlm"):
        out[kind] = build_tiny(kind, tiny_root / kind)
    out["llm-lora"] = build_tiny("llm-lora", tiny_root / "llm-lora", base=out["llm"])
    out["llm-seed1"] = build_tiny("llm", tiny_root / "llm-seed1", seed=1)
    return out


def _tiny_qwen_vl(dest: Path, kind: str) -> Path:
    """A tiny Qwen2-VL / Qwen2.5-VL checkpoint (config + random weights, no processor: it needs torchvision)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    config_cls, model_cls = {
        "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
        "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    }[kind]
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=256, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
                rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, embed_dim=32,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = config_cls(text_config=text, vision_config=vision, image_token_id=250, video_token_id=251,
                        vision_start_token_id=252)
    model_cls(config).save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def qwen_vl(tiny_root) -> dict[str, Path]:
    return {kind: _tiny_qwen_vl(tiny_root / kind, kind) for kind in ("qwen2_5_vl", "qwen2_vl")}


@pytest.fixture
def isolated_env(tmp_path, monkeypatch) -> dict[str, Path]:
    """LOCAL_MODELS_DIR, HF_HOME and HF_HUB_CACHE in tmp dirs; no offline flag, proxy or endpoint set."""
    for name in ISOLATED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    paths = {
        "models": tmp_path / "models",
        "hf_home": tmp_path / "hf_home",
        "hub_cache": tmp_path / "hf_home" / "hub",
    }
    paths["models"].mkdir()
    monkeypatch.setenv("LOCAL_MODELS_DIR", str(paths["models"]))
    monkeypatch.setenv("HF_HOME", str(paths["hf_home"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(paths["hub_cache"]))
    monkeypatch.chdir(tmp_path)  # relative candidates (a Hub id read as a path) resolve in here
    reset_probe_cache()
    yield paths
    reset_probe_cache()


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_sep("=", "loading/ measured timings (s)")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"  {name:62s} {seconds:7.3f}")
