"""bf16 on the CPU: oneDNN-packed linears compute what torch's plain bf16 linear computes, a bf16
checkpoint stays bf16 where the CPU multiplies it natively, and adapters work over packed layers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loading import ModelSpec, attach_adapter, load_model
from loading.config import DType
from loading.cpu_kernels import cpu_computes_bf16, pack_linears
from loading.inspect_model import inspect_model
from loading.offline import HubStatus
from loading.quantization import cpu_dtype
from loading.settings import Settings
from loading.tiny import build_tiny

needs_bf16 = pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU emulates bf16: nothing is packed")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within bf16's rounding of the output (8 bits of mantissa), relative to the values' scale."""
    scale = want.float().abs().max().clamp(min=1.0)
    assert (got.float() - want.float()).abs().max() <= 2 ** -6 * scale


@needs_bf16
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_computes_what_the_plain_one_does(bias):
    torch.manual_seed(0)
    plain = torch.nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    packed = torch.nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    packed.load_state_dict(plain.state_dict())
    assert pack_linears(packed) == 1
    assert isinstance(packed, torch.nn.Linear) and packed.weight.dtype is torch.bfloat16  # PEFT still sees a Linear
    inputs = [torch.randn(1, 96), torch.randn(16, 96), torch.randn(3, 7, 96),
              torch.randn(96, 5).t(),  # not contiguous
              torch.randn(0, 96)]  # no rows
    with torch.inference_mode():
        for x in inputs:
            x = x.to(torch.bfloat16)
            got = packed(x)
            assert got.shape == plain(x).shape and got.dtype is torch.bfloat16
            if x.numel():
                _close(got, plain(x))
    # an input the packed weight cannot take goes to torch's own kernel
    with pytest.raises(RuntimeError):  # as the plain layer, a float32 input against bf16 weights
        packed(torch.randn(2, 96))


def test_only_plain_bf16_cpu_linears_are_packed():
    class Wrapped(torch.nn.Linear):  # stands for bitsandbytes' and other subclasses: left alone
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.bfloat16), torch.nn.Linear(8, 8),
                                Wrapped(8, 8).to(torch.bfloat16), torch.nn.Embedding(4, 8).to(torch.bfloat16))
    assert pack_linears(model) == (1 if cpu_computes_bf16() else 0)
    assert "forward" not in vars(model[1]) and "forward" not in vars(model[2])


def test_auto_dtype_on_the_cpu_follows_a_bf16_checkpoint_only_where_bf16_is_native():
    native = torch.bfloat16 if cpu_computes_bf16() else torch.float32
    assert cpu_dtype(DType.AUTO, torch.bfloat16) is native
    assert cpu_dtype(DType.AUTO, "bfloat16") is native
    assert cpu_dtype(DType.AUTO, torch.float32) is torch.float32
    assert cpu_dtype(DType.AUTO, torch.float16) is torch.float32  # slow on CPUs: loaded as float32
    assert cpu_dtype(DType.AUTO, None) is torch.float32
    assert cpu_dtype(DType.BFLOAT16, torch.float32) is torch.bfloat16  # asked for: given
    assert cpu_dtype(DType.FLOAT16, None) is torch.float32


@pytest.fixture(scope="module")
def bf16_llm(tiny, tmp_path_factory):
    """The tiny Llama saved as a bf16 checkpoint, and a LoRA adapter trained on that base."""
    dest = tmp_path_factory.mktemp("bf16") / "llm-bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny["llm"], dtype=torch.bfloat16)
    model.save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny["llm"] / name).exists():
            (dest / name).write_bytes((tiny["llm"] / name).read_bytes())
    return {"base": dest, "lora": build_tiny("llm-lora", dest.parent / "lora-bf16", base=dest)}


def _logits(loaded, text="The weather today is") -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with loaded.active() as model, torch.inference_mode():
        return model(input_ids=ids).logits[0, -1]


def test_a_bf16_checkpoint_loads_in_bf16_with_packed_layers(bf16_llm, tiny, isolated_env):
    loaded = load_model(ModelSpec(name="m", source=str(bf16_llm["base"])))
    if not cpu_computes_bf16():
        assert loaded.report.dtype == "float32" and loaded.report.kernels == ""
        return
    assert loaded.report.strategy == "bfloat16 on cpu" and loaded.report.dtype == "bfloat16"
    linears = sum(type(m) is torch.nn.Linear for m in loaded.model.modules())
    assert loaded.report.kernels == f"oneDNN packed bf16 linears ({linears})"
    plain = AutoModelForCausalLM.from_pretrained(bf16_llm["base"], dtype=torch.bfloat16).eval()
    ids = loaded.tokenizer("The weather today is", return_tensors="pt").input_ids
    with torch.inference_mode():
        _close(_logits(loaded), plain(input_ids=ids).logits[0, -1])
    # a float32 checkpoint is not touched
    fp32 = load_model(ModelSpec(name="f", source=str(tiny["llm"])))
    assert fp32.report.dtype == "float32" and fp32.report.kernels == ""
    # `modelfleet doctor` plans what the loader does
    plan = inspect_model(ModelSpec(name="m", source=str(bf16_llm["base"])), Settings.from_env(),
                         HubStatus(False, "offline"), [])
    assert plan.strategy == "bfloat16 on cpu"


@needs_bf16
def test_lora_adapters_compute_over_packed_base_layers(bf16_llm, isolated_env):
    from peft import PeftModel

    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(bf16_llm["base"], dtype=torch.bfloat16), bf16_llm["lora"]).eval()
    loaded = load_model(ModelSpec(name="a", source=str(bf16_llm["lora"])))
    assert loaded.report.kernels.startswith("oneDNN packed bf16 linears")
    ids = loaded.tokenizer("The weather today is", return_tensors="pt").input_ids
    with torch.inference_mode():
        want = plain(input_ids=ids).logits[0, -1]
    _close(_logits(loaded), want)

    # attached later to a served (packed) base: the base answers as itself, the adapter as the adapter
    base = load_model(ModelSpec(name="base", source=str(bf16_llm["base"])))
    before = _logits(base)
    adapter = attach_adapter(ModelSpec(name="lora", source=str(bf16_llm["lora"]), base_model="base"), base)
    _close(_logits(adapter), want)
    assert torch.equal(_logits(base), before)
