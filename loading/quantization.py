"""The load strategies to try, in order, and what bitsandbytes can do on this machine.

On GPU with quantization=auto: bitsandbytes 4-bit -> 8-bit -> fp16/bf16 -> CPU. Each strategy
is a plain description of `from_pretrained` keyword arguments; the loader tries them in order
and records why each one that failed was abandoned. A checkpoint that is quantized already
(`quantization_config` in its config.json) has one strategy per device, loaded as it is stored.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import DevicePreference, DType, ModelSpec, Quantization
from .cpu_kernels import cpu_computes_bf16
from .placement import estimate_weight_bytes, stored_bytes

_DTYPES = {DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}
# Approximate bytes per parameter under each strategy, for the placement estimate.
BYTES_PER_PARAM = {"4bit": 0.56, "8bit": 1.06, torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


@dataclass(frozen=True)
class Strategy:
    name: str  # shown in reports and /health, e.g. "4-bit (bitsandbytes nf4) on cuda:0"
    device: str
    dtype: torch.dtype
    bits: int | None = None  # 4 or 8 for bitsandbytes, None for plain weights
    #: the checkpoint is quantized already (its config's quantization_config): loaded as it is stored
    prequantized: bool = False

    @property
    def quantized(self) -> bool:
        return self.bits is not None or self.prequantized

    @property
    def bytes_per_param(self) -> float:
        return BYTES_PER_PARAM[f"{self.bits}bit"] if self.bits in (4, 8) else BYTES_PER_PARAM[self.dtype]

    def estimate_bytes(self, model_dir: Path, parameters: int | None) -> int:
        """The weights in memory under this strategy: parameters x bytes per parameter; for a pre-quantized
        checkpoint, its weight files' size (its packed tensors hold several parameters per element, so
        counting elements says little)."""
        if self.prequantized:
            return stored_bytes(model_dir)
        return estimate_weight_bytes(model_dir, self.bytes_per_param, parameters)

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dtype": self.dtype, "device_map": self.device}
        if self.bits and not self.prequantized:  # a pre-quantized checkpoint brings its own quantization_config
            from transformers import BitsAndBytesConfig

            if self.bits == 4:
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.dtype
                )
            else:
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        return kwargs


def gpu_half_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def cpu_dtype(dtype: DType, checkpoint_dtype: Any = None) -> torch.dtype:
    """The dtype weights get on the CPU. auto: float32, except a checkpoint stored in bfloat16 stays in
    it where the CPU multiplies bf16 natively (packed kernels, loading/cpu_kernels.py): as
    transformers' own default keeps it, at half the memory and faster than fp32. float16 computes
    slowly on CPUs, so it is loaded as float32."""
    if dtype is DType.AUTO:
        return torch.bfloat16 if checkpoint_dtype in (torch.bfloat16, "bfloat16") and cpu_computes_bf16() \
            else torch.float32
    return torch.float32 if dtype is DType.FLOAT16 else _DTYPES[dtype]


def dtype_warning(requested: DType, strategy: Strategy) -> str | None:
    """Why the loaded weights are not in the configured dtype, for the load report; None when they are."""
    if requested is not DType.FLOAT16 or strategy.device != "cpu" or strategy.dtype is torch.float16:
        return None
    loaded = str(strategy.dtype).removeprefix("torch.")
    return (f"dtype: float16 is configured, but on the CPU the weights are loaded in {loaded} (CPUs compute "
            "float16 slowly), at twice the memory float16 would take. Set dtype: bfloat16 for half the memory "
            "(fast where the CPU multiplies bf16 natively, AVX512-BF16/AMX), or dtype: float32 to say so.")


def strategy_chain(
    quantization: Quantization, prefer_4bit: bool, dtype: DType, device: str, preference: DevicePreference,
    checkpoint_dtype: Any = None,
) -> list[Strategy]:
    """Strategies in the order to try them on `device` ("cuda:0" or "cpu"); `checkpoint_dtype` is what
    the model's config says its weights are stored in."""
    on_gpu = device.startswith("cuda")
    half = _DTYPES.get(dtype) or (gpu_half_dtype() if on_gpu else torch.float32)
    full_cpu = cpu_dtype(dtype, checkpoint_dtype)
    four = Strategy(f"4-bit (bitsandbytes nf4) on {device}", device, half if on_gpu else torch.float32, 4)
    eight = Strategy(f"8-bit (bitsandbytes int8) on {device}", device, half if on_gpu else torch.float32, 8)
    plain = Strategy(f"{str(half).removeprefix('torch.')} on {device}", device, half)
    cpu = Strategy(f"{str(full_cpu).removeprefix('torch.')} on cpu", "cpu", full_cpu)

    if quantization is Quantization.AUTO:
        # On CPU, bitsandbytes is slower than plain weights: quantize only where it saves GPU memory.
        chain = (([four] if prefer_4bit else []) + [eight, plain]) if on_gpu else []
    elif quantization is Quantization.FOUR_BIT:
        chain = [four, eight] + ([plain] if on_gpu else [])
    elif quantization is Quantization.EIGHT_BIT:
        chain = [eight] + ([plain] if on_gpu else [])
    else:
        chain = [plain] if on_gpu else []
    if preference is not DevicePreference.CUDA:
        chain.append(cpu)  # the last resort everywhere but where GPU-only was asked for
    return chain


