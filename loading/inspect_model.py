"""What would happen if we loaded this model, found out in seconds without loading weights.

Shared by `modelfleet doctor` (report) and `modelfleet fetch` (download what is missing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Family, ModelSpec
from .errors import LoadingError, UnsupportedModelError
from .gguf import check_supported, conversion_state, is_gguf_source, locate, read_info
from .loader import load_processor
from .model_source import ResolvedModel, find_base, read_config, resolve_model, tiny_target
from .offline import HubStatus
from .placement import GpuInfo, count_parameters, device_shortfall, plan_device
from .quantization import model_strategies
from .resolve import is_model_dir
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
    gguf: str | None = None  # a GGUF source: its file, architecture, quantization, size and conversion state
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def inspect_model(spec: ModelSpec, settings: Settings, hub: HubStatus, gpus: list[GpuInfo]) -> Inspection:
    """Resolve without downloading, read the config, load the tokenizer or processor, and plan device and
    strategy."""
    result = Inspection(spec.name, spec.source)
    demo_dir = tiny_target(spec.source, settings)
    if spec.build_tiny and not is_model_dir(demo_dir):
        result.ok, result.location = True, f"demo model, built on first start into {demo_dir}"
        result.family = spec.family.value if spec.family else None
        result.notes.append("random weights: output is gibberish")
        return result
    try:
        if is_gguf_source(spec.source) and not _inspect_gguf(result, spec, settings):
            return result  # not converted yet: nothing more to read without converting
        # Step by step, so that a base or a config that fails still shows what was found before it.
        found = resolve_model(spec, settings, hub=hub, allow_download=False, with_base=False, with_config=False)
        result.location = f"{found.path} ({found.resolved.origin})"
        found = find_base(found, spec, settings, hub=hub, allow_download=False)
        if found.base is not None:
            result.adapter_base = f"{found.base.path} ({found.base.origin})"
        found = read_config(found, spec)
        assert found.family is not None
        result.family = found.family.family.value
        result.model_class = found.family.model_class_name(found.config.model_type)
        load_processor(found, spec.trust_remote_code)  # as a replica does first: its files, the packages it needs
        _plan(result, spec, found, gpus)
        if spec.is_demo:
            result.notes.append("random weights: output is gibberish")
        result.ok = True
    except LoadingError as exc:  # not found, a config of no served family, no such device
        result.error = str(exc)
        result.location = result.location or "not found"
    except (OSError, ValueError) as exc:  # unreadable config.json and the like
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _inspect_gguf(result: Inspection, spec: ModelSpec, settings: Settings) -> bool:
    """The GGUF file's facts into `result`; whether its conversion is current (then inspected like any model)."""
    gguf = locate(spec.source, settings)
    info = read_info(gguf.path)
    state = conversion_state(gguf, settings)
    target = gguf.target(settings)
    converted = {"current": f"converted into {target}", "stale": f"conversion in {target} is of another file",
                 "missing": "not converted yet"}[state]
    result.gguf = (f"{gguf.path} ({gguf.origin}): architecture {info.architecture}, {info.quantization}, "
                   f"{info.size_bytes / 2**20:.1f} MiB, {converted}")
    check_supported(gguf, info)
    if state == "current":
        return True
    result.ok, result.location = True, f"GGUF file, converted on first load (or by `modelfleet fetch`) into {target}"
    result.family = Family.LLM.value
    return False


def _plan(result: Inspection, spec: ModelSpec, found: ResolvedModel, gpus: list[GpuInfo]) -> None:
    """The device and strategy a load would end with: the first strategy that fits, as the loader walks them."""
    result.parameters = count_parameters(found.model_dir)
    plan = plan_device(spec.device, gpus)
    chain = model_strategies(spec, plan.device, found.config)
    for strategy in chain:
        size = strategy.estimate_bytes(found.model_dir, result.parameters)
        shortfall = device_shortfall(strategy.device, gpus, size)
        if shortfall:
            result.notes.append(f"skip {strategy.name}: {shortfall}")
            continue
        result.device, result.strategy, result.estimated_bytes = strategy.device, strategy.name, size
        break


def detect_family(spec: ModelSpec, settings: Settings | None = None) -> Family:
    """The family of `spec`: as configured, or read from its config.json (no download)."""
    if spec.family is not None:
        return spec.family
    settings = settings or Settings.from_env()
    if is_gguf_source(spec.source):  # read from the file's header: no conversion at build time
        gguf = locate(spec.source, settings)
        check_supported(gguf, read_info(gguf.path))
        return Family.LLM
    try:
        found = resolve_model(spec, settings, allow_download=False)
    except UnsupportedModelError:  # the config was read: it belongs to no served family, and says so
        raise
    except (LoadingError, OSError, ValueError) as exc:
        raise UnsupportedModelError(
            spec.source,
            f"cannot detect the family of model {spec.name!r} without its config ({exc}). "
            "Set `family:` (llm, stt, tts or vlm) for it in serve_config.yaml.",
        ) from None
    assert found.family is not None
    return found.family.family
