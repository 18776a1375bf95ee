"""A LoRA adapter over the whole VLM (vision tower, projector and language model) on the one shared base.

vLLM applies LoRA to a VLM's language model only (vllm#23796); fine-tunes for handwriting and documents
train the vision side too. The tiny recipe `vlm-vision-lora` is such an adapter over tiny LLaVA.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loading import ModelSpec, UnsupportedModelError, attach_adapter, load_model
from loading.tiny import build_tiny

VISION_PARTS = ["language_model", "multi_modal_projector", "vision_tower"]


@pytest.fixture(scope="module")
def vlm_adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-adapters")
    return {
        "vlm": tiny["vlm"],
        "lm": build_tiny("vlm-lora", root / "vlm-lora", base=tiny["vlm"]),
        "vision": build_tiny("vlm-vision-lora", root / "vlm-vision-lora", base=tiny["vlm"]),
    }


@pytest.fixture(scope="module")
def shared(vlm_adapters):
    """One base and both adapters attached to it, as a replica serves them; the base's own parameter
    storage recorded before any adapter was attached."""
    base = load_model(ModelSpec(name="tiny-llava", source=str(vlm_adapters["vlm"])))
    storage = {name: p.data_ptr() for name, p in base.model.named_parameters()}
    lm = attach_adapter(ModelSpec(name="lm", source=str(vlm_adapters["lm"]), base_model="tiny-llava"), base)
    vision = attach_adapter(ModelSpec(name="vision", source=str(vlm_adapters["vision"]), base_model="tiny-llava"),
                            base)
    return {"base": base, "lm": lm, "vision": vision, "storage": storage}


def image_inputs(loaded, with_image: bool = True) -> dict:
    content = [{"type": "text", "text": "What does the note say?"}] + ([{"type": "image"}] if with_image else [])
    text = loaded.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                tokenize=False)
    image = Image.new("RGB", (40, 36), (200, 30, 30)) if with_image else None
    return dict(loaded.processor(text=[text], images=[image] if image else None, return_tensors="pt"))


def last_logits(loaded, inputs) -> torch.Tensor:
    with loaded.active() as model, torch.inference_mode():
        return model(**inputs).logits[0, -1]


def image_features(loaded, inputs) -> torch.Tensor:
    """What the vision tower and projector make of the image (the language model not involved)."""
    with loaded.active() as model, torch.inference_mode():
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # the base: its base view
        out = inner.model.get_image_features(pixel_values=inputs["pixel_values"])
        return (out.pooler_output if hasattr(out, "pooler_output") else out)[0]


def test_the_recipe_targets_vision_tower_projector_and_language_model(vlm_adapters):
    config = json.loads((vlm_adapters["vision"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(vlm_adapters["vlm"]) and config["r"] == 4
    with safe_open(vlm_adapters["vision"] / "adapter_model.safetensors", "pt") as f:
        weights = {key: f.get_tensor(key) for key in f.keys()}
    per_part: dict[str, int] = {}
    for key in weights:
        part = key.removeprefix("base_model.model.model.").split(".")[0]
        per_part[part] = per_part.get(part, 0) + 1
    # 2 CLIP layers x (q, k, v, out_proj, fc1, fc2), linear_1/2, 2 Llama layers x (q, k, v, o, gate, up, down): A and B
    assert per_part == {"vision_tower": 24, "multi_modal_projector": 4, "language_model": 28}
    assert sum(w.numel() for w in weights.values()) == 12672
    # B is seeded random, not PEFT's zeros: every layer changes its module
    assert all(w.abs().max() > 0 for key, w in weights.items() if "lora_B" in key)
    with safe_open(vlm_adapters["lm"] / "adapter_model.safetensors", "pt") as f:
        assert all(".language_model." in key for key in f.keys())


def test_both_adapters_live_in_the_one_base_without_copying_it(shared):
    base, lm, vision = shared["base"], shared["lm"], shared["vision"]
    assert lm.model is vision.model is base.model and lm.lock is vision.lock is base.lock
    model = base.model
    assert sorted(model.peft_config) == ["lm", "vision"]
    # the vision adapter's layers sit in the base's vision tower, projector and language model
    layers = {name for name, module in model.get_base_model().named_modules() if "vision" in getattr(module, "lora_A", {})}
    assert {name.split(".")[1] for name in layers} == set(VISION_PARTS)
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj" in layers
    assert "model.multi_modal_projector.linear_2" in layers
    lm_layers = {name for name, module in model.get_base_model().named_modules() if "lm" in getattr(module, "lora_A", {})}
    assert lm_layers and all(name.startswith("model.language_model.") for name in lm_layers)
    # the base's parameters are the same tensors as before the adapters came: none was copied
    after = {name.replace(".base_layer", "").removeprefix("base_model.model."): p.data_ptr()
             for name, p in model.named_parameters() if "lora_" not in name}
    assert after == shared["storage"]
    # the reports say what each adapter touches (also in /health)
    assert (base.report.adapter_targets, lm.report.adapter_targets) == ([], ["language_model"])
    assert vision.report.adapter_targets == VISION_PARTS
    assert vision.report.base_resolved_from == "shared with served model 'tiny-llava'"
    assert not any("change nothing" in w for w in vision.report.warnings)


def test_the_vision_adapter_changes_what_the_model_sees_and_answers(shared):
    base, vision = shared["base"], shared["vision"]
    inputs = image_inputs(base)
    logits = {name: last_logits(shared[name], inputs) for name in ("base", "lm", "vision")}
    assert not torch.allclose(logits["vision"], logits["base"], atol=1e-3)
    assert not torch.allclose(logits["vision"], logits["lm"], atol=1e-3)
    assert not torch.allclose(logits["lm"], logits["base"], atol=1e-3)
    # the image itself: the LM-only adapter sees it as the base does, the vision adapter does not
    seen = {name: image_features(shared[name], inputs) for name in ("base", "lm", "vision")}
    assert torch.equal(seen["lm"], seen["base"])
    assert not torch.allclose(seen["vision"], seen["base"], atol=1e-3)
    # without an image the vision tower does not run: the vision adapter differs by its language-model layers
    text_only = image_inputs(base, with_image=False)
    assert "pixel_values" not in text_only
    assert not torch.allclose(last_logits(vision, text_only), last_logits(base, text_only), atol=1e-3)
    # and the base still answers as itself after all of it
    assert torch.equal(last_logits(base, inputs), logits["base"])


def test_a_standalone_load_gives_the_same_model_and_report(shared, vlm_adapters):
    alone = load_model(ModelSpec(name="alone", source=str(vlm_adapters["vision"])))
    assert alone.report.adapter_targets == VISION_PARTS
    inputs = image_inputs(alone)
    assert torch.allclose(last_logits(alone, inputs), last_logits(shared["vision"], inputs), atol=1e-5)


def _renamed(source, dest, old: str, new: str):
    """A copy of adapter `source` whose weight names say `new` where the base's modules say `old`, as an
    adapter trained on another version of the architecture's module names has them."""
    dest.mkdir()
    (dest / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    weights = load_file(source / "adapter_model.safetensors")
    save_file({key.replace(old, new): value for key, value in weights.items()}, dest / "adapter_model.safetensors")
    return dest


def test_weights_that_match_no_module_of_the_base_are_refused_or_reported(vlm_adapters, tmp_path):
    base = load_model(ModelSpec(name="tiny-llava", source=str(vlm_adapters["vlm"])))
    inputs = image_inputs(base)
    before = last_logits(base, inputs)
    # nothing of it lands: refused, and the shared base goes on as it was
    nowhere = _renamed(vlm_adapters["vision"], tmp_path / "nowhere", "base_model.model.model.", "base_model.model.old.")
    with pytest.raises(UnsupportedModelError, match="changes nothing in its base: all 28 of the layers"):
        attach_adapter(ModelSpec(name="nowhere", source=str(nowhere), base_model="tiny-llava"), base)
    assert not hasattr(base.model, "peft_config")  # the first adapter: the base is unwrapped again
    assert torch.equal(last_logits(base, inputs), before)
    # only its vision-tower weights are lost (a renamed tower): served, with a warning naming the layers
    partial = _renamed(vlm_adapters["vision"], tmp_path / "partial", ".vision_tower.", ".vision_model.")
    loaded = attach_adapter(ModelSpec(name="partial", source=str(partial), base_model="tiny-llava"), base)
    assert loaded.report.adapter_targets == ["language_model", "multi_modal_projector"]
    assert any("12 of its 28 layers change nothing" in w and "vision_tower" in w for w in loaded.report.warnings)
    assert torch.equal(last_logits(base, inputs), before)


def test_a_cheap_demo_entry(vlm_adapters, tmp_path):
    """Building the recipe and attaching it cost well under a second each: fit for the demo's start-up."""
    import time

    t0 = time.perf_counter()
    built = build_tiny("vlm-vision-lora", tmp_path / "again", base=vlm_adapters["vlm"])
    build_s = time.perf_counter() - t0
    assert (built / "adapter_model.safetensors").read_bytes() == \
        (vlm_adapters["vision"] / "adapter_model.safetensors").read_bytes()  # deterministic
    base = load_model(ModelSpec(name="tiny-llava", source=str(vlm_adapters["vlm"])))
    t0 = time.perf_counter()
    attach_adapter(ModelSpec(name="vision", source=str(built), base_model="tiny-llava"), base)
    attach_s = time.perf_counter() - t0
    print(f"\nvlm-vision-lora: build {build_s:.3f} s, attach {attach_s:.3f} s")
    assert build_s < 5 and attach_s < 5
