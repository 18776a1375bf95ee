"""bfloat16 matmuls on the CPU through oneDNN with weights packed once, at load.

torch's default bf16 `linear` on the CPU hands oneDNN the plain weight on every call, and oneDNN
reorders it into its blocked layout each time: on a CPU with AMX, SmolLM2-135M's decode step at one
row is slower in bf16 than in fp32 (36 vs 32 ms). Packed once with `_reorder_linear_weight`, as
torch's own compiler does for frozen bf16 models, the same step takes 28 ms, a 16-row step 40 ms
instead of fp32's 71, and a 60-token prefill 49 ms instead of 111 (bench/REAL_MODEL.md, the
"fifth" rerun).

Each packed `nn.Linear` keeps its class and its `weight` (PEFT wraps it, tied embeddings read it);
only its `forward` is replaced, and that falls back to the plain `linear` for any input the packed
weight cannot take. The packed copy costs the weight's bf16 bytes again: a bf16 model packed holds
what the same model in fp32 holds.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


@functools.cache
def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): where it does not, bf16 is
    emulated and slower than fp32, so nothing here turns it on."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()) \
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN, or for another CPU
        return False


def _packed_forward(linear: torch.nn.Linear, packed: torch.Tensor) -> Callable[..., torch.Tensor]:
    weight, bias = linear.weight, linear.bias

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (x.dtype is not torch.bfloat16 or x.device.type != "cpu" or x.numel() == 0
                or (torch.is_grad_enabled() and weight.requires_grad)):  # the packed op has no backward
            return torch.nn.functional.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")

    return forward


def pack_linears(model: torch.nn.Module) -> int:
    """Pack every plain bf16 `nn.Linear` of `model` on the CPU; the number packed (0 where this CPU
    or torch build cannot). Call before an adapter wraps the layers: PEFT's own layers stay as they
    are, so adapters attached later read the packed base through `base_layer`."""
    if not cpu_computes_bf16():
        return 0
    packed = 0
    for module in model.modules():
        # Exactly nn.Linear: bitsandbytes' and PEFT's layers subclass or wrap it and compute otherwise.
        if type(module) is not torch.nn.Linear:
            continue
        weight = module.weight
        if weight.dtype is not torch.bfloat16 or weight.device.type != "cpu":
            continue
        try:
            weight_packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        except RuntimeError as exc:  # keep the plain kernel rather than fail the load
            log.warning("bf16 linear packing unavailable (%s); computing with torch's default kernel", exc)
            return packed
        module.forward = _packed_forward(module, weight_packed)  # type: ignore[method-assign]
        packed += 1
    return packed
