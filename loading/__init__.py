"""modelfleet's model loading: find, detect, place and load transformers models robustly.

Knows nothing of Ray or HTTP. The serving layer uses `ModelSpec`, `ModelHandle` and
`load_model`; `modelfleet doctor` and `modelfleet fetch` use the same pieces.

Names are imported on first use (PEP 562): `from loading import ModelSpec` costs pydantic only,
while `load_model` brings in torch and transformers (~4 s on 2 cores). The ingress and the
app builder never pay for what only the model replicas need.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "config": ["DType", "DevicePreference", "Family", "LoadingMode", "ModelSpec", "Quantization",
               "models_from_serve_config"],
    "errors": ["AdapterBaseNotFoundError", "AdapterMismatchError", "AllStrategiesFailedError", "LoadingError",
               "ModelLoadFailed", "ModelLoadingInProgress", "ModelNotFoundError", "NoDeviceError",
               "UnreadableModelError", "UnsupportedModelError"],
    "handle": ["ModelHandle", "State"],
    "inspect_model": ["detect_family"],
    "loader": ["attach_adapter", "load_model"],
    "report": ["LoadReport", "LoadedModel", "adapter_layers"],
    "runtime_sources": ["AdapterCheck", "ModelCheck", "RuntimeSourceError", "locate_adapter", "locate_model"],
    "adapters": ["LANGUAGE_MODEL", "adapted_parts"],
    "settings": ["Settings"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'loading' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # for type checkers and IDEs: the eager view of the same names
    from .adapters import LANGUAGE_MODEL, adapted_parts
    from .config import DevicePreference, DType, Family, LoadingMode, ModelSpec, Quantization, models_from_serve_config
    from .errors import (
        AdapterBaseNotFoundError,
        AdapterMismatchError,
        AllStrategiesFailedError,
        LoadingError,
        ModelLoadFailed,
        ModelLoadingInProgress,
        ModelNotFoundError,
        NoDeviceError,
        UnreadableModelError,
        UnsupportedModelError,
    )
    from .handle import ModelHandle, State
    from .inspect_model import detect_family
    from .loader import attach_adapter, load_model
    from .report import LoadedModel, LoadReport, adapter_layers
    from .runtime_sources import AdapterCheck, ModelCheck, RuntimeSourceError, locate_adapter, locate_model
    from .settings import Settings
