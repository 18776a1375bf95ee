"""Deterministic builders of tiny, real-architecture, random-weight Hugging Face models.

Each builder writes a directory with `save_pretrained` (a few hundred KB to ~2 MB) that loads back
through the ordinary Auto classes exactly like a Hub model, built fully offline:

    "llm"      Llama causal LM + ChatML BPE tokenizer            (AutoModelForCausalLM, AutoTokenizer)
    "stt"      Whisper + WhisperProcessor                         (AutoModelForSpeechSeq2Seq, AutoProcessor)
    "tts"      VITS + VitsTokenizer(phonemize=False)              (AutoModelForTextToWaveform, AutoTokenizer)
    "vlm"      LLaVA (tiny CLIP + tiny Llama) + LlavaProcessor    (AutoModelForImageTextToText, AutoProcessor)
    "llm-lora" PEFT LoRA adapter over a built "llm" (base=...)    (PeftModel.from_pretrained)
    "vlm-lora" PEFT LoRA adapter over a built "vlm" (base=...)    (PeftModel.from_pretrained / AutoPeftModel)
    "vlm-vision-lora"  LoRA over a built "vlm"'s vision tower, projector and language model (base=...)

Weights are deterministic for a given `seed` (seeded inside torch.random.fork_rng, so the caller's
RNG state is untouched).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..config import TINY_KINDS
from ..resolve import is_model_dir
from .adapters import build_llm_lora, build_vlm_lora, build_vlm_vision_lora
from .hub_cache import stage_in_hf_cache
from .llm import build_llm
from .stt import build_stt
from .tts import build_tts
from .vlm import build_vlm

__all__ = ["BUILDERS", "TINY_KINDS", "base_kind", "build_tiny", "ensure_tiny", "is_complete", "stage_in_hf_cache"]

# kind -> builder(dest: Path, *, seed: int[, base]) -> Path, for every kind of TINY_KINDS (loading.config, where
# `build_tiny:` is validated without importing any of this).
BUILDERS: dict[str, Callable[..., Path]] = {
    "llm": build_llm,
    "stt": build_stt,
    "tts": build_tts,
    "vlm": build_vlm,
    "llm-lora": build_llm_lora,
    "vlm-lora": build_vlm_lora,
    "vlm-vision-lora": build_vlm_vision_lora,
}


def _is_adapter(kind: str) -> bool:
    return kind.endswith("-lora")


def base_kind(kind: str) -> str:
    """The kind of base an adapter kind is built over: its family ("vlm-vision-lora" -> "vlm")."""
    return kind.split("-")[0]


def _check_kind(kind: str, base: str | Path | None) -> None:
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; kinds: {', '.join(TINY_KINDS)}")
    if _is_adapter(kind) and base is None:
        raise ValueError(f"kind {kind!r} needs base= (the directory of the built base model)")


def is_complete(dest: str | Path) -> bool:
    """True if dest holds a config (config.json or adapter_config.json) plus weights."""
    return is_model_dir(Path(dest))


def build_tiny(kind: str, dest: str | Path, *, base: str | Path | None = None, seed: int = 0) -> Path:
    """Build the tiny model of `kind` into `dest` (created; overwritten if it exists); return dest.

    For an adapter kind (ending in "-lora"), `base` is the directory of the already-built base model and is
    recorded verbatim (str(base)) as the adapter's base_model_name_or_path.
    """
    _check_kind(kind, base)
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    builder = BUILDERS[kind]
    if _is_adapter(kind):
        builder(dest, base=base, seed=seed)
    else:
        builder(dest, seed=seed)
    return dest


def ensure_tiny(kind: str, dest: str | Path, *, base: str | Path | None = None, seed: int = 0) -> Path:
    """Build only if dest does not already hold a complete model; return dest.

    Safe under concurrent processes/threads: a FileLock on f"{dest}.lock" serialises builders, the
    model is built in a temp dir next to dest and renamed into place, so a half-built dir is never
    visible at dest.
    """
    from filelock import FileLock

    _check_kind(kind, base)
    dest = Path(dest)
    if is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{dest}.lock"):
        if is_complete(dest):  # another process built it while we waited
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            build_tiny(kind, tmp, base=base, seed=seed)
            if dest.exists():  # incomplete leftover from a crashed build
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
