"""Turn the validated `args:` of serve_config.yaml into the Serve application.

    import_path: deployments.builder:build_app

One deployment per family that has models (named "llm", "stt", "tts", "vlm" so that YAML
`deployments:` overrides find them) and an ingress that routes to them through handles.
Resources are chosen here, from `args`, never by YAML `ray_actor_options` overrides: those
replace the whole dict and silently drop fields such as num_cpus.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve import Application

import loading
from loading import Family
from loading.config import with_served_base

from .app_config import AppConfig
from .auth import load_admin_keys, load_keys
from .errors import GRPC_LIMIT
from .family_server import FamilyServer, family_gpus
from .ingress import Ingress
from .limits import RequestLimits, largest_family_call_bytes
from .llm import LLMServer
from .options import FamilyOptions
from .ray_daemons import configured_nice
from .stt import STTServer
from .tts import TTSServer
from .vlm import VLMServer

log = logging.getLogger(__name__)

FAMILY_SERVERS: dict[Family, type[FamilyServer]] = {
    Family.LLM: LLMServer,
    Family.STT: STTServer,
    Family.TTS: TTSServer,
    Family.VLM: VLMServer,
}


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def plan_gpus(device: str, available: float) -> tuple[int, list[str]]:
    """GPUs per family replica, and notes for /health when the request cannot be met."""
    if device == "cpu":
        return 0, []
    if device == "auto":
        return (1, []) if available >= 1 else (0, [])
    if available < 1:
        note = (
            "device: gpu asks 1 GPU per replica but the Ray cluster has no GPU resources; replicas stay PENDING "
            "until a GPU node joins (set device: auto or cpu to serve on CPU)"
        )
        log.warning(note)
        return 1, [note]
    return 1, []


def starting_replicas(options: FamilyOptions) -> int:
    """Replicas a family deployment asks for when it is deployed."""
    scaling = options.autoscaling
    if scaling is None:
        return 1
    return scaling.initial_replicas if scaling.initial_replicas is not None else scaling.min_replicas


def gpu_model_notes(num_gpus: int, config: AppConfig) -> list[str]:
    """A note for /health when models that must be on a GPU get replicas without one (`device: auto` on a
    cluster with no GPU when the app is built; `device: cpu`, or a family's num_gpus: 0, is refused by
    AppConfig)."""
    on_gpu = [spec.name for spec in config.models if spec.device is loading.DevicePreference.CUDA
              and spec.family is not None and not family_gpus(config.family_options(spec.family), num_gpus)]
    if not on_gpu:
        return []
    note = (f"model(s) {', '.join(map(repr, on_gpu))} have device: cuda, but args.device: {config.device} gives "
            "their replicas no GPU (the Ray cluster had none when the app was built), so they fail to load: set "
            "args.device: gpu (replicas then wait for a GPU node), or the model's device: auto")
    log.warning(note)
    return [note]


def timeout_notes(config: AppConfig) -> list[str]:
    """A note for /health when request_timeout_s, the ingress's bound on a family call, is below a model's
    generation_timeout_s: a non-streamed request that generates that long is answered 503 `timeout` first."""
    longer = sorted(spec.name for spec in config.models if spec.generation_timeout_s > config.request_timeout_s)
    if not longer:
        return []
    most = max(spec.generation_timeout_s for spec in config.models)
    note = (f"request_timeout_s={config.request_timeout_s:g} is below the generation_timeout_s of "
            f"{', '.join(map(repr, longer))} (up to {most:g} s): a non-streamed request that generates that long is "
            f"answered 503 timeout at {config.request_timeout_s:g} s; raise request_timeout_s or lower "
            "generation_timeout_s")
    log.warning(note)
    return [note]


def grpc_bound_notes(limits: RequestLimits, uses_grpc: bool, bound: int) -> list[str]:
    """A note for /health when Ray Serve's gRPC bound on one message between replicas (used in its
    throughput-optimized mode) is below what a request within `limits` can carry to a family: such
    requests would be refused with 413 naming the bound (a 500 before the error was mapped)."""
    need = largest_family_call_bytes(limits)
    if not uses_grpc or bound >= need:
        return []
    note = (f"{GRPC_LIMIT}={bound} is below the {need} bytes a request within args.limits can carry to a family "
            f"(the longest audio decoded, or a chat body with its images): such requests are refused with 413. Set "
            f"{GRPC_LIMIT}={need} or more where Ray starts (serve.env sets 268435456), or lower the limits")
    log.warning(note)
    return [note]


def ray_grpc_settings() -> tuple[bool, int]:
    """Whether Ray Serve calls between replicas go over gRPC here, and its bound on one message (Ray's own
    reading of the environment this process has, which the replicas it starts inherit)."""
    from ray.serve._private import constants

    return bool(constants.RAY_SERVE_USE_GRPC_BY_DEFAULT), int(constants.RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH)


def gpu_shortage_notes(gpus: dict[str, float], demand: dict[str, int], available: float,
                       told: bool = False) -> list[str]:
    """Notes for /health when the families together ask for more GPUs than the cluster has.

    `gpus`: family -> GPUs per replica; `demand`: family -> replicas at deploy time. `told`: plan_gpus has
    already said the cluster has none.
    """
    asking = {family: (count, gpus[family]) for family, count in demand.items() if count and gpus[family]}
    total = sum(count * share for count, share in asking.values())
    if total <= available + 1e-9 or (told and available < 1):
        return []
    # Ray packs fractions within a GPU, never across: a replica asking 0.5 needs 0.5 free on one GPU
    asks = ", ".join(f"{family} {count} x {share:g}" for family, (count, share) in asking.items())
    note = (
        f"the families ask for {total:g} GPU(s) at deploy time ({asks} GPU per replica) but the Ray cluster has "
        f"{available:g}; replicas stay PENDING until more GPU nodes join (an autoscaling cluster adds them if "
        "its GPU worker group allows). On one GPU, small families can share it: families.<family>.num_gpus: "
        "0.25, or 0 to serve that family on the CPU"
    )
    log.warning(note)
    return [note]


def build_app(args: dict[str, Any]) -> Application:
    config = AppConfig.model_validate(args)
    configured_nice()  # a bad MODELFLEET_RAY_DAEMONS_NICE fails `serve run` here, naming itself
    env = {}
    models_dir = config.local_models_dir or os.environ.get("LOCAL_MODELS_DIR")
    if models_dir or any(spec.is_demo for spec in config.models):
        # replicas run in other working directories: hand them an absolute path
        env["LOCAL_MODELS_DIR"] = str(Path(models_dir or "models").expanduser().resolve())
        config.local_models_dir = env["LOCAL_MODELS_DIR"]
    if any(spec.family is None for spec in config.models):
        # found where the replicas will look: args.local_models_dir, not only this process's LOCAL_MODELS_DIR
        settings = loading.Settings.from_env()
        if config.local_models_dir is not None:
            settings = replace(settings, local_models_dir=Path(config.local_models_dir))
        for spec in config.models:
            if spec.family is None:  # an adapter on a served model: that model's source is where its base is
                spec.family = loading.detect_family(with_served_base(spec, config.models), settings)
    available = cluster_gpus()
    num_gpus, notes = plan_gpus(config.device, available)
    told = bool(notes)
    notes += gpu_model_notes(num_gpus, config) + timeout_notes(config) + grpc_bound_notes(config.limits,
                                                                                            *ray_grpc_settings())

    handles: dict[str, Any] = {}
    resources: dict[str, dict[str, float]] = {}  # per family replica, for /health's pending reasons
    demand: dict[str, int] = {}
    gpus: dict[str, float] = {}
    for family, server in FAMILY_SERVERS.items():
        specs = [spec for spec in config.models if spec.family is family]
        if not specs:
            continue
        options = config.family_options(family)
        gpus[family.value] = family_gpus(options, num_gpus, specs)
        resources[family.value] = {"CPU": options.num_cpus, "GPU": gpus[family.value]}
        demand[family.value] = starting_replicas(options)
        deployment = serve.deployment(**server.deployment_options(family.value, options, gpus[family.value], env))(
            server)
        handles[family.value] = deployment.bind(specs, options)
        log.info("family %s: %d model(s), num_gpus=%g", family.value, len(specs), gpus[family.value])
    notes += gpu_shortage_notes(gpus, demand, available, told)

    # The ingress reads the keys when it starts and refuses to start on a key file it cannot read, a key
    # shorter than min_key_chars or (with auth.required) no key: say so now, not as a replica crash loop.
    load_keys(config.auth)
    load_admin_keys(config.auth)
    ingress = serve.deployment(
        name="ingress",
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        max_queued_requests=config.ingress.max_queued_requests,
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
    )(serve.ingress()(Ingress))
    return ingress.bind(handles, config, notes, resources)
