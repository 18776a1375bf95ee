"""The strategy chain: each step that failed says why, the report names the one that loaded.

Issue: a 4-bit load failed (bitsandbytes built for another CUDA, or not importable) and the
replica died with a bitsandbytes traceback, without trying 8-bit or full precision and without
saying which strategy the model finally ran with.
"""

from __future__ import annotations

import logging
import sys

import torch

from loading import ModelSpec, load_model
from loading.quantization import bitsandbytes_status

from loading_testutil import Timer, record


def test_4bit_on_cpu_loads_with_bitsandbytes(isolated_env, tiny):
    with Timer() as t:
        loaded = load_model(ModelSpec(name="tiny-llm", source=str(tiny["llm"]), quantization="4bit"))
    record("load_model tiny llm 4-bit (bitsandbytes, cpu)", t.seconds)
    report = loaded.report
    assert report.strategy.startswith("4-bit") and report.device == "cpu"
    assert [a.outcome for a in report.attempts] == ["loaded"]
    assert any(type(m).__name__ == "Linear4bit" for m in loaded.model.modules())
    out = loaded.model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3)
    assert out.shape == (1, 6)


def test_unusable_bitsandbytes_falls_back_4bit_8bit_cpu(isolated_env, tiny, monkeypatch, caplog):
    # A broken install: `import bitsandbytes` raises (None in sys.modules makes every import fail).
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    caplog.set_level(logging.WARNING, logger="loading")
    loaded = load_model(ModelSpec(name="tiny-llm", source=str(tiny["llm"]), quantization="4bit"))
    report = loaded.report
    assert [(a.strategy, a.outcome) for a in report.attempts] == [
        ("4-bit (bitsandbytes nf4) on cpu", "failed"),
        ("8-bit (bitsandbytes int8) on cpu", "failed"),
        ("float32 on cpu", "loaded"),
    ]
    assert all("bitsandbytes" in a.reason for a in report.attempts[:2])
    assert report.strategy == "float32 on cpu" and report.dtype == "float32" and report.device == "cpu"
    assert not any("Linear4bit" in type(m).__name__ or "Linear8bit" in type(m).__name__
                   for m in loaded.model.modules())
    fallbacks = [r.getMessage() for r in caplog.records
                 if r.levelname == "WARNING" and "falling back" in r.getMessage()]
    assert len(fallbacks) == 2
    assert "4-bit" in fallbacks[0] and "8-bit" in fallbacks[1]
    assert all("bitsandbytes" in message for message in fallbacks)


def test_quantization_none_on_cpu_is_one_step(isolated_env, tiny):
    report = load_model(ModelSpec(name="tiny-llm", source=str(tiny["llm"]), quantization="none")).report
    assert [(a.strategy, a.outcome) for a in report.attempts] == [("float32 on cpu", "loaded")]


def test_bitsandbytes_status_here():
    status = bitsandbytes_status()
    assert status.installed and status.version
    assert any(lib.startswith("libbitsandbytes_cpu.") for lib in status.native_libraries)
    if not torch.cuda.is_available():
        assert status.needed_library == "libbitsandbytes_cpu"
        assert status.usable is True
        assert "libbitsandbytes_cpu" in status.message


def test_float16_on_cpu_is_float32_with_a_warning_that_says_so(isolated_env, tiny):
    report = load_model(ModelSpec(name="tiny-llm", source=str(tiny["llm"]), dtype="float16", device="cpu")).report
    assert report.dtype == "float32"
    assert [w for w in report.warnings if "dtype: float16" in w and "float32" in w and "dtype: bfloat16" in w]


def test_a_prequantized_checkpoint_is_reported_and_placed_as_stored(isolated_env, tiny, tmp_path):
    """A *-bnb-4bit checkpoint (quantization_config in its config.json) loaded 4-bit but was reported as
    'float32 on cpu' and placed at 4 bytes per parameter (found by review)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from loading.model_source import read_config_file
    from loading.placement import stored_bytes
    from loading.quantization import model_strategies

    stored = tmp_path / "tiny-bnb-4bit"
    AutoModelForCausalLM.from_pretrained(tiny["llm"], device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)).save_pretrained(stored)
    AutoTokenizer.from_pretrained(tiny["llm"]).save_pretrained(stored)
    spec = ModelSpec(name="q", source=str(stored))
    report = load_model(spec).report
    assert [(a.strategy, a.outcome) for a in report.attempts] == [("pre-quantized bitsandbytes 4-bit on cpu", "loaded")]
    assert report.strategy == "pre-quantized bitsandbytes 4-bit on cpu"
    chain = model_strategies(spec, "cuda:0", read_config_file(stored, spec.source))
    assert [s.name for s in chain] == ["pre-quantized bitsandbytes 4-bit on cuda:0", "pre-quantized bitsandbytes 4-bit on cpu"]
    assert chain[0].estimate_bytes(stored, report.parameters) == stored_bytes(stored)
