"""Serving a LoRA adapter over the whole VLM (vision tower, projector and language model) next to the base
and an LM-only adapter, all three on one base in one replica, through the official `openai` client.

One app for the module: the demo's VLM entries alone (tiny-llava, tiny-llava-lora, tiny-llava-vision-lora).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_testutil import demo_args, png_data_uri, run_app

VLM_MODELS = ("tiny-llava", "tiny-llava-lora", "tiny-llava-vision-lora")
APP = "visionlora"


@pytest.fixture(scope="module")
def app(serve_url, models_dir):
    from ray import serve

    args = demo_args()
    args["local_models_dir"] = str(models_dir)
    args["models"] = [m for m in args["models"] if m["name"] in VLM_MODELS]
    assert [m["name"] for m in args["models"]] == list(VLM_MODELS)  # the shipped demo serves all three
    args["families"] = {"vlm": args["families"]["vlm"]}
    handle = run_app(serve_url, APP, args)
    handle.wait_for(lambda h: h["status"] == "ok", timeout=120)
    yield handle
    serve.delete(APP)


def ask(app, model: str, color=(200, 30, 30), images: int = 1, text: str = "What does this note say?") -> str:
    content = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": png_data_uri((color[0], color[1] + 40 * i, color[2]))}}
                for i in range(images)]
    reply = app.openai().chat.completions.create(model=model, temperature=0, max_tokens=12,
                                                 messages=[{"role": "user", "content": content}])
    return reply.choices[0].message.content


def test_the_three_share_one_base_and_say_what_each_adapter_touches(app):
    health = app.get("/health").json()["models"]
    pids = {health[name]["replica"]["pid"] for name in VLM_MODELS}
    assert len(pids) == 1, health  # one replica holds all three
    for adapter in ("tiny-llava-lora", "tiny-llava-vision-lora"):
        assert health[adapter]["base"] == "shared with served model 'tiny-llava'", health[adapter]
    assert health["tiny-llava-lora"]["adapter_targets"] == ["language_model"]
    assert health["tiny-llava-vision-lora"]["adapter_targets"] == [
        "language_model", "multi_modal_projector", "vision_tower"]
    assert "adapter_targets" not in health["tiny-llava"]
    cards = {m.id: m.model_extra for m in app.openai().models.list().data}
    assert cards["tiny-llava-vision-lora"]["adapter_targets"] == health["tiny-llava-vision-lora"]["adapter_targets"]
    assert cards["tiny-llava"]["adapter_targets"] is None


def test_the_same_image_gets_a_different_answer_from_each(app):
    answers = {model: ask(app, model) for model in VLM_MODELS}
    assert len(set(answers.values())) == 3, answers
    assert answers == {model: ask(app, model) for model in VLM_MODELS}  # greedy: the same again


def test_concurrent_mixed_requests_answer_as_sequential_ones(app):
    """Base, LM adapter and vision adapter rows with 0, 1 or 2 images each, sent at once so that they
    share the replica's decode steps: each gets exactly its sequential answer."""
    jobs = [(model, images, (40 * k + 20, 30, 200 - 40 * k))
            for k, (model, images) in enumerate([(m, n) for n in (1, 2, 0) for m in VLM_MODELS])]
    sequential = [ask(app, model, color, images) for model, images, color in jobs]
    assert largest_batch(app) == 1  # so far every request ran alone
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(lambda job: ask(app, job[0], job[2], job[1]), jobs))
    assert concurrent == sequential
    assert largest_batch(app) >= 3  # they did share decode steps


def largest_batch(app) -> int:
    return app.get("/health").json()["models"]["tiny-llava"]["replica"]["batching"]["largest_batch"]
