"""Load one served model: resolve, detect, place, fall back, report.

    loaded = load_model(spec)            # -> LoadedModel(model, processor, config, report)

Everything before the weights (resolution, adapter base, config, family, processor) fails fast
with a clear error and is never retried with another strategy: another strategy cannot fix a
missing file. Only the weight loading itself walks the strategy chain.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig

from .adapters import read_adapter, resolve_base
from .config import ModelSpec
from .errors import AllStrategiesFailedError, UnsupportedModelError
from .families import auto_class, select_family
from .placement import GpuInfo, count_parameters, gpu_shortfall, plan_device, stored_bytes, visible_gpus
from .quantization import strategy_chain
from .report import Attempt, LoadedModel, LoadReport
from .resolve import looks_like_path, resolve_source
from .settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[str, "float | None"], None]
PROCESSOR_FILES = ("tokenizer_config.json", "tokenizer.json", "preprocessor_config.json", "processor_config.json")


def _no_progress(phase: str, fraction: float | None = None) -> None:
    return None


def tiny_target(spec_source: str, settings: Settings) -> Path:
    return Path(spec_source).expanduser() if looks_like_path(spec_source) else settings.local_models_dir / spec_source


def ensure_demo_model(spec: ModelSpec, settings: Settings) -> None:
    """Build the tiny demo model (and its tiny base, for an adapter) if it is not there yet."""
    from .tiny import ensure_tiny

    kind = spec.build_tiny
    assert kind is not None
    dest = tiny_target(spec.source, settings)
    if kind.endswith("-lora"):
        if not spec.base_model:
            raise ValueError(f"model {spec.name!r}: build_tiny={kind!r} needs `base_model` (where its tiny base lives)")
        base = tiny_target(spec.base_model, settings)
        ensure_tiny(kind.removesuffix("-lora"), base)
        ensure_tiny(kind, dest, base=base)
    else:
        ensure_tiny(kind, dest)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def load_model(
    spec: ModelSpec,
    *,
    settings: Settings | None = None,
    progress: Progress = _no_progress,
    gpus: list[GpuInfo] | None = None,
) -> LoadedModel:
    """Load `spec` onto exactly one device. `gpus` overrides the GPUs seen (for planning tests)."""
    settings = settings or Settings.from_env()
    started = time.perf_counter()
    report = LoadReport(name=spec.name, source=spec.source, demo=spec.is_demo, warnings=list(settings.warnings))

    if spec.debug_load_delay_s:
        progress("simulated delay", 0.0)
        time.sleep(spec.debug_load_delay_s)
    if spec.build_tiny:
        progress("building demo model", 0.05)
        ensure_demo_model(spec, settings)

    progress("resolving", 0.1)
    resolved = resolve_source(spec.source, settings, revision=spec.revision)
    report.resolved_path, report.resolved_from = str(resolved.path), resolved.origin
    model_dir = resolved.path
    adapter = read_adapter(resolved.path)
    if adapter is not None:
        progress("resolving adapter base", 0.15)
        base = resolve_base(adapter, settings, override=spec.base_model)
        log.info("%s: adapter %s on base %s (%s)", spec.name, adapter.path, base.path, base.origin)
        report.adapter_path, report.base_path, report.base_resolved_from = str(adapter.path), str(base.path), base.origin
        model_dir = base.path

    progress("reading config", 0.2)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=spec.trust_remote_code, local_files_only=True)
    family = select_family(config, spec.family, spec.source)
    report.family = family.family.value
    report.model_class = family.model_class_name(config.model_type)
    report.processor_class = family.processor_class(config.model_type)
    log.info("%s: %s -> family %s, %s", spec.name, config.model_type, report.family, report.model_class)

    progress("loading processor", 0.25)
    # A fine-tune often saves its (possibly extended) tokenizer next to the adapter: prefer it.
    processor_dir = resolved.path if any((resolved.path / f).is_file() for f in PROCESSOR_FILES) else model_dir
    processor = auto_class(report.processor_class).from_pretrained(
        processor_dir, trust_remote_code=spec.trust_remote_code, local_files_only=True
    )
    _prepare_for_batching(processor)

    progress("planning placement", 0.3)
    gpus = visible_gpus() if gpus is None else gpus
    plan = plan_device(spec.device, gpus)
    report.device_reason, report.visible_devices = plan.reason, plan.visible_devices
    params = count_parameters(model_dir)
    report.parameters = params
    log.info("%s: device plan %s (%s); %s parameters", spec.name, plan.device, plan.reason, params or "unknown")

    chain = strategy_chain(spec.quantization, spec.prefer_4bit, spec.dtype, plan.device, spec.device)
    model_cls = auto_class(family.auto_model)
    model = None
    for index, strategy in enumerate(chain):
        if strategy.device.startswith("cuda") and gpus:
            weight_bytes = int(params * strategy.bytes_per_param) if params else stored_bytes(model_dir)
            shortfall = gpu_shortfall(gpus[0], weight_bytes)
            if shortfall:
                report.attempts.append(Attempt(strategy.name, "skipped", shortfall))
                log.warning("%s: skipping %s: %s", spec.name, strategy.name, shortfall)
                continue
        progress(f"loading weights: {strategy.name}", 0.35 + 0.5 * index / len(chain))
        log.info("%s: trying %s", spec.name, strategy.name)
        t0 = time.perf_counter()
        try:
            model = model_cls.from_pretrained(
                model_dir, trust_remote_code=spec.trust_remote_code, local_files_only=True,
                **strategy.from_pretrained_kwargs(),
            )
            if adapter is not None:
                progress("applying adapter", 0.9)
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, adapter.path)
            model.eval()
        except Exception as exc:  # any failure moves on to the next strategy; the reason is kept
            model = None
            report.attempts.append(Attempt(strategy.name, "failed", _short(exc), time.perf_counter() - t0))
            log.warning("%s: %s failed (%s); falling back", spec.name, strategy.name, _short(exc))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        report.attempts.append(Attempt(strategy.name, "loaded", "", time.perf_counter() - t0))
        report.strategy, report.dtype = strategy.name, str(strategy.dtype).removeprefix("torch.")
        chosen = strategy
        break
    if model is None:
        raise AllStrategiesFailedError(spec.source, [(a.strategy, a.reason) for a in report.attempts])

    devices = {str(p.device) for p in model.parameters()}
    if len(devices) != 1:  # cannot happen with a single-device device_map; guard the invariant anyway
        raise AllStrategiesFailedError(spec.source, [(report.strategy, f"model spans devices {sorted(devices)}")])
    report.device = chosen.device
    report.load_seconds = round(time.perf_counter() - started, 3)
    progress("ready", 1.0)
    log.info("%s: loaded with %s on %s in %.2f s", spec.name, report.strategy, report.device, report.load_seconds)
    return LoadedModel(model, processor, config, report, adapter_name="default" if adapter is not None else None)


def attach_adapter(
    spec: ModelSpec, base: LoadedModel, *, settings: Settings | None = None, progress: Progress = _no_progress
) -> LoadedModel:
    """Serve the adapter `spec.source` on the weights of an already loaded `base`: one copy of the
    base in memory for the base and all its adapters. Calls go through `LoadedModel.active()`."""
    settings = settings or Settings.from_env()
    started = time.perf_counter()
    if spec.build_tiny:
        progress("building demo model", 0.05)
        ensure_demo_model(spec, settings)
    progress("resolving", 0.1)
    resolved = resolve_source(spec.source, settings, revision=spec.revision)
    adapter = read_adapter(resolved.path)
    if adapter is None:
        raise UnsupportedModelError(
            spec.source,
            f"model {spec.name!r} names served model {base.report.name!r} as its base_model, but {resolved.path} "
            "is not a PEFT adapter directory (adapter_config.json without config.json)",
        )
    progress("applying adapter to the shared base", 0.5)
    from peft import PeftModel

    with base.lock:  # no call on the base may run while LoRA layers are injected into it
        if isinstance(base.model, PeftModel):
            base.model.load_adapter(str(adapter.path), adapter_name=spec.name)
        else:
            base.model = PeftModel.from_pretrained(base.model, adapter.path, adapter_name=spec.name)
        base.model.eval()
    processor_dir = resolved.path if any((resolved.path / f).is_file() for f in PROCESSOR_FILES) else None
    processor = base.processor
    if processor_dir is not None:
        processor = auto_class(base.report.processor_class).from_pretrained(processor_dir, local_files_only=True)
        _prepare_for_batching(processor)
    report = replace(
        base.report, name=spec.name, source=spec.source, resolved_path=str(resolved.path),
        resolved_from=resolved.origin, adapter_path=str(adapter.path), base_path=base.report.resolved_path,
        base_resolved_from=f"shared with served model {base.report.name!r}", demo=spec.is_demo,
        attempts=[], load_seconds=round(time.perf_counter() - started, 3),
    )
    log.info("%s: adapter %s attached to %s in %.2f s", spec.name, adapter.path, base.report.name, report.load_seconds)
    progress("ready", 1.0)
    return LoadedModel(base.model, processor, base.config, report, adapter_name=spec.name, lock=base.lock)


def _prepare_for_batching(processor) -> None:
    """Batched generation needs left padding and a pad token (many chat tokenizers have none)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if hasattr(tokenizer, "padding_side"):
        tokenizer.padding_side = "left"
    if getattr(tokenizer, "pad_token", "x") is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
