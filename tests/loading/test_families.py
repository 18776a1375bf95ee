"""Family detection and the processor each family gets, on tiny real models.

Issue: a Qwen2.5-VL checkpoint configured as an LLM was fed to AutoModelForCausalLM, which fails
with "Unrecognized configuration class"; text-only models were given an AutoProcessor (or a VLM
only a tokenizer). We decide the Auto class and the processor from transformers' own mappings.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loading import Family, ModelSpec, UnsupportedModelError, load_model
from loading.families import select_family

from loading_testutil import FAIL_FAST_S, Timer, record


# -- 1. a VLM config never reaches AutoModelForCausalLM ------------------------------------------
def test_qwen25_vl_through_the_llm_path_fails_in_transformers(qwen_vl):
    """The failure users saw: AutoModelForCausalLM does not know Qwen2.5-VL's config class."""
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_pretrained(qwen_vl["qwen2_5_vl"])


@pytest.mark.parametrize("kind, model_class", [
    ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
])
def test_qwen_vl_configured_as_llm_is_rejected_with_the_fix(qwen_vl, kind, model_class):
    config = AutoConfig.from_pretrained(qwen_vl[kind])
    with pytest.raises(UnsupportedModelError) as info:
        select_family(config, Family.LLM, "Org/Qwen-VL")
    message = str(info.value)
    assert "VLM" in message and "family: vlm" in message and kind in message
    assert "AutoModelForImageTextToText" in message

    detected = select_family(config, None, "Org/Qwen-VL")
    assert detected.family is Family.VLM
    assert detected.auto_model == "AutoModelForImageTextToText"
    assert detected.model_class_name(config.model_type) == model_class
    assert detected.processor_class(config.model_type) == "AutoProcessor"
    assert select_family(config, Family.VLM, "Org/Qwen-VL") is detected


def test_qwen25_vl_loads_with_the_detected_class(qwen_vl):
    """The detected class really loads the checkpoint (no torchvision needed for the model)."""
    import transformers

    config = AutoConfig.from_pretrained(qwen_vl["qwen2_5_vl"])
    family = select_family(config, None, "qwen")
    model = getattr(transformers, family.auto_model).from_pretrained(qwen_vl["qwen2_5_vl"])
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_load_model_rejects_vlm_as_llm_before_reading_weights(isolated_env, qwen_vl, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    for name in ("AutoModelForCausalLM", "AutoModelForImageTextToText"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", no_weights)
    with Timer() as t, pytest.raises(UnsupportedModelError, match="family: vlm"):
        load_model(ModelSpec(name="qwen-vl", source=str(qwen_vl["qwen2_5_vl"]), family="llm"))
    assert t.seconds < FAIL_FAST_S


def test_llm_config_is_llm_and_unknown_is_explained(tiny):
    config = AutoConfig.from_pretrained(tiny["llm"])
    assert select_family(config, None, "x").family is Family.LLM
    with pytest.raises(UnsupportedModelError, match="family: llm"):
        select_family(config, Family.VLM, "x")


# -- 3. each family gets the processor it needs; measured load seconds ----------------------------
@pytest.mark.parametrize("kind, family, model_class, processor_class, processor_type", [
    ("llm", "llm", "LlamaForCausalLM", "AutoTokenizer", None),
    ("vlm", "vlm", "LlavaForConditionalGeneration", "AutoProcessor", "LlavaProcessor"),
    ("stt", "stt", "WhisperForConditionalGeneration", "AutoProcessor", "WhisperProcessor"),
    ("tts", "tts", "VitsModel", "AutoTokenizer", "VitsTokenizer"),
])
def test_each_family_loads_with_its_processor(isolated_env, tiny, kind, family, model_class, processor_class,
                                              processor_type):
    spec = ModelSpec(name=f"tiny-{kind}", source=str(tiny[kind]))  # family detected from config.json
    with Timer() as t:
        loaded = load_model(spec)
    record(f"load_model tiny {kind}", t.seconds)
    report = loaded.report
    assert report.family == family and report.model_class == model_class
    assert type(loaded.model).__name__ == model_class
    assert report.processor_class == processor_class
    assert report.device == "cpu" and report.resolved_from == "local path"
    if processor_type:
        assert type(loaded.processor).__name__ == processor_type
    if kind == "llm":  # text-only: a tokenizer, and nothing that processes images
        from transformers import PreTrainedTokenizerBase

        assert isinstance(loaded.processor, PreTrainedTokenizerBase)
        assert not hasattr(loaded.processor, "image_processor")
        assert loaded.tokenizer is loaded.processor
        assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token is not None
    if kind == "vlm":
        assert hasattr(loaded.processor, "image_processor") and loaded.tokenizer is loaded.processor.tokenizer


def test_tiny_llava_served_as_vlm_generates(isolated_env, tiny):
    """The VLM path end to end: configured family vlm, image + text in, tokens out."""
    import numpy as np
    from PIL import Image

    loaded = load_model(ModelSpec(name="tiny-llava", source=str(tiny["vlm"]), family="vlm"))
    assert loaded.report.family == "vlm"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = loaded.processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
    inputs = loaded.processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=4)
    assert out.shape[1] == inputs.input_ids.shape[1] + 4


def test_a_model_with_its_own_code_is_served_with_trust_remote_code(isolated_env, tiny):
    """Its model_type is in no built-in mapping: it was refused even with trust_remote_code: true, by a message
    that asked to set trust_remote_code: true (found by review). Its family now comes from its auto_map."""
    import json
    import shutil

    custom = shutil.copytree(tiny["llm"], isolated_env["models"] / "custom")
    (custom / "configuration_tinycustom.py").write_text(
        "from transformers import LlamaConfig\nclass TinyCustomConfig(LlamaConfig):\n    model_type = 'tinycustom'\n")
    (custom / "modeling_tinycustom.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_tinycustom import TinyCustomConfig\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n")
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "model_type": "tinycustom", "auto_map": {
        "AutoConfig": "configuration_tinycustom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM"}}))
    for family in ("llm", None):
        loaded = load_model(ModelSpec(name="c", source="custom", family=family, trust_remote_code=True))
        assert type(loaded.model).__name__ == "TinyCustomForCausalLM" and loaded.report.family == "llm"
        assert loaded.report.model_class == "TinyCustomForCausalLM"
    with pytest.raises(UnsupportedModelError, match="needs AutoModelForImageTextToText.*Set `family: llm`") as info:
        load_model(ModelSpec(name="c", source="custom", family="vlm", trust_remote_code=True))
    assert "set trust_remote_code" not in str(info.value)
    with pytest.raises(UnsupportedModelError, match="set trust_remote_code: true"):
        load_model(ModelSpec(name="c", source="custom"))
