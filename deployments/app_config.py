"""The application's `args:` in serve_config.yaml, validated once before anything is built."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loading import Family, ModelSpec
from loading.config import validate_unique_names


class AutoscalingOptions(BaseModel):
    """Ray Serve autoscaling, per family. Replicas scale on ongoing + queued requests per replica."""

    model_config = ConfigDict(extra="allow")  # any other Ray Serve autoscaling_config field passes through

    min_replicas: int = Field(default=1, ge=0, description="0 enables scale-to-zero (first request pays a cold start).")
    initial_replicas: int | None = Field(default=None, ge=0, description="Replicas at deploy time (default min).")
    max_replicas: int = Field(default=2, ge=1, description="Upper bound on replicas (on GPU nodes: GPUs to use).")
    target_ongoing_requests: float = Field(default=4, gt=0, description="Requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(default=5.0, ge=0, description="Sustained load needed before adding replicas.")
    downscale_delay_s: float = Field(default=60.0, ge=0, description="Sustained idleness before removing replicas.")
    metrics_interval_s: float = Field(
        default=2.0, gt=0, description="How often replicas report load (deprecated by Ray but still the knob)."
    )


class FamilyOptions(BaseModel):
    """How one family's deployment runs. Defaults per family are in FAMILY_DEFAULTS."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=0.5, gt=0, description="CPUs reserved per replica.")
    max_batch_size: int = Field(default=8, ge=1, description="Requests combined into one model call.")
    batch_wait_timeout_s: float = Field(
        default=0.0, ge=0,
        description=("How long a batch that starts on an idle model waits to fill. 0: run at once; requests that "
                     "arrive while the model is busy are batched anyway (deployments/batching.py)."),
    )
    max_loaded_models: int = Field(default=4, ge=1, description="Models kept in memory per replica (LRU beyond).")
    max_ongoing_requests: int = Field(default=16, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(
        default=64, ge=-1, description="Requests waiting for a replica before new ones get 503 + Retry-After (-1: no bound)."
    )
    autoscaling: AutoscalingOptions | None = Field(
        default_factory=AutoscalingOptions, description="null pins num_replicas: 1."
    )
    graceful_shutdown_timeout_s: float = Field(
        default=30, ge=0, description=(
            "How long a stopping replica (scale-down, update, delete) may finish its requests. Ray waits this "
            "long even for a replica still PENDING for resources."
        ),
    )


FAMILY_DEFAULTS: dict[Family, dict[str, Any]] = {
    # LLM requests are long and batch well: many in flight per replica (a request waiting in the
    # replica's batcher costs nothing, while Ray's router backs off exponentially once every replica is
    # at max_ongoing_requests), and the autoscaler counts queued requests too.
    Family.LLM: {"max_ongoing_requests": 64, "max_queued_requests": 128, "max_batch_size": 16,
                 "autoscaling": {"target_ongoing_requests": 16, "max_replicas": 4}},
    Family.VLM: {"max_ongoing_requests": 8, "max_queued_requests": 32, "max_batch_size": 4,
                 "autoscaling": {"target_ongoing_requests": 4, "max_replicas": 2}},
    # Audio requests are short: scale on ongoing requests with a low target. The replica still takes
    # up to 32 at once: they wait on its inference thread in arrival order, whereas requests held back
    # by Ray's router retry with backoff (up to 0.5 s), which cut TTS at 16 clients to 0.37x a
    # hand-written lock server when the limit was 4 (bench/RESULTS.md).
    Family.STT: {"max_ongoing_requests": 32, "max_queued_requests": 64,
                 "autoscaling": {"target_ongoing_requests": 4, "max_replicas": 4}},
    Family.TTS: {"max_ongoing_requests": 32, "max_queued_requests": 64, "max_batch_size": 1,
                 "autoscaling": {"target_ongoing_requests": 2, "max_replicas": 4}},
}


class IngressOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=0.25, gt=0, description="CPUs reserved per ingress replica.")
    num_replicas: int = Field(default=1, ge=1, description="Ingress replicas (it only routes; one is plenty here).")
    max_ongoing_requests: int = Field(default=256, ge=1, description="Concurrent HTTP requests per ingress replica.")


class AppConfig(BaseModel):
    """`applications[].args` of serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1, description="Every served model; see loading.config.ModelSpec.")
    device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto",
        description=(
            "gpu: each family replica asks Ray for num_gpus=1. cpu: no GPUs asked. auto: gpu if the cluster "
            "has GPU resources when the app is built, else cpu."
        ),
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="Ingress -> family call limit; past it the client gets 503 with a reason."
    )
    status_timeout_s: float = Field(default=3.0, gt=0, description="Limit on each family's answer to /health.")
    local_models_dir: str | None = Field(
        default=None, description="LOCAL_MODELS_DIR for every replica (made absolute when the app is built)."
    )
    allowed_media_dirs: list[str] = Field(
        default_factory=list, description="Directories whose files may be named as file:// image URLs."
    )
    families: dict[Family, FamilyOptions] = Field(
        default_factory=dict, description="Per-family deployment options, merged over FAMILY_DEFAULTS."
    )
    ingress: IngressOptions = Field(default_factory=IngressOptions)

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        return validate_unique_names(models)

    @field_validator("families", mode="before")
    @classmethod
    def _merge_defaults(cls, value: dict | None) -> dict:
        value = dict(value or {})
        merged = {}
        for family, defaults in FAMILY_DEFAULTS.items():
            given = value.pop(family.value, None) or value.pop(family, None) or {}
            autoscaling = given.get("autoscaling", {}) if "autoscaling" in given else {}
            options = {**defaults, **given}
            if autoscaling is not None:
                options["autoscaling"] = {**defaults.get("autoscaling", {}), **autoscaling}
            merged[family.value] = options
        if value:
            raise ValueError(f"unknown families {sorted(map(str, value))}; use llm, stt, tts, vlm")
        return merged

    def family_options(self, family: Family) -> FamilyOptions:
        return self.families[family]
