"""Tiny PEFT LoRA adapters over the tiny LLM / VLM.

Pitfalls:
- PEFT initialises LoRA B to zeros, so a freshly created adapter is a no-op; B is filled with small
  seeded random values so the adapter visibly changes the logits.
- For LLaVA, a plain target_modules=["q_proj", "v_proj"] would also hit the CLIP vision tower
  (its attention has q_proj/v_proj too); a regex restricts LoRA to the language model.
- "vlm-vision-lora" is the other kind of VLM fine-tune (handwriting, documents: the vision side
  learns too), which vLLM does not serve (LoRA on the language model only, vllm#23796): LoRA on
  every linear of the CLIP tower (attention and MLP), of the multi-modal projector and of the
  language model's layers. PEFT full-matches a string target_modules against each module's name.
- The adapter dir holds adapter_config.json + adapter_model.safetensors and NO config.json;
  base_model_name_or_path is str(base) exactly as given (PEFT would otherwise record whatever
  the base model was loaded from).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LLM_TARGETS = ["q_proj", "v_proj"]
# Module names in transformers 5 LLaVA: model.language_model.layers.N.self_attn.{q,v}_proj
VLM_TARGETS = r".*language_model.*\.(q_proj|v_proj)"
# ... model.vision_tower.encoder.layers.N.{self_attn.{q,k,v,out}_proj,mlp.fc1,mlp.fc2},
# model.multi_modal_projector.linear_{1,2}, model.language_model.layers.N.{self_attn,mlp}.*_proj
VLM_VISION_TARGETS = (
    r".*\.vision_tower\..*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"
    r"|.*\.multi_modal_projector\.(linear_1|linear_2)"
    r"|.*\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


def _build_lora(
    base_model: Any, dest: Path, base: str | Path, target_modules: list[str] | str, seed: int, task_type: str | None
) -> Path:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules, task_type=task_type, bias="none"
    )
    # Seed around get_peft_model too: it initialises LoRA A from the global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # differ from the base's seed stream
        peft_model = get_peft_model(base_model, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.1)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(str(dest))
    # PEFT stores target_modules as a set, so the JSON order depends on PYTHONHASHSEED; sort it so
    # the build is byte-for-byte deterministic.
    cfg_path = Path(dest) / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return dest


def build_llm_lora(dest: Path, *, base: str | Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    return _build_lora(model, dest, base, LLM_TARGETS, seed, task_type="CAUSAL_LM")


def build_vlm_lora(dest: Path, *, base: str | Path, seed: int = 0) -> Path:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base)
    # task_type=None: PEFT has no image-text-to-text task type; the plain PeftModel wraps LLaVA.
    return _build_lora(model, dest, base, VLM_TARGETS, seed, task_type=None)


def build_vlm_vision_lora(dest: Path, *, base: str | Path, seed: int = 0) -> Path:
    """A LoRA over the whole tiny LLaVA: vision tower, projector and language model."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base)
    return _build_lora(model, dest, base, VLM_VISION_TARGETS, seed + 2, task_type=None)
