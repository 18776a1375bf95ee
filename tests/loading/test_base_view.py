"""A base shared with adapters answers its own calls through its base view: the base's module tree
without PEFT's layers, on the same weights (loading/base_view.py)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSpeechSeq2Seq

from loading import ModelSpec, attach_adapter, load_model
from loading.base_view import base_view
from loading.report import adapter_layers


def _peft_modules(model) -> int:
    return sum(type(m).__module__.startswith("peft.") for m in model.modules())


def test_the_view_computes_the_base_on_the_same_weights_whatever_state_the_adapter_layers_are_in(tiny, isolated_env):
    base = load_model(ModelSpec(name="base", source=str(tiny["llm"])))
    ids = base.tokenizer("The weather today is", return_tensors="pt").input_ids
    with base.active() as model, torch.inference_mode():
        before = model(input_ids=ids).logits
    adapter = attach_adapter(ModelSpec(name="lora", source=str(tiny["llm-lora"]), base_model="base"), base)
    peft_model = base.model
    view = base_view(peft_model)
    assert view is not None and base_view(peft_model) is view  # built once
    assert _peft_modules(view) == 0 and _peft_modules(peft_model) > 0
    # no weight was copied: every tensor of the view is one of the PeftModel's
    held = {p.data_ptr() for p in peft_model.parameters()}
    assert all(p.data_ptr() in held for p in view.parameters())
    assert list(view.state_dict()) == list(AutoModelForCausalLM.from_pretrained(tiny["llm"]).state_dict())
    with torch.inference_mode():
        for enabled in (True, False, True):  # the adapter layers' state does not reach the view
            adapter_layers(peft_model, enabled=enabled)
            assert torch.equal(view(input_ids=ids).logits, before)
        with adapter.active() as model:
            with_adapter = model(input_ids=ids).logits
        with base.active() as model:
            assert model is view  # a base call runs on the view
            assert torch.equal(model(input_ids=ids).logits, before)
            assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)[0, :ids.shape[1]],
                               ids[0])
        # transformers' hidden-state hooks, installed on whichever tree is called first, fire once per layer
        layers = view.config.num_hidden_layers + 1
        for model in (view, peft_model, view):
            assert len(model(input_ids=ids, output_hidden_states=True).hidden_states) == layers
    assert not torch.allclose(with_adapter, before, atol=1e-4)
    assert not peft_model._adapters_disabled  # the base call walked no module to switch them off


def test_no_view_where_the_base_layers_hold_adapter_weights_or_a_forward_was_set_on_an_instance(tiny, isolated_env):
    """A merged adapter has added its weights into the base layers, and accelerate's device hooks set a
    forward on the module instance: in both, the view could compute something other than the base, so
    base calls take the PeftModel with its adapter layers off."""
    base = load_model(ModelSpec(name="base", source=str(tiny["llm"])))
    ids = base.tokenizer("Hello there", return_tensors="pt").input_ids
    with base.active() as model, torch.inference_mode():
        before = model(input_ids=ids).logits
    attach_adapter(ModelSpec(name="lora", source=str(tiny["llm-lora"]), base_model="base"), base)
    peft_model = base.model
    peft_model.merge_adapter()
    assert base_view(peft_model) is None
    peft_model.unmerge_adapter()
    with base.active() as model, torch.inference_mode():  # the fallback: adapter layers off
        assert model is peft_model
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)  # merged and taken out again

    other = load_model(ModelSpec(name="other", source=str(tiny["llm"])))
    attach_adapter(ModelSpec(name="lora-2", source=str(tiny["llm-lora"]), base_model="other"), other)
    layer = other.model.get_base_model().model.layers[0].mlp
    layer.forward = layer.forward  # as accelerate's add_hook_to_module does
    assert base_view(other.model) is None


def test_an_encoder_decoder_view_detects_language_and_generates_as_the_base(tiny):
    """Whisper with a LoRA on its attention: the view's language detection and generate are the plain
    model's (transcription.py runs both on what `active()` holds)."""
    plain = AutoModelForSpeechSeq2Seq.from_pretrained(tiny["stt"]).eval()
    wrapped = get_peft_model(AutoModelForSpeechSeq2Seq.from_pretrained(tiny["stt"]).eval(),
                             LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    view = base_view(wrapped)
    assert view is not None and _peft_modules(view) == 0
    features = torch.randn(1, plain.config.num_mel_bins, 3000, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(view.detect_language(features), plain.detect_language(features))
        assert torch.equal(view.generate(features, max_new_tokens=5, do_sample=False),
                           plain.generate(features, max_new_tokens=5, do_sample=False))
        assert not torch.equal(wrapped(input_features=features, decoder_input_ids=torch.tensor([[1]])).logits,
                               plain(input_features=features, decoder_input_ids=torch.tensor([[1]])).logits)
