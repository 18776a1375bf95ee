"""The application's `args:` in serve_config.yaml, validated once, in the builder.

The builder hands the validated objects to the deployments; nothing re-validates a dict per
replica. Every section may be left out: its documented defaults then hold.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from loading import DevicePreference, Family, ModelSpec
from loading.config import validate_unique_names

from .auth import AuthConfig
from .limits import RequestLimits, image_decode_mb
from .options import ChatOptions, IngressOptions, SpeechOptions, TranscriptionOptions
from .runtime_catalog import AdminConfig

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # LLM requests are long and batch well: many in flight per replica, and the autoscaler counts
    # queued requests too. A request waiting in the replica's decode loop for a place takes the next
    # free row at the next step; one waiting in Ray's router (past max_ongoing_requests) retries with
    # backoff of up to 0.5 s while places stay empty: 100 streaming clients on the tiny LLM got 23 req/s
    # with 64 here, 182 with 256 (16 clients: 86-111), and 140/s arriving got 16 against 132
    # (bench/OVERLOAD.md). The ingress's limits.max_concurrent_requests (256) still bounds what is in
    # flight. The decode loop's rows: 64 (in-process, SmolLM2 at 64 clients: 7.2-7.8 req/s and first token
    # 2.8-2.9 s on 64 rows against 5.7-7.0 and 4.7-5.3 s on 32; at 32 clients 11.9 req/s on 32 rows, 8.7
    # on 16; bench/CONTINUOUS.md). The memory budget still holds a row back when its KV cache would not fit.
    "llm": {"max_ongoing_requests": 256, "max_queued_requests": 128, "max_batch_size": 64,
            "autoscaling": {"target_ongoing_requests": 16, "max_replicas": 4}},
    # The VLM likewise: 24 clients on tiny-llava got 19.6 req/s with 8 ongoing and 32 queued, 122 with 32
    # and 8 (bench/OVERLOAD.md). The same 40 requests per replica in all, so the images a replica and its
    # router hold at once stay bounded as before (bench/HOSTILE.md sizes max_image_pixels by that sum).
    "vlm": {"max_ongoing_requests": 32, "max_queued_requests": 8, "max_batch_size": 4,
            "autoscaling": {"target_ongoing_requests": 4, "max_replicas": 2}},
    # Audio requests are short: scale on ongoing requests with a low target. The replica still takes
    # many at once (STT 32, TTS 80): they wait on its inference thread in arrival order, whereas requests held back
    # by Ray's router retry with backoff (up to 0.5 s), which cut TTS at 16 clients to 0.37x a
    # hand-written lock server when the limit was 4 (bench/RESULTS.md).
    "stt": {"max_ongoing_requests": 32, "max_queued_requests": 64, "memory_budget_mb": 2048,
            "autoscaling": {"target_ongoing_requests": 4, "max_replicas": 4}},
    # TTS requests take ~10 ms each on the tiny voice, so the router's backoff cost them most: 48
    # clients got 25 req/s with 32 here against 93 with 80 (bench/OVERLOAD.md); a waiting one holds
    # only its text. STT's, ~0.1 s each, showed no such loss (48 clients: 10.7 against 9.1 req/s), and
    # a waiting one holds its decoded audio (counted in its memory gate from admission on): it keeps 32.
    # Both keep 96 requests per replica in all.
    "tts": {"max_ongoing_requests": 80, "max_queued_requests": 16, "memory_budget_mb": 2048,
            "autoscaling": {"target_ongoing_requests": 2, "max_replicas": 4}},
}


class FamiliesConfig(BaseModel):
    """`args.families`: per-family deployment options, each merged over FAMILY_DEFAULTS."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    llm: ChatOptions
    vlm: ChatOptions
    stt: TranscriptionOptions
    tts: SpeechOptions

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value
        given = dict(value or {})
        unknown = sorted(map(str, set(given) - set(FAMILY_DEFAULTS)))
        if unknown:
            raise ValueError(f"unknown families {unknown}; use llm, stt, tts, vlm")
        merged = {}
        for family, defaults in FAMILY_DEFAULTS.items():
            options = dict(given.get(family) or {})
            if isinstance(options.get("autoscaling", {}), dict):  # null keeps meaning "one pinned replica"
                options["autoscaling"] = {**defaults.get("autoscaling", {}), **options.get("autoscaling", {})}
            merged[family] = {**defaults, **options}
        return merged

    @field_validator("llm", "vlm", "stt", "tts")
    @classmethod
    def _replicas_in_order(cls, options: ChatOptions | TranscriptionOptions | SpeechOptions,
                           info: ValidationInfo) -> ChatOptions | TranscriptionOptions | SpeechOptions:
        """min <= initial <= max replicas, checked on the merged values: Ray's own refusal comes only when the
        app is built and names a max_replicas the user may never have written (the family's default)."""
        scaling = options.autoscaling
        if scaling is None:
            return options
        family = info.field_name
        low, start, high = scaling.min_replicas, scaling.initial_replicas, scaling.max_replicas
        default_high = FAMILY_DEFAULTS[str(family)].get("autoscaling", {}).get("max_replicas")
        whose = f" (the {family} family's default when max_replicas is not set)" if high == default_high else ""
        where = f"families.{family}.autoscaling"
        if low > high:
            raise ValueError(f"{where}: min_replicas={low} is above max_replicas={high}{whose}; set max_replicas: "
                             f"{low} or more there, or lower min_replicas")
        if start is not None and not low <= start <= high:
            raise ValueError(f"{where}: initial_replicas={start} is outside min_replicas={low} .. max_replicas="
                             f"{high}{whose}; set initial_replicas within them, or move the bound")
        return options

    def __getitem__(self, family: Family) -> ChatOptions | TranscriptionOptions | SpeechOptions:
        return getattr(self, Family(family).value)


