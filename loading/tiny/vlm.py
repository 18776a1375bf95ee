"""Tiny LLaVA (random weights): tiny CLIP vision tower + the tiny Llama text model.

Pitfalls:
- No torchvision here (its only wheel for torch 2.13 is a CUDA build), so the image processor is
  the PIL backend `CLIPImageProcessorPil` (transformers 5 names the torchvision one
  `CLIPImageProcessor`). Qwen2-VL style processors need torchvision, hence LLaVA.
- Image token count must agree between processor and model: image_size 32 / patch_size 8 gives 16
  patches + 1 CLS = 17 vision tokens; vision_feature_select_strategy="default" drops the CLS, so the
  processor (patch_size=8, num_additional_image_tokens=1, same strategy) expands each <image>
  into 16 tokens and image_seq_length is 16.
- `<image>` is a trained-in special token of the shared ChatML tokenizer, so it has a fixed id
  (image_token_index) and is never split. The chat template turns {"type": "image"} (or
  "image_url") content parts into `<image>`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .llm import chat_generation_config, damp_special_logits, tiny_llama_config
from .tokenizer import build_chatml_tokenizer, chatml_template

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 32, 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16


def build_vlm(dest: Path, *, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = build_chatml_tokenizer((IMAGE_TOKEN,))
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=tiny_llama_config(tok),
        image_token_index=image_token_id,
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    damp_special_logits(model.lm_head.weight, tok)
    model.generation_config = chat_generation_config(tok)
    model.save_pretrained(dest)

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token of the CLIP tower
        image_token=IMAGE_TOKEN,
        chat_template=chatml_template(IMAGE_TOKEN),
    )
    processor.save_pretrained(dest)
    return dest
