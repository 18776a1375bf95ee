"""How each deployment runs: the typed options of `args.families.<family>` and `args.ingress`.

Each family server class names its options class (`Server.Options`) and turns it into Serve's
deployment options (`Server.deployment_options`); an option a family does not use is not on its
class, so `extra="forbid"` rejects it (e.g. `max_batch_size` for TTS).
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .params import TemperatureFallback


def ray_autoscaling_fields() -> list[str]:
    """The fields of Ray Serve's own `autoscaling_config` (ray.serve.config.AutoscalingConfig), read from the
    installed Ray when a config is validated (imported here, not at module import: a config is validated
    where Ray is installed, but importing this module must stay cheap)."""
    from ray.serve.config import AutoscalingConfig

    return list(AutoscalingConfig.model_fields)


def check_max_queued_requests(value: int) -> int:
    """Ray Serve takes -1 (no bound) or a positive number; it refuses 0 only when the deployment is bound."""
    if value == 0:
        raise ValueError("max_queued_requests=0 is refused by Ray Serve (it takes -1 for no bound or a positive "
                         "number): set 1 or more, or -1")
    return value


class AutoscalingOptions(BaseModel):
    """Ray Serve autoscaling, per family. Replicas scale on ongoing + queued requests per replica."""

    # Any other field of Ray Serve's autoscaling_config passes through (e.g. look_back_period_s); a key Ray
    # does not know is refused by name (Ray itself would drop it silently).
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    min_replicas: int = Field(default=1, ge=0, description="0 enables scale-to-zero (first request pays a cold start).")
    initial_replicas: int | None = Field(default=None, ge=0, description="Replicas at deploy time (default min).")
    max_replicas: int = Field(default=2, ge=1, description="Upper bound on replicas (on GPU nodes: GPUs to use).")
    target_ongoing_requests: float = Field(default=4, gt=0, description="Requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(default=5.0, ge=0, description="Sustained load needed before adding replicas.")
    downscale_delay_s: float = Field(default=60.0, ge=0, description="Sustained idleness before removing replicas.")
    metrics_interval_s: float = Field(
        default=2.0, gt=0, description="How often replicas report load (deprecated by Ray but still the knob)."
    )

    @model_validator(mode="before")
    @classmethod
    def _only_rays_fields(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        accepted = ray_autoscaling_fields()
        unknown = [key for key in value if key not in accepted]
        if unknown:
            named = ", ".join(
                repr(key) + "".join(f" (did you mean {close!r}?)" for close in difflib.get_close_matches(
                    str(key), accepted, n=1)) for key in unknown)
            raise ValueError(f"unknown autoscaling option(s) {named}; Ray Serve's autoscaling_config takes "
                             f"{', '.join(accepted)}")
        return value


class FamilyOptions(BaseModel):
    """What every family deployment takes."""

    # .inf / .nan in YAML: "no bound" is null or -1 where a field has one; infinity passed validation and then
    # crashed every replica's constructor (int(inf * MB)) or Ray's resource check, naming no option
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_cpus: float = Field(default=0.5, gt=0, description="CPUs reserved per replica.")
    num_gpus: float | None = Field(
        default=None, ge=0, le=1, description=(
            "GPUs per replica. null: args.device decides (1 with device: gpu, or auto on a cluster with GPUs; "
            "else 0). A fraction lets replicas of several families share one GPU (e.g. 0.25 for a small STT and "
            "TTS beside the LLM on one card): Ray still gives each replica exactly one device and the model is "
            "placed on it whole, never across GPUs; the fraction is Ray's bookkeeping only, so the models must "
            "fit the card together. 0: the family computes on the CPU, and its replicas see no GPU. Never more "
            "than 1: a model split across GPUs hangs generate."
        ),
    )
    max_loaded_models: int = Field(
        default=4, ge=1, description=(
            "Models kept in memory per replica before `loading: lazy` ones are unloaded, least recently used "
            "first. Only lazy models are ever unloaded (and a base that adapters share never is): background "
            "and eager models stay loaded even when they alone are more than this."
        ),
    )
    max_ongoing_requests: int = Field(default=16, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(
        default=64, ge=-1,
        description="Requests waiting for a replica before new ones get 503 + Retry-After (-1: no bound; 0 is "
        "refused, as Ray Serve refuses it).",
    )
    autoscaling: AutoscalingOptions | None = Field(
        default_factory=AutoscalingOptions, description="null pins num_replicas: 1."
    )
    max_replicas_per_node: int | None = Field(
        default=None, ge=1, le=100, description=(
            "Replicas of this family Ray may place on one node. null: 1 where the replicas compute on CPU, "
            "no bound where each holds a GPU. Two CPU replicas on one node split its cores between twice the "
            "threads: SmolLM2 at 16 clients on 2 cores served 1.0 req/s from two replicas against 7.2 from one "
            "(bench/REPLICAS.md). A replica the autoscaler asks for beyond this waits for another node "
            "(an autoscaling cluster adds one); the running ones keep answering. At most 100 (Ray Serve's bound)."
        ),
    )
    graceful_shutdown_timeout_s: float = Field(
        default=30, ge=0, description=(
            "How long a stopping replica (scale-down, update, delete) may finish its requests. Ray waits this "
            "long even for a replica still PENDING for resources."
        ),
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description=(
            "Threads torch computes with in one replica. None: the CPUs the replica reserves when num_cpus >= 1, "
            "else the node's cores (replicas with a fraction of a CPU share the node and take turns on it). "
            "Ray alone would set OMP_NUM_THREADS=1 for them: one core of many. When set, every model of the "
            "replica computes with this many."
        ),
    )
    cpu_turns: bool = Field(
        default=True, description=(
            "Replicas computing on one node's CPU run their forwards in turns (one at a time on the node), "
            "holding a lock file the node's replicas share (deployments/cpu_turns.py): at once, each one's torch "
            "threads stall the other's at every operation, and SmolLM2 beside a transcribing whisper-base-sized "
            "model served 0.7 req/s against 5.0-6.4 alone, in turns 3.1-3.4 (bench/CPU_TURNS.md). Forwards on a "
            "GPU or on one thread (a small model) never wait. false: no turns "
            "(replicas pinned to disjoint cores, or torch_threads that add up to no more than the cores)."
        ),
    )
    cpu_turns_share_time: bool = Field(
        default=True, description=(
            "With cpu_turns, the node's replicas share its compute time by their cpu_turn_weight: one that has "
            "computed longer lets a rival that is waiting, or between two forwards, go first "
            "(deployments/turn_shares.py). false: one forward each in the order the kernel wakes them, where "
            "SmolLM2's long 16-row steps beside a whisper-base-sized STT's short decoder steps left the STT "
            "28-31% of its rate alone (45-55% by time; bench/CPU_TURNS.md)."
        ),
    )
    cpu_turn_weight: float = Field(
        default=1.0, gt=0, le=100, description=(
            "With cpu_turns_share_time, this family's share of a CPU node's compute time against the other "
            "families' weights while they compute at once (2 against 1: two thirds and one third). A voice "
            "agent's node can favour its STT, whose latency the caller hears, over the chat's throughput."
        ),
    )
    single_thread_below_params: int = Field(
        default=5_000_000, ge=0, description=(
            "With torch_threads: null, a CPU model with fewer parameters computes on one thread: its operations "
            "are too small to split, and torch's idle threads spin at every operation for nothing, taking the "
            "cores the other replicas need (bench/THREADS.md: the 139k-parameter test LLM served 170 req/s at "
            "16 clients on one thread, 127 on two; the 135M SmolLM2 is 1.8x faster on two). 0: never."
        ),
    )
    memory_budget_mb: float | None = Field(
        default=None, gt=0, description=(
            "Working memory (beyond the weights) the requests one replica runs at once may need, by the estimate in "
            "deployments/admission.py (for chat: KV cache, prefill, logits, images). A request needing more alone "
            "is refused (413); others wait their turn. None: memory_budget_fraction of the memory free at the "
            "replica's first request (its GPU's, else the node's RAM within the container's limit), at least 256 MiB."
        ),
    )
    memory_budget_fraction: float = Field(
        default=0.25, gt=0, le=0.9, description=(
            "With memory_budget_mb: null, the share of free memory one replica's requests may use. Replicas on one "
            "node each take their share of what is free when they start: lower it when many share a node."
        ),
    )

    @field_validator("max_queued_requests")
    @classmethod
    def _max_queued_requests(cls, value: int) -> int:
        return check_max_queued_requests(value)


class BatchingOptions(FamilyOptions):
    """Families whose requests share model calls."""

    max_batch_size: int = Field(default=8, ge=1, description="Requests combined into one model call.")
    batch_wait_timeout_s: float = Field(
        default=0.0, ge=0,
        description=("How long a batch that starts on an idle model waits to fill. 0: run at once; requests that "
                     "arrive while the model is busy are batched anyway (deployments/batching.py). Read only "
                     "where requests are batched whole: STT, and LLM/VLM models that generate through "
                     "transformers' generate() (3-D rotary positions, as Qwen2-VL's). LLM/VLM models served by the "
                     "decode loop (most) never wait: a request joins the running batch at the next step."),
    )


class ChatOptions(BatchingOptions):
    """LLM and VLM."""

    prefix_cache_mb: float = Field(
        default=64, ge=0, description=(
            "Per model: keys and values of recent prompts' leading 8-token blocks, so that a prompt starting "
            "with stored blocks (the chat template's system turn, an app's system prompt, a conversation's earlier "
            "turns) prefills only the tokens after them. Least recently used first out past this bound, which is "
            "held beside memory_budget_mb (SmolLM2 in float32: 45 KB a token, so 64 MB keeps ~1,450 prompt "
            "tokens). 0: off."
        ),
    )

    image_decode_timeout_s: float = Field(
        default=30.0, gt=0, description=(
            "VLM: longest one image's decode may run. Images are decoded in a worker process of the replica "
            "(isolated.py), so a decoder that crashes on a file costs that request a 400, not the replica and "
            "its batch; one past this bound is stopped (its worker killed) and refused with a 400 naming it. "
            "A 4096x4096 PNG decodes in well under a second."
        ),
    )
    image_decode_memory_mb: int = Field(
        default=1024, ge=256, description=(
            "VLM: most memory one of the replica's image decoder processes may hold (RLIMIT_DATA, ~100 MB of it "
            "the interpreter and Pillow). An image whose decode needs more is refused with a 400 naming this "
            "option and its worker replaced, instead of growing the replica until Ray's memory monitor kills "
            "workers of the node. A 4096x4096 image needs ~290-360 MB; a limits.max_image_pixels and "
            "max_image_bytes this cannot hold are refused at start."
        ),
    )

    batch_length_ratio: float = Field(
        default=2.0, ge=1.0, le=16.0, description=(
            "A request shares a batch only with requests whose prompt + max_tokens is within this factor of its "
            "own (it starts a batch of its own where no running one takes its length): a batch keeps one KV "
            "cache, every row left-padded to the longest, so one long prompt beside short chats made each of "
            "them as long (16 SmolLM2 rows beside a 2,230-token "
            "prompt: 1,578 MiB of cache where 373 MiB had been admitted). Each request's KV estimate under "
            "memory_budget_mb counts this factor. Lower: less padding, more batches stepped apart. 1: only "
            "equal lengths batch; at most 16 (the factor the estimate must charge every request)."
        ),
    )

    scheduling_policy: Literal["fcfs", "priority"] = Field(
        default="fcfs", description=(
            "The order in which requests waiting in a replica (for a place in the running batch, past "
            "max_batch_size, or for memory_budget_mb) are taken. fcfs: arrival order, and a request's `priority` "
            "other than 0 is refused (400). priority: vLLM's policy: lower `priority` first, arrival order among "
            "equals; running requests are never preempted. Requests past max_ongoing_requests wait in Ray's "
            "router, in arrival order: raise it to let priority order more of them."
        ),
    )

    stream_interval_ms: float = Field(
        default=50, ge=0, description=(
            "A stream's first text goes out at once; after it, at most one chunk per this many ms carries what "
            "was made meanwhile. Each chunk is a Ray object hop to the ingress and a socket write at each of 3 "
            "hops (~ms of CPU in all): at 16 tiny-model streams, 50 against 20 gave 0.80x the time to first "
            "token and 1.19x the streams per second (bench/PAIRED.md); 50 is Ray Serve LLM's default too. "
            "A model slower than this per token sends every token as it comes. 0: a chunk whenever the "
            "ingress is ready for one."
        ),
    )

    voice_stream_interval_ms: float = Field(
        default=20, ge=0, description=(
            "stream_interval_ms for the replies the voice paths speak (/v1/audio/chat, Realtime sessions): "
            "a sentence goes to TTS once its end arrives, so a shorter interval starts the speech sooner."
        ),
    )


class TranscriptionOptions(BatchingOptions):
    """STT."""

    max_chunks_per_call: int = Field(
        default=8, ge=1,
        description="30 s chunks per encoder/generate call: long audio runs in sub-batches of this many.",
    )
    # openai-whisper's transcribe() defaults, which OpenAI's `temperature: 0` describes ("increase the temperature
    # until certain thresholds are hit")
    fallback_temperatures: list[float] = Field(
        default_factory=lambda: list(TemperatureFallback.temperatures), min_length=1, description=(
            "Temperature fallback: a transcription at temperature 0 (or none given) decodes each piece at these "
            "temperatures in turn (the first greedily, the rest sampling) while a threshold below fails; the last "
            "decode stands. Each is a decode of the failing pieces again, so a piece costs at most this many. "
            "Starts at 0, increasing, at most 1; [0] turns the fallback off."),
    )
    compression_ratio_threshold: float | None = Field(
        default=TemperatureFallback.compression_ratio_threshold, gt=0, description=(
            "A piece whose text's length over its zlib-compressed length is above this is decoded again at the next "
            "temperature (a repetitive transcript, likely a loop). null: not checked."),
    )
    logprob_threshold: float | None = Field(
        default=TemperatureFallback.logprob_threshold, le=0, description=(
            "A piece whose tokens' average log-probability is below this is decoded again at the next temperature. "
            "null: not checked."),
    )
    no_speech_threshold: float | None = Field(
        default=TemperatureFallback.no_speech_threshold, ge=0, le=1, description=(
            "A piece whose <|nospeech|> probability is above this and whose average log-probability is at most "
            "logprob_threshold is silence: not decoded again, and it gives no text (no segment). null: never."),
    )

    fallback_best_of: int = Field(
        default=TemperatureFallback.best_of, ge=1, le=16, description=(
            "At each fallback temperature above 0, a failing piece is sampled this many times and the sample with "
            "the highest average log-probability stands (openai-whisper's best_of, 5 by default): a single sample "
            "at a high temperature is a draw of chance. The samples go through the decoder "
            "in sub-batches of at most max_chunks_per_call rows. 1: one sample. A request's own temperature "
            "above 0 is sampled once, as asked."),
    )

    @field_validator("fallback_temperatures")
    @classmethod
    def _fallback_temperatures(cls, value: list[float]) -> list[float]:
        if value[0] != 0 or any(b <= a for a, b in zip(value, value[1:], strict=False)) or value[-1] > 1:
            raise ValueError(f"must start at 0 and increase, each at most 1 (such as [0, 0.2, 0.4, 0.6, 0.8, 1]; "
                             f"[0] turns the fallback off), got {value}")
        return value

    def fallback(self) -> TemperatureFallback:
        return TemperatureFallback(tuple(self.fallback_temperatures), self.compression_ratio_threshold,
                                   self.logprob_threshold, self.no_speech_threshold, self.fallback_best_of)


class SpeechOptions(FamilyOptions):
    """TTS: one request at a time on the model, long text in pieces."""

    max_chars_per_call: int = Field(
        default=400, ge=16, description="Longer text is split at sentence (then clause, then word) boundaries into "
        "pieces of at most this many characters, synthesized one after another (bounds memory per model call).",
    )


class IngressOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_cpus: float = Field(default=0.25, gt=0, description="CPUs reserved per ingress replica.")
    num_replicas: int = Field(default=1, ge=1, description="Ingress replicas (it only routes; one is plenty here).")
    max_ongoing_requests: int = Field(
        default=512, ge=1, description="Concurrent HTTP requests Serve hands one ingress replica (keep it above "
        "limits.max_concurrent_requests, so that the ingress answers overload itself, in the OpenAI error shape).",
    )
    max_queued_requests: int = Field(
        default=256, ge=-1, description="Requests Serve's proxy holds for a busy ingress before answering 503 itself "
        "(-1: no bound; 0 is refused, as Ray Serve refuses it).",
    )
    voice_priority: int = Field(
        default=0, ge=-(2**31), lt=2**31, description=(
            "The `priority` of the LLM calls the voice round trip (/v1/audio/chat) and Realtime responses make, "
            "where the chat family serving them has scheduling_policy: priority (elsewhere they take 0). "
            "Negative puts a caller's reply ahead of the chat requests waiting for a place in the batch. "
            "Not 0 needs families.llm.scheduling_policy: priority (checked when the app is built)."
        ),
    )
    voice_first_piece_chars: int = Field(
        default=80, ge=10, description="The voice round trip and Realtime responses speak the reply's first piece as "
        "soon as it ends a sentence or a clause, or at a word break once it is this long, so that the first audio "
        "does not wait for a long first sentence; later pieces end at sentences (at most the TTS's "
        "max_chars_per_call).",
    )

    @field_validator("max_queued_requests")
    @classmethod
    def _max_queued_requests(cls, value: int) -> int:
        return check_max_queued_requests(value)