class AppConfig(BaseModel):
    """`applications[].args` of serve_config.yaml."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    models: list[ModelSpec] = Field(min_length=1, description="Every served model; see loading.config.ModelSpec.")
    device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto",
        description=(
            "gpu: each family replica asks Ray for num_gpus=1 (a family's own num_gpus overrides it). cpu: no GPUs "
            "asked. auto: gpu if the cluster "
            "has GPU resources when the app is built, else cpu."
        ),
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="Ingress -> family call limit; past it the client gets 503 with a reason."
    )
    status_timeout_s: float = Field(default=3.0, gt=0, description="Limit on each family's answer to /health.")
    local_models_dir: str | None = Field(
        default=None, description=("LOCAL_MODELS_DIR for every replica (made absolute when the app is built), and "
                                   "for this app's models in `modelfleet doctor` and `fetch`.")
    )
    allowed_media_dirs: list[str] = Field(
        default_factory=list, description="Directories whose files may be named as file:// image URLs."
    )
    families: FamiliesConfig = Field(
        default_factory=lambda: FamiliesConfig.model_validate({}),
        description="Per-family deployment options, merged over FAMILY_DEFAULTS.",
    )
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    limits: RequestLimits = Field(default_factory=RequestLimits, description="What one request may ask; see limits.py.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys; see auth.py.")
    admin: AdminConfig = Field(default_factory=AdminConfig, description=(
        "Adapters and models loaded at run time by the admin routes (they need an admin key: "
        "auth.admin_keys_env); see runtime_catalog.py."))

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        return validate_unique_names(models)

    @model_validator(mode="after")
    def _voice_priority_needs_the_policy(self) -> AppConfig:
        if self.ingress.voice_priority and self.families.llm.scheduling_policy != "priority":
            raise ValueError(
                f"ingress.voice_priority={self.ingress.voice_priority} orders nothing while the LLM family serves "
                "requests in arrival order: set families.llm.scheduling_policy: priority, or voice_priority: 0")
        return self

    @model_validator(mode="after")
    def _the_ingress_takes_what_its_limits_let_in(self) -> AppConfig:
        """Serve hands an ingress replica at most ingress.max_ongoing_requests at once (HTTP requests and Realtime
        sockets together); past it, requests wait in Serve's queue, then get its plain-text 503 "Request dropped due
        to backpressure", and the guard's bound (its 503 overloaded in OpenAI's shape) never comes into play.
        Measured with limits.max_concurrent_requests: 1000 and 600 / 800 requests in flight: a chat waited 27 s, or
        got Serve's text 503."""
        needed = self.limits.max_concurrent_requests + self.limits.max_realtime_sessions
        if self.ingress.max_ongoing_requests <= needed:
            raise ValueError(
                f"ingress.max_ongoing_requests={self.ingress.max_ongoing_requests} is not above limits."
                f"max_concurrent_requests={self.limits.max_concurrent_requests} plus limits.max_realtime_sessions="
                f"{self.limits.max_realtime_sessions}: Serve would hold or refuse (as plain text) requests the "
                f"ingress lets in; set ingress.max_ongoing_requests to at least {needed + 1}, or lower the limits")
        return self

    @model_validator(mode="after")
    def _vlm_decoders_hold_the_largest_image(self) -> AppConfig:
        vlm = self.families.vlm
        needed = image_decode_mb(self.limits.max_image_pixels, self.limits.max_image_bytes)
        if vlm.image_decode_memory_mb < needed:
            raise ValueError(
                f"families.vlm.image_decode_memory_mb={vlm.image_decode_memory_mb} is below the ~{needed} MB a "
                f"decoder needs for an image of limits.max_image_pixels={self.limits.max_image_pixels:,} in up to "
                f"limits.max_image_bytes={self.limits.max_image_bytes:,}: such images would be refused; raise "
                f"image_decode_memory_mb to at least {needed}, or lower the other two")
        return self

    @model_validator(mode="after")
    def _gpu_models_need_gpu_replicas(self) -> AppConfig:
        """A model that must be on a GPU can only fail to load where its replica asks Ray for none."""
        if self.device == "cpu":
            asking = {family: share for family in Family
                      if (share := self.families[family].num_gpus) is not None and share > 0}
            if asking:
                named = ", ".join(f"families.{family.value}.num_gpus={share:g}" for family, share in asking.items())
                raise ValueError(f"{named} asks for GPUs, but args.device: cpu asks Ray for none: set args.device: "
                                 "auto or gpu, or leave num_gpus out")
            on_gpu = [spec.name for spec in self.models if spec.device is DevicePreference.CUDA]
            if on_gpu:
                raise ValueError(
                    f"model(s) {', '.join(map(repr, on_gpu))} have device: cuda, but args.device: cpu gives their "
                    "replicas no GPU, so they could never load: set args.device: gpu (or auto), or the model's "
                    "device: auto or cpu")
            return self
        on_gpu = [f"{spec.name!r} ({spec.family.value})" for spec in self.models
                  if spec.device is DevicePreference.CUDA and spec.family is not None
                  and self.families[spec.family].num_gpus == 0]
        if on_gpu:
            raise ValueError(
                f"model(s) {', '.join(on_gpu)} have device: cuda, but their family's num_gpus: 0 gives its replicas "
                "no GPU, so they could never load: give the family a GPU share (families.<family>.num_gpus), or "
                "the model's device: auto or cpu")
        return self

    def family_options(self, family: Family) -> ChatOptions | TranscriptionOptions | SpeechOptions:
        return self.families[family]
