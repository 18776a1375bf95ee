"""The decode loop over bf16 models on the CPU, whose linear layers compute with oneDNN-packed weights
(loading/cpu_kernels.py): an LLM, a LLaVA and its whole-VLM LoRA adapter answer in the loop as
transformers' own `generate` does with the same weights, alone and joined by other rows."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from deployments.decode_loop import DecodeLoop
from deployments.generation import generate_batch
from deployments.llm import LLMServer
from deployments.params import ChatParams
from deployments.vlm import encode_vlm_chat
from loading import ModelSpec, attach_adapter, load_model
from loading.cpu_kernels import cpu_computes_bf16
from loading.tiny import build_tiny

pytestmark = pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU emulates bf16: nothing is packed")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    vlm_dir = build_tiny("vlm", root / "tiny-llava")
    specs = {
        "llm": ModelSpec(name="llm", source=str(build_tiny("llm", root / "tiny-llm")), dtype="bfloat16",
                         max_new_tokens=12),
        "vlm": ModelSpec(name="vlm", source=str(vlm_dir), dtype="bfloat16", max_new_tokens=10),
        "vision": ModelSpec(name="vision", source=str(build_tiny("vlm-vision-lora", root / "vision", base=vlm_dir)),
                            base_model="vlm", max_new_tokens=10),
    }
    llm, vlm = load_model(specs["llm"]), load_model(specs["vlm"])
    loaded = {"llm": llm, "vlm": vlm, "vision": attach_adapter(specs["vision"], vlm)}
    for name in ("llm", "vlm"):
        assert loaded[name].report.dtype == "bfloat16"
        assert loaded[name].report.kernels.startswith("oneDNN packed bf16 linears")
    return {name: (specs[name], loaded[name]) for name in specs}


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), (200, shade, 40)).save(buf, format="PNG")
    return buf.getvalue()


def request(models, name: str, i: int) -> ChatParams:
    spec, loaded = models[name]
    if name == "llm":
        params = ChatParams(model=name, messages=[{"role": "user", "content": f"Request {i}: tell me a story"}],
                            max_new_tokens=12, temperature=0)
        params.inputs = LLMServer.encode(None, loaded, params)  # type: ignore[arg-type]
        return params
    content = [{"type": "text", "text": f"What is written here? ({i})"}, {"type": "image"}]
    params = ChatParams(model=name, messages=[{"role": "user", "content": content}], max_new_tokens=10,
                        temperature=0, images=[png(40 * i)])
    params.inputs = encode_vlm_chat(loaded, params)
    return params


def loop_answers(models, jobs: list[tuple[str, int]]) -> list:
    loop = DecodeLoop(max_rows=8, stats={"model_calls": 0, "requests": 0, "largest_batch": 0})
    out: dict[int, object] = {}
    for k, (name, i) in enumerate(jobs):
        spec, loaded = models[name]
        loop.submit(spec, loaded, request(models, name, i), lambda result, k=k: out.__setitem__(k, result))
    loop.run()
    return [out[k] for k in range(len(jobs))]


@pytest.mark.parametrize("name", ["llm", "vlm", "vision"])
def test_a_row_alone_answers_as_generate_does(models, name):
    spec, loaded = models[name]
    for i in range(3):
        want = generate_batch(spec, loaded, [request(models, name, i)])[0]
        got = loop_answers(models, [(name, i)])[0]
        assert (got.text, got.completion_tokens) == (want.text, want.completion_tokens)


def test_rows_of_three_models_share_the_loop(models):
    jobs = [("llm", 0), ("vlm", 1), ("vision", 2), ("llm", 3), ("vision", 0)]
    results = loop_answers(models, jobs)
    # bf16 rounds differently with the batch around a row, so a batched greedy answer may part from the
    # row's answer alone after some tokens; every row still ends by its own limit with its own text
    for (name, _), result in zip(jobs, results, strict=True):
        assert result.finish_reason in {"stop", "length"}
        assert 0 < result.completion_tokens <= models[name][0].max_new_tokens
