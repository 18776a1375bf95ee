"""Tiny Llama causal LM (random weights) with a trained ChatML BPE tokenizer.

Pitfalls:
- initializer_range: the default 0.02 gives near-uniform logits and greedy decoding repeats one
  token forever; 0.2 gives varied (still meaningless) output.
- Llama rather than Qwen2: for model_type=qwen2, AutoTokenizer returns Qwen2Tokenizer, which swaps in
  Qwen's own pre-tokenizer instead of our tokenizer.json; a Llama config keeps it as written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .tokenizer import build_chatml_tokenizer


def tiny_llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def chat_generation_config(tokenizer: Any, max_new_tokens: int = 32) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )


def damp_special_logits(lm_head_weight: torch.Tensor, tokenizer: Any) -> None:
    """Shrink the lm_head rows of special tokens so a random model rarely ends a reply at once.

    WHY: with random weights greedy decoding may pick <|im_end|> as its first token for some
    prompts, giving empty replies that make serving tests flaky. Shrunk (not zeroed) rows keep
    the stop tokens reachable; max_new_tokens bounds every reply anyway.
    """
    with torch.no_grad():
        for tid in tokenizer.all_special_ids:
            lm_head_weight[tid] *= 0.05


def build_llm(dest: Path, *, seed: int = 0) -> Path:
    from transformers import LlamaForCausalLM

    tok = build_chatml_tokenizer()
    config = tiny_llama_config(tok)
    # fork_rng: seed deterministically without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    damp_special_logits(model.lm_head.weight, tok)
    model.generation_config = chat_generation_config(tok)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest
