"""What would happen if we loaded this model, found out in seconds without loading weights.

Shared by `modelfleet doctor` (report) and `modelfleet fetch` (download what is missing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoConfig

from .adapters import read_adapter, resolve_base
from .config import Family, ModelSpec
from .errors import LoadingError, UnsupportedModelError
from .families import select_family
from .loader import tiny_target
from .offline import HubStatus
from .placement import GpuInfo, count_parameters, gpu_shortfall, plan_device, stored_bytes
from .quantization import strategy_chain
from .resolve import is_model_dir, resolve_source
from .settings import Settings


@dataclass
class Inspection:
    name: str
    source: str
    ok: bool = False
    location: str = ""  # where the weights are, or "not found"
    adapter_base: str | None = None
    family: str | None = None
    model_class: str | None = None
    parameters: int | None = None
    estimated_bytes: int | None = None
    device: str | None = None
    strategy: str | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def inspect_model(spec: ModelSpec, settings: Settings, hub: HubStatus, gpus: list[GpuInfo]) -> Inspection:
    """Resolve without downloading, read the config, and plan device and strategy."""
    result = Inspection(spec.name, spec.source)
    if spec.build_tiny and not is_model_dir(tiny_target(spec.source, settings)):
        result.ok, result.location = True, f"demo model, built on first start into {tiny_target(spec.source, settings)}"
        result.family = spec.family.value if spec.family else None
        result.notes.append("random weights: output is gibberish")
        return result
    try:
        resolved = resolve_source(spec.source, settings, revision=spec.revision, hub=hub, allow_download=False)
        result.location = f"{resolved.path} ({resolved.origin})"
        model_dir = resolved.path
        adapter = read_adapter(resolved.path)
        if adapter is not None:
            base = resolve_base(adapter, settings, override=spec.base_model, hub=hub)
            result.adapter_base = f"{base.path} ({base.origin})"
            model_dir = base.path
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=spec.trust_remote_code, local_files_only=True)
        family = select_family(config, spec.family, spec.source)
        result.family, result.model_class = family.family.value, family.model_class_name(config.model_type)
        result.parameters = count_parameters(model_dir)
        plan = plan_device(spec.device, gpus)
        for strategy in strategy_chain(spec.quantization, spec.prefer_4bit, spec.dtype, plan.device, spec.device):
            size = int(result.parameters * strategy.bytes_per_param) if result.parameters else stored_bytes(model_dir)
            if strategy.device.startswith("cuda") and gpus and gpu_shortfall(gpus[0], size):
                result.notes.append(f"skip {strategy.name}: {gpu_shortfall(gpus[0], size)}")
                continue
            result.device, result.strategy, result.estimated_bytes = strategy.device, strategy.name, size
            break
        if spec.is_demo:
            result.notes.append("random weights: output is gibberish")
        result.ok = True
    except LoadingError as exc:
        result.error = str(exc)
        result.location = result.location or "not found"
    except (OSError, ValueError) as exc:  # unreadable config.json and the like
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def detect_family(spec: ModelSpec, settings: Settings | None = None) -> Family:
    """The family of `spec`: as configured, or read from its config.json (no download)."""
    if spec.family is not None:
        return spec.family
    settings = settings or Settings.from_env()
    try:
        resolved = resolve_source(spec.source, settings, revision=spec.revision, allow_download=False)
        model_dir = resolved.path
        adapter = read_adapter(model_dir)
        if adapter is not None:
            model_dir = resolve_base(adapter, settings, override=spec.base_model).path
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=spec.trust_remote_code, local_files_only=True)
    except (LoadingError, OSError, ValueError) as exc:
        raise UnsupportedModelError(
            spec.source,
            f"cannot detect the family of model {spec.name!r} without its config ({exc}). "
            "Set `family:` (llm, stt, tts or vlm) for it in serve_config.yaml.",
        ) from None
    return select_family(config, None, spec.source).family
