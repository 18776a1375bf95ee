"""On a real GPU (skipped without one; run on a lent device machine by bench/gpu_run.sh): a model goes
whole onto the replica's one GPU, the quantization chain reports each step it tried, and the decode loop
answers there as it does on the CPU.

The CPU suite simulates these (test_placement.py); only a GPU can show that the placement really
holds, and that bitsandbytes' absence or failure is reported, not hidden.
"""

from __future__ import annotations

import pytest
import torch

from deployments.chat_encoding import encode_text_chat
from deployments.decode_loop import DecodeLoop
from deployments.params import ChatParams
from loading import ModelSpec, load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["Hi", "What is the capital of France?", "List three colours.", "Write a haiku about the sea."]


def answers(loaded, prompts: list[str], max_rows: int) -> list[str]:
    """Greedy answers through the decode loop, every prompt submitted before it runs (one batch)."""
    tokenizer = loaded.tokenizer
    loop = DecodeLoop(max_rows=max_rows, stats={"model_calls": 0, "requests": 0, "largest_batch": 0})
    out: dict[int, str] = {}
    spec = ModelSpec(name="m", source=loaded.report.resolved_path, max_new_tokens=12)
    for i, prompt in enumerate(prompts):
        params = ChatParams(model="m", messages=[{"role": "user", "content": prompt}], max_new_tokens=12,
                            temperature=0)
        params.inputs = encode_text_chat(tokenizer, params)
        loop.submit(spec, loaded, params, lambda result, i=i: out.__setitem__(i, result))
    loop.run()
    for result in out.values():
        if isinstance(result, BaseException):
            raise result
    return [out[i].text for i in range(len(prompts))]  # type: ignore[union-attr]


def test_auto_places_the_whole_model_on_cuda_0_and_reports_every_attempt(isolated_env, tiny):
    loaded = load_model(ModelSpec(name="tiny-llm", source=str(tiny["llm"])))
    report = loaded.report
    assert report.device == "cuda:0", report.to_dict()
    assert {str(p.device) for p in loaded.model.parameters()} == {"cuda:0"}
    assert torch.cuda.get_device_name(0) in report.device_reason
    assert report.attempts[-1].outcome == "loaded" and report.attempts[-1].strategy == report.strategy
    for attempt in report.attempts[:-1]:  # 4-bit / 8-bit that did not load say why (e.g. no bitsandbytes)
        assert attempt.outcome in ("failed", "skipped") and attempt.reason, attempt


def test_the_decode_loop_answers_on_the_gpu_as_on_the_cpu(isolated_env, tiny):
    """float32 on both devices: the same greedy answers, alone and batched together."""
    gpu = load_model(ModelSpec(name="tiny-llm", source=str(tiny["llm"]), device="cuda", dtype="float32",
                               quantization="none"))
    cpu = load_model(ModelSpec(name="tiny-llm", source=str(tiny["llm"]), device="cpu"))
    assert gpu.report.device == "cuda:0" and cpu.report.device == "cpu"
    ids = cpu.tokenizer("What is the capital of France?", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # float32 without TF32 (torch's default): the same logits to rounding
        on_cpu, on_gpu = cpu.model(ids).logits, gpu.model(ids.to("cuda:0")).logits.cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=1e-3), (on_cpu - on_gpu).abs().max()
    expected = [answers(cpu, [prompt], 1)[0] for prompt in PROMPTS]
    assert answers(gpu, PROMPTS, len(PROMPTS)) == expected
    assert [answers(gpu, [prompt], 1)[0] for prompt in PROMPTS] == expected


def test_generate_on_the_gpu_finishes_with_the_model_on_one_device(isolated_env, tiny):
    """The multi-GPU `device_map="auto"` hang cannot happen: every weight is on cuda:0, so generate()
    never waits on a second device."""
    loaded = load_model(ModelSpec(name="tiny-llm", source=str(tiny["llm"])))
    tokenizer = loaded.tokenizer
    inputs = tokenizer("Hello", return_tensors="pt").to("cuda:0")
    out = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[-1] > inputs["input_ids"].shape[-1]
    assert {str(p.device) for p in loaded.model.parameters()} == {"cuda:0"}
