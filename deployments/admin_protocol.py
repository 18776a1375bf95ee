"""Wire models of the admin routes (routes/admin.py): adapters and models added and removed at run time.

The adapter bodies are vLLM's (`POST /v1/load_lora_adapter` {"lora_name", "lora_path"}, `POST
/v1/unload_lora_adapter` {"lora_name"}), so scripts written for vLLM work unchanged; `base_model` is
ours. The model bodies follow the seed LocalLab server's `POST /models/load` {"model_id"}.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loading import DevicePreference, DType, Family, Quantization

from .protocol import OpenAIBaseModel, RequestModel

NAME = Field(min_length=1, max_length=256, pattern=r"^\S(.*\S)?$")  # no leading/trailing blanks


class LoadLoraAdapterRequest(RequestModel):
    lora_name: str = NAME
    """The name clients will put in `model` for this adapter (unique across the served models)."""
    lora_path: str = Field(min_length=1, max_length=4096)
    """The adapter directory (adapter_config.json + weights): a path, a name under LOCAL_MODELS_DIR, or a
    Hub id found in the HF cache (downloaded only when `admin.allow_downloads` is true)."""
    base_model: str | None = Field(default=None, min_length=1, max_length=256)
    """modelfleet: the served model (name or alias) to attach the adapter to. Default: the served LLM or
    VLM that the adapter's own `base_model_name_or_path` names."""


class UnloadLoraAdapterRequest(RequestModel):
    lora_name: str = Field(min_length=1, max_length=256)
    """The adapter to remove. Requests already using it finish; new ones get 404 at once."""
    lora_int_id: int | None = None
    """Accepted for vLLM compatibility; unused."""


class LoadModelRequest(RequestModel):
    model_id: str = Field(min_length=1, max_length=4096)
    """Where the model is: a local directory, a name under LOCAL_MODELS_DIR, a Hub id (the HF cache first;
    downloaded only when `admin.allow_downloads` is true) or a GGUF file."""
    name: str | None = Field(default=None, min_length=1, max_length=256, pattern=r"^\S(.*\S)?$")
    """modelfleet: the name clients use in `model`. Default: `model_id` (a directory's own name for a path)."""
    family: Family | None = None
    """llm, stt, tts or vlm; default: read from the model's config.json. Its family must have a deployment."""
    revision: str | None = Field(default=None, max_length=256)
    """Hub revision to pin."""
    dtype: DType = DType.AUTO
    """As the config's `dtype`."""
    quantization: Quantization = Quantization.AUTO
    """As the config's `quantization`."""
    device: DevicePreference = DevicePreference.AUTO
    """As the config's `device`."""
    max_new_tokens: int = Field(default=256, ge=1, le=32768)
    """Default and upper bound of generated tokens per request."""
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    """As the config's `max_prompt_tokens`."""
    generation_timeout_s: float = Field(default=120.0, gt=0)
    """Upper bound on one model call."""
    debug_load_delay_s: float = Field(default=0.0, ge=0, le=600)
    """Testing only: a 'simulated delay' loading phase of this many seconds."""


class UnloadModelRequest(RequestModel):
    model_id: str = Field(min_length=1, max_length=4096)
    """The name of a model (or adapter) added at run time."""


class RuntimeModelResponse(OpenAIBaseModel):
    object: Literal["runtime_model"] = "runtime_model"
    """Always `runtime_model`."""
    id: str
    """The name clients use in `model`."""
    kind: Literal["adapter", "model"]
    """`adapter` (a LoRA adapter on a served base) or `model` (a whole model)."""
    family: str | None = None
    """The family serving it."""
    status: Literal["loaded", "loading", "unloaded"]
    """`loaded`: ready on the replica that was asked; `loading`: in the background (see /health);
    `unloaded`: new requests get 404, requests already using it finish first."""
    message: str
    """vLLM's success text, e.g. "Success: LoRA adapter 'x' added successfully."."""
    source: str | None = None
    """Where its files were found."""
    base_model: str | None = None
    """An adapter's served base model."""
    phase: str | None = None
    """While loading: the loading phase on the replica that was asked (also in /health)."""
    download_bytes: int | None = None
    """Bytes still to download, when a download was allowed and is needed (logged before it starts)."""
    in_flight: int | None = None
    """Unloading: requests still using it on the replica that was asked."""
