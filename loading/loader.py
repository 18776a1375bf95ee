"""Load one served model: resolve, detect, place, fall back, report.

    loaded = load_model(spec)            # -> LoadedModel(model, processor, config, report)

Everything before the weights (resolution, adapter base, config, family, processor) fails fast
with a clear error and is never retried with another strategy: another strategy cannot fix a
missing file. Only the weight loading itself walks the strategy chain.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .adapters import adapter_misfit, adapter_targets
from .config import ModelSpec
from .cpu_kernels import pack_linears
from .errors import (
    AllStrategiesFailedError,
    LoadingError,
    UnreadableModelError,
    UnsupportedModelError,
    short_error,
)
from .families import auto_class
from .model_source import Progress, ResolvedModel, ensure_demo_model, no_progress, resolve_model
from .offline import offline_for_libraries
from .placement import GpuInfo, count_parameters, device_shortfall, plan_device, survey_gpus
from .quantization import Strategy, dtype_warning, loaded_quantization, model_strategies
from .report import Attempt, LoadedModel, LoadReport, adapter_layers
from .settings import Settings

log = logging.getLogger(__name__)

#: Held while a model's modules are created or its weights loaded: transformers' from_pretrained patches
#: process-wide state while it builds a model (the default dtype, torch.nn.init, weight tying), so two
#: models loading at once in one replica (its background loads run in threads) could get each other's
#: patches: seen as a tied lm_head left on the meta device. Reentrant: a GGUF conversion loads inside a load.
WEIGHTS_LOCK = threading.RLock()


def load_model(
    spec: ModelSpec,
    *,
    settings: Settings | None = None,
    progress: Progress = no_progress,
    gpus: list[GpuInfo] | None = None,
) -> LoadedModel:
    """Load `spec` onto exactly one device. `gpus` overrides the GPUs seen (for planning tests)."""
    settings = settings or Settings.from_env()
    started = time.perf_counter()
    report = LoadReport(name=spec.name, source=spec.source, demo=spec.is_demo, warnings=list(settings.warnings))
    _before_resolving(spec, settings, progress)
    found = resolve_model(spec, settings, progress=progress)
    _report_resolution(spec, found, report)

    progress("loading processor", 0.25)
    processor = load_processor(found, spec.trust_remote_code)

    progress("planning placement", 0.3)
    gpus, unusable = survey_gpus() if gpus is None else (gpus, [])  # a GPU that cannot be opened: left out
    plan = plan_device(spec.device, gpus, unusable)
    report.device_reason, report.visible_devices = plan.reason, plan.visible_devices
    report.parameters = count_parameters(found.model_dir)
    log.info("%s: device plan %s (%s); %s parameters", spec.name, plan.device, plan.reason,
             report.parameters or "unknown")
    chain = model_strategies(spec, plan.device, found.config)
    if found.adapter is not None or any(strategy.quantized for strategy in chain):
        offline_for_libraries(settings)  # before peft or bitsandbytes is imported: both may call the Hub

    model, strategy = _load_weights(spec, found, chain, gpus, report, progress)
    _check_one_device(model, spec.source, report.strategy)
    if found.adapter is not None:
        report.adapter_targets, idle = adapter_targets(model, "default", spec.source)
        report.warnings.extend(idle)
    report.device = strategy.device
    if report.parameters is None:  # no safetensors headers to read: count what was loaded
        report.parameters = sum(p.numel() for p in model.parameters())
    report.load_seconds = round(time.perf_counter() - started, 3)
    progress("ready", 1.0)
    log.info("%s: loaded with %s on %s in %.2f s", spec.name, report.strategy, report.device, report.load_seconds)
    return LoadedModel(model, processor, found.config, report,
                       adapter_name="default" if found.adapter is not None else None)


def _before_resolving(spec: ModelSpec, settings: Settings, progress: Progress) -> None:
    """The testing delay, then the demo model built in place if it is missing."""
    if spec.debug_load_delay_s:
        progress("simulated delay", 0.0)
        time.sleep(spec.debug_load_delay_s)
    if spec.build_tiny:
        progress("building demo model", 0.05)
        with WEIGHTS_LOCK:
            ensure_demo_model(spec, settings)


def _report_resolution(spec: ModelSpec, found: ResolvedModel, report: LoadReport) -> None:
    """Where the files came from and what they are, into the report."""
    report.resolved_path, report.resolved_from = str(found.path), found.resolved.origin
    if found.adapter is not None and found.base is not None:
        report.adapter_path, report.base_path = str(found.adapter.path), str(found.base.path)
        report.base_resolved_from = found.base.origin
    assert found.family is not None  # resolve_model with its config always chooses one
    model_type = found.config.model_type
    report.family = found.family.family.value
    report.model_class = found.family.model_class_name(model_type)
    report.processor_class = found.family.processor_class(model_type)
    log.info("%s: %s -> family %s, %s", spec.name, model_type, report.family, report.model_class)


def load_processor(found: ResolvedModel, trust_remote_code: bool = False) -> Any:
    """The tokenizer or processor `found` is served with (`load_model`; `modelfleet doctor` loads it too). A
    fine-tune often saves its (possibly extended) tokenizer next to its adapter: that one is preferred."""
    assert found.family is not None  # resolve_model with its config always chooses one
    return _load_processor(found.family.processor_class(found.config.model_type),
                           found.path if found.has_own_processor else found.model_dir, trust_remote_code)


def _load_processor(processor_class: str, directory: Path, trust_remote_code: bool = False) -> Any:
    try:
        processor = auto_class(processor_class).from_pretrained(
            directory, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:  # missing or broken tokenizer/processor files
        raise UnreadableModelError(str(directory), f"the {processor_class} of {directory} cannot be loaded "
                                   f"({type(exc).__name__}: {str(exc)[:300]}): its tokenizer or processor files "
                                   "are missing or broken; download the model again") from None
    except ImportError as exc:  # a part of it needs a package that is not installed (Qwen2-VL's video processor)
        needs = " ".join(str(exc).split()).split(". Check out", 1)[0].removesuffix(".")
        raise UnsupportedModelError(str(directory), f"the {processor_class} of {directory} cannot be loaded here: "
                                    f"{needs}. Install it where the replicas run (Qwen2-VL and Qwen2.5-VL "
                                    "processors: `pip install torchvision`, the build that matches this machine's "
                                    "torch), then start again") from None
    _prepare_for_batching(processor)
    return processor


def _load_weights(
    spec: ModelSpec, found: ResolvedModel, chain: list[Strategy], gpus: list[GpuInfo], report: LoadReport,
    progress: Progress,
) -> tuple[Any, Strategy]:
    """Walk the strategy chain: skip what cannot fit, try the rest in order, keep why each one failed."""
    for index, strategy in enumerate(chain):
        weight_bytes = strategy.estimate_bytes(found.model_dir, report.parameters)
        shortfall = device_shortfall(strategy.device, gpus, weight_bytes)
        if shortfall:
            report.attempts.append(Attempt(strategy.name, "skipped", shortfall))
            log.warning("%s: skipping %s: %s", spec.name, strategy.name, shortfall)
            continue
        progress(f"loading weights: {strategy.name}", 0.35 + 0.5 * index / len(chain))
        log.info("%s: trying %s", spec.name, strategy.name)
        t0 = time.perf_counter()
        try:
            model = _from_pretrained(spec, found, strategy, progress, report)
        except LoadingError:  # about the model's files, not the strategy: another strategy cannot fix it
            raise
        except Exception as exc:  # any other failure moves on to the next strategy; the reason is kept
            report.attempts.append(Attempt(strategy.name, "failed", short_error(exc), time.perf_counter() - t0))
            log.warning("%s: %s failed (%s); falling back", spec.name, strategy.name, short_error(exc))
            _free_memory()
            continue
        report.attempts.append(Attempt(strategy.name, "loaded", "", time.perf_counter() - t0))
        report.strategy, report.dtype = _loaded_as(model, strategy), str(strategy.dtype).removeprefix("torch.")
        if warning := dtype_warning(spec.dtype, strategy):
            log.warning("%s: %s", spec.name, warning)
            report.warnings.append(warning)
        return model, strategy
    raise AllStrategiesFailedError(spec.source, [(a.strategy, a.reason) for a in report.attempts])


def _loaded_as(model: Any, strategy: Strategy) -> str:
    """The strategy's name, or, for weights that came out quantized by the checkpoint's own
    quantization_config, what the model says it holds."""
    quantized = loaded_quantization(model)
    if quantized is None or (strategy.bits and not strategy.prequantized):
        return strategy.name
    return f"pre-quantized {quantized} on {strategy.device}"


def _from_pretrained(
    spec: ModelSpec, found: ResolvedModel, strategy: Strategy, progress: Progress, report: LoadReport
) -> Any:
    """The weights under one strategy (on exactly its one device), bf16 layers on the CPU packed for
    oneDNN, then the adapter applied."""
    assert found.family is not None
    with WEIGHTS_LOCK:
        model = auto_class(found.family.auto_model).from_pretrained(
            found.model_dir, trust_remote_code=spec.trust_remote_code, local_files_only=True,
            **strategy.from_pretrained_kwargs(),
        )
        if strategy.device == "cpu" and strategy.dtype is torch.bfloat16 and not strategy.quantized:
            packed = pack_linears(model)  # before PEFT wraps the layers it adapts
            report.kernels = f"oneDNN packed bf16 linears ({packed})" if packed else ""
            log.info("%s: %d bf16 linear layers packed for oneDNN", spec.name, packed)
        if found.adapter is not None:
            progress("applying adapter", 0.9)
            model = _apply_adapter(model, found, spec.base_model or found.adapter.base_name)
    model.eval()
    return model


def _apply_adapter(model: Any, found: ResolvedModel, base_name: str) -> Any:
    """`found`'s adapter on `model` (the base `base_name`); one that does not fit is an AdapterMismatchError,
    never a failed strategy."""
    from peft import PeftModel

    assert found.adapter is not None
    try:
        return PeftModel.from_pretrained(model, found.adapter.path)
    except Exception as exc:
        base = f"{base_name} ({found.model_dir})" if base_name and base_name != str(found.model_dir) \
            else str(found.model_dir)
        raise adapter_misfit(model, found.adapter.path, base, short_error(exc)) from exc


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_one_device(model: Any, source: str, strategy: str) -> None:
    """Cannot fail with a single-device device_map; guards the invariant anyway."""
    devices = {str(p.device) for p in model.parameters()}
    if len(devices) != 1:
        raise AllStrategiesFailedError(source, [(strategy, f"model spans devices {sorted(devices)}")])


def attach_adapter(
    spec: ModelSpec, base: LoadedModel, *, settings: Settings | None = None, progress: Progress = no_progress
) -> LoadedModel:
    """Serve the adapter `spec.source` on the weights of an already loaded `base`: one copy of the
    base in memory for the base and all its adapters. Calls go through `LoadedModel.active()`."""
    settings = settings or Settings.from_env()
    started = time.perf_counter()
    if spec.build_tiny:
        progress("building demo model", 0.05)
        with WEIGHTS_LOCK:
            ensure_demo_model(spec, settings)
    found = resolve_model(spec, settings, with_base=False, with_config=False, progress=progress)
    adapter = found.adapter
    if adapter is None:
        raise UnsupportedModelError(
            spec.source,
            f"model {spec.name!r} names served model {base.report.name!r} as its base_model, but {found.path} "
            "is not a PEFT adapter directory (adapter_config.json without config.json)",
        )
    progress("applying adapter to the shared base", 0.5)
    offline_for_libraries(settings)  # before peft (and bitsandbytes, which it imports) may call the Hub
    from peft import PeftModel

    with WEIGHTS_LOCK, base.lock:  # no call on the base may run while LoRA layers are injected into it
        first = not isinstance(base.model, PeftModel)
        adapter_layers(base.model, enabled=True)  # a base call may have left them off; new layers come on
        plain = base.model
        try:
            if not first:
                base.model.load_adapter(str(adapter.path), adapter_name=spec.name)
            else:
                base.model = PeftModel.from_pretrained(plain, adapter.path, adapter_name=spec.name)
        except Exception as exc:
            if first:  # it injects its layers before it loads the weights: take them out again
                strip_lora_layers(plain)
            raise adapter_misfit(plain, adapter.path, f"{base.report.name} ({base.report.resolved_path})",
                                 short_error(exc)) from exc
        base.model.eval()
        try:
            targets, idle = adapter_targets(base.model, spec.name, spec.source)
        except UnsupportedModelError:  # the shared base goes on as it was
            if first:
                base.model = base.model.unload()
            else:
                base.model.delete_adapter(spec.name)
            raise
    processor = base.processor
    if found.has_own_processor:
        processor = _load_processor(base.report.processor_class, found.path)
    report = replace(
        base.report, name=spec.name, source=spec.source, resolved_path=str(found.path),
        resolved_from=found.resolved.origin, adapter_path=str(adapter.path), base_path=base.report.resolved_path,
        base_resolved_from=f"shared with served model {base.report.name!r}", demo=spec.is_demo,
        attempts=[], load_seconds=round(time.perf_counter() - started, 3), adapter_targets=targets,
        warnings=[*base.report.warnings, *idle],
    )
    log.info("%s: adapter %s attached to %s in %.2f s", spec.name, adapter.path, base.report.name, report.load_seconds)
    progress("ready", 1.0)
    return LoadedModel(base.model, processor, base.config, report, adapter_name=spec.name, lock=base.lock)


def strip_lora_layers(model: Any) -> None:
    """Undo a first adapter's injection that failed half-way (a weight of the wrong shape): every tuner
    layer back to the module it wraps, and no PEFT config left on the base, which otherwise looks adapted
    and fails every call."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        model.__dict__.pop(attribute, None)


def _prepare_for_batching(processor: Any) -> None:
    """Batched generation needs left padding and a pad token (many chat tokenizers have none)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if hasattr(tokenizer, "padding_side"):
        tokenizer.padding_side = "left"
    if getattr(tokenizer, "pad_token", "x") is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