def model_strategies(spec: ModelSpec, device: str, config: Any) -> list[Strategy]:
    """`spec`'s chain on `device`, given its config: what the loader walks and `doctor` plans. A checkpoint
    that is quantized already is loaded as it is stored: on `device`, then on the CPU as the last resort."""
    checkpoint_dtype = getattr(config, "dtype", None)
    stored = stored_quantization(config)
    if stored is None:
        return strategy_chain(spec.quantization, spec.prefer_4bit, spec.dtype, device, spec.device,
                              checkpoint_dtype=checkpoint_dtype)
    what, bits = stored
    on_gpu = device.startswith("cuda")
    devices = [device] + (["cpu"] if on_gpu and spec.device is not DevicePreference.CUDA else [])
    return [Strategy(f"pre-quantized {what} on {where}", where,
                     (_DTYPES.get(spec.dtype) or gpu_half_dtype()) if where != "cpu" else cpu_dtype(
                         spec.dtype, checkpoint_dtype), bits, prequantized=True) for where in devices]


def stored_quantization(config: Any) -> tuple[str, int | None] | None:
    """("bitsandbytes 4-bit", 4) for a checkpoint whose config carries a quantization_config (a *-bnb-4bit
    Hub repo, GPTQ, AWQ, ...); None for plain weights."""
    stored = getattr(config, "quantization_config", None)
    if stored is None:
        return None
    fields = stored if isinstance(stored, dict) else stored.to_dict()
    method = fields.get("quant_method", "quantized")
    method = str(getattr(method, "value", method))  # an enum in a config object, a string in a dict
    bits = 4 if fields.get("load_in_4bit") else 8 if fields.get("load_in_8bit") else fields.get("bits")
    bits = bits if isinstance(bits, int) else None
    return (f"{method} {bits}-bit" if bits else method), bits


def loaded_quantization(model: Any) -> str | None:
    """How a loaded model's weights are quantized, read off its quantizer ("bitsandbytes 4-bit"); None if not."""
    quantizer = getattr(model, "hf_quantizer", None)
    stored = stored_quantization(quantizer) if quantizer is not None else None  # it has a quantization_config too
    return stored[0] if stored is not None else None


@dataclass
class BitsAndBytesStatus:
    installed: bool
    version: str | None
    native_libraries: list[str] = field(default_factory=list)
    needed_library: str | None = None
    usable: bool = False
    message: str = ""


def bitsandbytes_status() -> BitsAndBytesStatus:
    """Which native libraries bitsandbytes ships and whether the one this torch needs is there."""
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or not spec.submodule_search_locations:
        return BitsAndBytesStatus(False, None, message="bitsandbytes is not installed: `pip install bitsandbytes`.")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    libs = sorted(p.name for p in package_dir.glob("libbitsandbytes_*"))
    version = importlib.metadata.version("bitsandbytes")
    if torch.cuda.is_available() and torch.version.cuda:
        needed = f"libbitsandbytes_cuda{torch.version.cuda.replace('.', '')}"
    else:
        needed = "libbitsandbytes_cpu"
    found = [lib for lib in libs if lib.startswith(needed + ".")]
    if found:
        message = f"bitsandbytes {version}: native library {found[0]} found for this torch."
    elif libs:
        message = (
            f"bitsandbytes {version} ships {', '.join(libs)} but not {needed}.* for this torch "
            f"({torch.__version__}): 4-/8-bit loading will fail. Reinstall a bitsandbytes build that matches "
            "(`pip install --force-reinstall bitsandbytes`) or set BNB_CUDA_VERSION to one of the shipped versions."
        )
    else:
        message = (
            f"bitsandbytes {version} has no native libraries in {package_dir}: 4-/8-bit loading will fail. "
            "`pip install --force-reinstall bitsandbytes`."
        )
    return BitsAndBytesStatus(True, version, libs, needed, bool(found), message)
