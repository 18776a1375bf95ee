"""What a load did: where the model came from, what it became, and every fallback step."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
    model_class: str = ""
    processor_class: str = ""
    device: str = ""
    device_reason: str = ""
    visible_devices: str | None = None
    dtype: str = ""
    strategy: str = ""
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

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> str:
        return self.report.device
