"""What a load did: where the model came from, what it became, and every fallback step."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from .base_view import base_view


@dataclass
class Attempt:
    strategy: str
    outcome: str  # "loaded" | "failed" | "skipped"
    reason: str = ""
    seconds: float = 0.0


@dataclass
class LoadReport:
    name: str
    source: str
    family: str = ""
    resolved_path: str = ""
    resolved_from: str = ""
    adapter_path: str | None = None
    base_path: str | None = None
    base_resolved_from: str | None = None
    #: an adapter's parts of the base that it changes (loading.adapters.adapter_targets), e.g.
    #: ["language_model", "multi_modal_projector", "vision_tower"]; empty for a model that is no adapter
    adapter_targets: list[str] = field(default_factory=list)
    model_class: str = ""
    processor_class: str = ""
    device: str = ""
    device_reason: str = ""
    visible_devices: str | None = None
    dtype: str = ""
    strategy: str = ""
    #: how the CPU computes bf16 layers, e.g. "oneDNN packed bf16 linears (211)"; "" for torch's defaults
    kernels: str = ""
    parameters: int | None = None
    load_seconds: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    demo: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: Any
    processor: Any  # a tokenizer for text-only models, a processor otherwise
    config: Any
    report: LoadReport
    #: the PEFT adapter this model answers with; None for a plain model or a base shared with adapters
    adapter_name: str | None = None
    #: held around every model call; shared by a base and the adapters attached to it
    lock: Any = field(default_factory=threading.RLock, repr=False)

    @contextmanager
    def active(self) -> Iterator[Any]:
        """Hold the model for one call with the right adapter switched on (or all of them off).

        A base model shared with adapters is a PeftModel after the first attach: calls for the base
        run on `base_view`, the base's module tree without the adapter layers, or, where none can be
        built, with its adapter layers off, and they stay off until a call with an adapter (PEFT's own
        `disable_adapter()` context walks every module twice per call, and a decode step of the base
        would pay that per token: 2x the tiny model's step, bench/RESULTS.md)."""
        with self.lock:
            if self.adapter_name is not None:
                adapter_layers(self.model, enabled=True)
                # set_adapter walks every module: skip it when the adapter is on already (a decode
                # step of one conversation would pay it per token)
                if getattr(self.model, "active_adapter", None) != self.adapter_name:
                    self.model.set_adapter(self.adapter_name)
                yield self.model
            else:
                view = base_view(self.model) if hasattr(self.model, "peft_config") else None
                if view is not None:  # the base's own layers: none of PEFT's per-layer Python (base_view.py)
                    yield view
                    return
                adapter_layers(self.model, enabled=False)
                yield self.model

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> str:
        return self.report.device


def adapter_layers(model: Any, enabled: bool) -> None:
    """Switch every adapter layer of a PeftModel on or off, unless they are so already (a no-op for a
    plain model). Calls that pass PEFT's `adapter_names` and any change to the adapters (attach,
    delete) need them on: they call this first."""
    if not hasattr(model, "peft_config") or getattr(model, "_adapters_disabled", False) == (not enabled):
        return
    if enabled:
        model.base_model.enable_adapter_layers()
    else:
        model.base_model.disable_adapter_layers()
    model._adapters_disabled = not enabled
