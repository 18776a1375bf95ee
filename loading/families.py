"""Which Auto class and which processor a model needs, decided from its config.

transformers' own Auto mappings (model_type -> class name) are the source of truth, so a
Qwen2.5-VL config is known to be a vision-language model before any weights are read, and is
never fed to AutoModelForCausalLM ("Unrecognized configuration class ...").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import transformers
from transformers.models.auto import modeling_auto, processing_auto

from .config import Family
from .errors import UnsupportedModelError


@dataclass(frozen=True)
class FamilyLoader:
    family: Family
    auto_model: str  # name of the transformers Auto class
    mapping: Mapping[str, str]  # model_type -> concrete class name, from transformers
    uses_processor: Callable[[str], bool]  # model_type -> AutoProcessor (True) or AutoTokenizer (False)

    def model_class_name(self, model_type: str) -> str:
        return self.mapping[model_type]

    def processor_class(self, model_type: str) -> str:
        return "AutoProcessor" if self.uses_processor(model_type) else "AutoTokenizer"


def _has_processor(model_type: str) -> bool:
    return model_type in processing_auto.PROCESSOR_MAPPING_NAMES


# Order matters for detection: a model that can do speech or vision is served as such even if it
# also appears in the causal-LM mapping (Gemma 3, Mllama).
FAMILIES: dict[Family, FamilyLoader] = {
    Family.STT: FamilyLoader(
        Family.STT, "AutoModelForSpeechSeq2Seq", modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES, lambda _: True
    ),
    Family.TTS: FamilyLoader(
        Family.TTS, "AutoModelForTextToWaveform", modeling_auto.MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES, _has_processor
    ),
    Family.VLM: FamilyLoader(
        Family.VLM, "AutoModelForImageTextToText", modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        lambda _: True,
    ),
    Family.LLM: FamilyLoader(
        Family.LLM, "AutoModelForCausalLM", modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, lambda _: False
    ),
}

# Known, but served by none of our families yet: say so instead of failing obscurely.
_UNSERVED: dict[str, Mapping[str, str]] = {
    "a text-to-spectrogram model, which needs a separate vocoder (not supported yet; use a "
    "text-to-waveform model such as VITS/MMS-TTS)": modeling_auto.MODEL_FOR_TEXT_TO_SPECTROGRAM_MAPPING_NAMES,
    "a CTC speech model (not supported yet; use a sequence-to-sequence model such as Whisper)":
        modeling_auto.MODEL_FOR_CTC_MAPPING_NAMES,
}


#: A served family by the Auto class a model's own code registers in its config's `auto_map`.
_BY_AUTO_CLASS: dict[str, Family] = {loader.auto_model: family for family, loader in FAMILIES.items()}


def families_of(model_type: str) -> list[Family]:
    return [family for family, loader in FAMILIES.items() if model_type in loader.mapping]


def _describe(config: Any) -> str:
    archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
    return f"model_type {config.model_type!r} ({archs})"


def select_family(config: Any, requested: Family | None, source: str, trust_remote_code: bool = False) -> FamilyLoader:
    """The FamilyLoader for this config, or UnsupportedModelError naming what it is and the fix.

    An encoder-decoder checkpoint (Whisper, BART, Marian) is never an LLM here, although transformers
    maps many such model types to a ...ForCausalLM too: that class is the decoder alone, and loading the
    checkpoint with it drops the encoder without a word. Among the families that remain, the one whose
    class the checkpoint names in `architectures` comes first. A model type that transformers does not
    map, with `trust_remote_code`, is served by the Auto classes its own code registers (`auto_map`)."""
    model_type = getattr(config, "model_type", None) or ""
    candidates = families_of(model_type)
    if not candidates and trust_remote_code and getattr(config, "auto_map", None):
        return _remote_code_family(config, requested, source)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if encoder_decoder and Family.LLM in candidates:
        candidates.remove(Family.LLM)
        if not candidates:
            raise UnsupportedModelError(
                source, f"{source!r} is an encoder-decoder text model ({_describe(config)}): loaded as an LLM "
                f"({FAMILIES[Family.LLM].mapping[model_type]}) it would lose its encoder. Serve a decoder-only "
                "chat model as the LLM instead.")
    named = set(getattr(config, "architectures", None) or [])
    candidates.sort(key=lambda family: FAMILIES[family].mapping[model_type] not in named)  # stable
    if not candidates:
        for what, mapping in _UNSERVED.items():
            if model_type in mapping:
                raise UnsupportedModelError(source, f"{source!r} is {what}: {_describe(config)}.")
        hint = (
            " Its config uses custom code (auto_map): set trust_remote_code: true if you trust the repository."
            if getattr(config, "auto_map", None) and not trust_remote_code else ""
        )
        raise UnsupportedModelError(
            source,
            f"{source!r} has {_describe(config)}, which transformers {transformers.__version__} maps to none of "
            f"the served families (llm, stt, tts, vlm).{hint}",
        )
    if requested is None:
        return FAMILIES[candidates[0]]
    if requested in candidates:
        return FAMILIES[requested]
    detected = candidates[0]
    raise UnsupportedModelError(
        source,
        f"{source!r} is configured as family {requested.value!r} but its config is a {detected.value.upper()} "
        f"({_describe(config)}, loaded with {FAMILIES[detected].auto_model}). Set `family: {detected.value}` "
        "(or omit `family` to detect it).",
    )


def _remote_code_family(config: Any, requested: Family | None, source: str) -> FamilyLoader:
    """The family of a model that ships its own code, by the Auto classes of its `auto_map` (the first
    served one, or `requested`'s); its model class is the one its auto_map names for that Auto class."""
    auto_map = dict(config.auto_map)
    offered = [family for auto, family in _BY_AUTO_CLASS.items() if auto in auto_map]
    family = requested if requested is not None else (offered[0] if offered else None)
    if family is None or family not in offered:
        wanted = f"family {requested.value!r} needs {FAMILIES[requested].auto_model}" if requested else \
            "a served family needs one of " + ", ".join(f"{a} ({f.value})" for a, f in _BY_AUTO_CLASS.items())
        raise UnsupportedModelError(
            source, f"{source!r} ({_describe(config)}) ships its own code, whose auto_map registers "
            f"{', '.join(sorted(auto_map))}: {wanted}. "
            + (f"Set `family: {offered[0].value}` (or omit `family`)." if offered else "It cannot be served."))
    loader = FAMILIES[family]
    class_name = str(auto_map[loader.auto_model]).rpartition(".")[2]
    return replace(loader, mapping={config.model_type: class_name})


def auto_class(name: str) -> Any:
    return getattr(transformers, name)
