"""modelfleet's model loading: find, detect, place and load transformers models robustly.

Knows nothing of Ray or HTTP. The serving layer uses `ModelSpec`, `ModelHandle` and
`load_model`; `modelfleet doctor` and `modelfleet fetch` use the same pieces.
"""

from .config import DevicePreference, DType, Family, LoadingMode, ModelSpec, Quantization, models_from_serve_config
from .errors import (
    AdapterBaseNotFoundError,
    AllStrategiesFailedError,
    LoadingError,
    ModelLoadFailed,
    ModelLoadingInProgress,
    ModelNotFoundError,
    NoDeviceError,
    UnsupportedModelError,
)
from .handle import ModelHandle, State
from .inspect_model import detect_family
from .loader import load_model
from .report import LoadedModel, LoadReport
from .settings import Settings

__all__ = [
    "AdapterBaseNotFoundError", "AllStrategiesFailedError", "DType", "DevicePreference", "Family", "LoadReport",
    "LoadedModel", "LoadingError", "LoadingMode", "ModelHandle", "ModelLoadFailed", "ModelLoadingInProgress",
    "ModelNotFoundError", "ModelSpec", "NoDeviceError", "Quantization", "Settings", "State",
    "UnsupportedModelError", "detect_family", "load_model", "models_from_serve_config",
]
