"""Mixed batches of a VLM's base, an LM-only adapter and a whole-VLM adapter in the decode loop: each row
gets its own adapter in the vision tower and projector too, whatever the images per row.

PEFT's `adapter_names` splits every LoRA layer's input by batch row; the vision tower's batch is the
images. Before `Group.prefill_batches`, a whole-VLM adapter's row with one image next to a base row with
two failed the prefill ("Length of `adapter_names` should be the same as the number of inputs, but got
2 and 3"), and, through peft#3475, left every later call of the shared base failing.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from deployments.decode_loop import DecodeLoop
from deployments.generation import generate_batch
from deployments.params import ChatParams
from deployments.vlm import encode_vlm_chat
from loading import ModelSpec, attach_adapter, load_model
from loading.tiny import build_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    base_dir = build_tiny("vlm", root / "tiny-llava")
    specs = {
        "base": ModelSpec(name="tiny-llava", source=str(base_dir), max_new_tokens=10),
        "lm": ModelSpec(name="lm", source=str(build_tiny("vlm-lora", root / "lm", base=base_dir)),
                        base_model="tiny-llava", max_new_tokens=10),
        "vision": ModelSpec(name="vision", source=str(build_tiny("vlm-vision-lora", root / "vision", base=base_dir)),
                            base_model="tiny-llava", max_new_tokens=10),
    }
    base = load_model(specs["base"])
    return {"base": (specs["base"], base),
            "lm": (specs["lm"], attach_adapter(specs["lm"], base)),
            "vision": (specs["vision"], attach_adapter(specs["vision"], base))}


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), (200, shade, 40)).save(buf, format="PNG")
    return buf.getvalue()


def request(models, name: str, images: int) -> ChatParams:
    content = [{"type": "text", "text": "What is written here?"}] + [{"type": "image"}] * images
    params = ChatParams(model=name, messages=[{"role": "user", "content": content}], max_new_tokens=10,
                        temperature=0, images=[png(60 * i) for i in range(images)])
    params.inputs = encode_vlm_chat(models[name][1], params)
    return params


def alone(models, name: str, images: int) -> str:
    spec, loaded = models[name]
    return generate_batch(spec, loaded, [request(models, name, images)])[0].text


def together(models, jobs: list[tuple[str, int]]) -> tuple[list, dict]:
    """All jobs submitted before the loop runs: they arrive together and share its steps (one length band:
    rows with two images and none differ in length past the default ratio)."""
    stats = {"model_calls": 0, "requests": 0, "largest_batch": 0}
    loop = DecodeLoop(max_rows=8, stats=stats, length_ratio=float("inf"))
    out: dict[int, object] = {}
    for i, (name, images) in enumerate(jobs):
        spec, loaded = models[name]
        loop.submit(spec, loaded, request(models, name, images), lambda result, i=i: out.__setitem__(i, result))
    loop.run()
    return [out[i] for i in range(len(jobs))], stats


@pytest.mark.parametrize("jobs", [
    [("base", 1), ("lm", 1), ("vision", 1)],           # one image per row: rows and images line up
    [("vision", 1), ("base", 2)],                      # they do not: 2 rows, 3 images
    [("vision", 2), ("base", 0), ("lm", 1), ("vision", 1)],
    [("base", 0), ("base", 1), ("lm", 0)],             # rows without images next to rows with one
], ids=["one-image-each", "two-rows-three-images", "mixed", "text-and-image"])
def test_each_row_answers_as_it_does_alone(models, jobs):
    expected = [alone(models, name, images) for name, images in jobs]
    results, stats = together(models, jobs)
    assert [getattr(r, "text", r) for r in results] == expected
    assert stats["largest_batch"] == len(jobs)  # their decode steps were shared


def test_the_same_image_gets_three_answers(models):
    answers = {name: alone(models, name, 1) for name in ("base", "lm", "vision")}
    assert len(set(answers.values())) == 3, answers


def test_a_failed_mixed_step_leaves_the_shared_base_working(models):
    """A forward with per-row adapters that raises (here: a token id past the vocabulary) fails its rows;
    the hooks PEFT leaves behind (peft#3475) are removed, so the next requests answer as before."""
    expected = [alone(models, "lm", 0), alone(models, "base", 0)]
    stats = {"model_calls": 0, "requests": 0, "largest_batch": 0}
    loop = DecodeLoop(max_rows=8, stats=stats)
    out: dict[int, object] = {}
    for i, name in enumerate(("base", "lm")):
        spec, loaded = models[name]
        params = request(models, name, 0)
        params.inputs["input_ids"][0, 0] = 10**6
        loop.submit(spec, loaded, params, lambda result, i=i: out.__setitem__(i, result))
    loop.run()
    assert all(isinstance(out[i], IndexError) for i in range(2)), out
    results, _ = together(models, [("lm", 0), ("base", 0)])
    assert [getattr(r, "text", r) for r in results] == expected
    assert alone(models, "vision", 0) != expected[1]
