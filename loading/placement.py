"""Exactly one device per model: estimate the weights, compare with free GPU memory, choose.

Never `device_map="auto"`: across GPUs it splits the model and `generate` hangs on inter-GPU
synchronisation; with too little memory it asks for disk offload. Inside a Ray replica with
`num_gpus=1`, the one visible GPU is `cuda:0`.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DevicePreference
from .errors import NoDeviceError, UnreadableModelError, short_error
from .resolve import WEIGHT_SUFFIXES

log = logging.getLogger(__name__)

# Activations, KV cache and CUDA context need room beyond the weights.
HEADROOM = 1.25
MIN_FREE_AFTER_BYTES = 512 * 2**20


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cuda:0" or "cpu"
    reason: str
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES as this process sees it


def count_parameters(model_dir: Path) -> int | None:
    """Number of weight elements, read from safetensors headers only (no tensor data)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        header = safetensors_header(file)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in meta["shape"]:
                count *= dim
            total += count
    return total


def safetensors_header(file: Path) -> dict:
    """A safetensors file's JSON header; a clear error for what is not one (a git-lfs pointer, a
    truncated download), instead of a read of the 2**60 bytes a pointer's text names as header length."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        if head.startswith(b"version "):  # "version https://git-lfs.github.com/spec/v1"
            raise UnreadableModelError(str(file), f"{file} is a git-lfs pointer, not the weights: the model was "
                                       "cloned without git-lfs. Run `git lfs pull` in its directory, or download it "
                                       "again.")
        if header_len > size - 8:
            raise UnreadableModelError(str(file), f"{file} is not a complete safetensors file ({size:,} bytes, "
                                       f"its header claims {header_len:,}): download it again.")
        try:
            header = json.loads(f.read(header_len))
            if not isinstance(header, dict) or not all(
                    isinstance(meta, dict) and isinstance(meta.get("shape"), list)
                    for name, meta in header.items() if name != "__metadata__"):
                raise ValueError("not a table of tensors")
        except (ValueError, UnicodeDecodeError) as exc:
            raise UnreadableModelError(str(file), f"{file} has a corrupt safetensors header ({exc}): download it "
                                       "again.") from None
    ends = [meta["data_offsets"][1] for name, meta in header.items() if name != "__metadata__"
            and isinstance(meta.get("data_offsets"), list) and len(meta["data_offsets"]) == 2
            and isinstance(meta["data_offsets"][1], int)]
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:  # the header is whole but the tensors after it are cut short
        raise UnreadableModelError(str(file), f"{file} is not a complete safetensors file ({size:,} bytes, its "
                                   f"tensors need {needed:,}): download it again.")
    return header


def stored_bytes(model_dir: Path) -> int:
    """On-disk size of the weight files (fallback when there are no safetensors)."""
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def estimate_weight_bytes(model_dir: Path, bytes_per_param: float, parameters: int | None = None) -> int:
    """The one estimate of a model's weights in memory: parameters x bytes per parameter of the strategy.

    `parameters` saves re-reading the safetensors headers (`count_parameters`); without any
    safetensors (or with 0 parameters counted), the weight files' size on disk.
    """
    params = count_parameters(model_dir) if parameters is None else parameters
    return int(params * bytes_per_param) if params else stored_bytes(model_dir)


@dataclass(frozen=True)
class UnusableGpu:
    """A device CUDA lists that cannot be used, and why."""

    device: str  # "cuda:0 (NVIDIA A10G)", or "CUDA" where even the devices cannot be counted
    reason: str  # e.g. "RuntimeError: CUDA error: CUDA-capable device(s) is/are busy or unavailable"

    def __str__(self) -> str:
        return f"{self.device} cannot be opened ({self.reason})"


def survey_gpus() -> tuple[list[GpuInfo], list[UnusableGpu]]:
    """The GPUs CUDA lists, each opened to read its free memory: those that answer, and those that do not
    with why (exclusive-process mode held by another process, "busy or unavailable", an ECC/Xid-wedged
    device). A device that cannot be opened is left out, as if absent: it never fails the survey, which
    runs before the strategy chain and its fallback to the CPU."""
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # noqa: BLE001 - whatever CUDA raises, the CPU is still there
        unusable = [UnusableGpu("CUDA", short_error(exc))]
        log.warning("GPUs left out: %s", unusable[0])
        return [], unusable
    gpus: list[GpuInfo] = []
    unusable = []
    for index in range(count):
        name = ""
        try:
            name = torch.cuda.get_device_name(index)
            free, total = torch.cuda.mem_get_info(index)
        except Exception as exc:  # noqa: BLE001 - one device's failure leaves it out, nothing more
            unusable.append(UnusableGpu(f"cuda:{index}" + (f" ({name})" if name else ""), short_error(exc)))
            log.warning("GPU left out: %s", unusable[-1])
            continue
        gpus.append(GpuInfo(index, name, free, total))
    return gpus, unusable


def visible_gpus() -> list[GpuInfo]:
    """The GPUs that can be used (`survey_gpus`, without the ones that cannot be opened)."""
    return survey_gpus()[0]


def plan_device(preference: DevicePreference, gpus: list[GpuInfo], unusable: Sequence[UnusableGpu] = ()) -> DevicePlan:
    """The device to try first: cuda:N (the first usable GPU: cuda:0, this replica's one GPU, unless it
    cannot be opened) or cpu. `unusable`, the devices CUDA lists that cannot be opened, are named in the
    plan's reason: why a model is on the CPU, or why device: cuda cannot be served.

    Whether the weights fit is checked per strategy (`gpu_shortfall`): a 4-bit load may fit where
    fp16 does not, and a model that fits under no GPU strategy ends on CPU, never on disk.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if preference is DevicePreference.CPU:
        return DevicePlan("cpu", "device: cpu configured", visible)
    broken = "; ".join(str(gpu) for gpu in unusable)
    if not gpus and preference is DevicePreference.CUDA:
        if unusable:
            raise NoDeviceError(
                f"device: cuda is configured but no CUDA device can be used: {broken} "
                f"(CUDA_VISIBLE_DEVICES={visible!r}, torch {torch.__version__}). Free the GPU (a process holding "
                "it in exclusive-process mode, or a device that needs a reset: see nvidia-smi), give the replica "
                "another one, or set the model's device: auto to serve it on the CPU meanwhile."
            )
        raise NoDeviceError(
            f"device: cuda is configured but no CUDA device is visible (CUDA_VISIBLE_DEVICES={visible!r}, "
            f"torch {torch.__version__}). Give its replica a GPU (the app's args.device: gpu, not a "
            "ray_actor_options override) or set the model's device: auto."
        )
    if not gpus:
        why = f"no usable CUDA device: {broken}" if unusable else "no CUDA device visible"
        why += f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return DevicePlan("cpu", why, visible)
    extra = f"; {len(gpus) - 1} more visible GPU(s) left unused by design" if len(gpus) > 1 else ""
    extra += f"; left out: {broken}" if unusable else ""
    gpu = gpus[0]
    return DevicePlan(
        f"cuda:{gpu.index}",
        f"{gpu.name} with {gpu.free_bytes / 2**30:.2f} of {gpu.total_bytes / 2**30:.2f} GiB free{extra}",
        visible,
    )


def device_shortfall(device: str, gpus: list[GpuInfo], weight_bytes: int) -> str | None:
    """Why weights of `weight_bytes` cannot go on `device`, or None: only the GPU (cuda:0, the first
    of `gpus`) can be too small; the CPU is the last resort and takes any model."""
    if not device.startswith("cuda") or not gpus:
        return None
    return gpu_shortfall(gpus[0], weight_bytes)


def gpu_shortfall(gpu: GpuInfo, weight_bytes: int) -> str | None:
    """Why a model of `weight_bytes` does not fit on `gpu`, or None if it fits."""
    needed = int(weight_bytes * HEADROOM) + MIN_FREE_AFTER_BYTES
    if needed <= gpu.free_bytes:
        return None
    return (
        f"needs ~{needed / 2**30:.2f} GiB on {gpu.name} but only {gpu.free_bytes / 2**30:.2f} GiB is free "
        "(skipped rather than offloading to disk)"
    )
