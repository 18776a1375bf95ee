"""A VLM chat waiting for memory keeps its processed images counted in the replica's memory gate.

The images are decoded and processed under a hold of their decoded size; the request then grows that
hold to its whole estimate. Before, it let go of the images' hold first, so up to `max_ongoing_requests`
waiting requests each kept processed images (Qwen2-VL's largest: ~300 MB per image) that no budget saw.
"""

from __future__ import annotations

import asyncio
import io

from PIL import Image

from deployments.admission import MB, decoded_image_bytes
from deployments.options import ChatOptions
from deployments.params import ChatParams
from deployments.vlm import VLMServer
from loading import ModelSpec
from loading.tiny import build_tiny


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), (200, 60, 40)).save(buf, format="PNG")
    return buf.getvalue()


def image_chat() -> ChatParams:
    content = [{"type": "text", "text": "What is here?"}, {"type": "image"}]
    return ChatParams(model="tiny-llava", messages=[{"role": "user", "content": content}], max_new_tokens=8,
                      temperature=0, images=[png()], wait_s=60)


def test_a_waiting_image_chat_holds_its_images_and_answers_once_there_is_room(tmp_path):
    spec = ModelSpec(name="tiny-llava", source=str(build_tiny("vlm", tmp_path / "tiny-llava")), max_new_tokens=8)
    server = VLMServer([spec], ChatOptions(memory_budget_mb=1))
    decoded = decoded_image_bytes([png()])

    async def scenario():
        alone = await server.chat(image_chat())
        gate = server.memory
        release = asyncio.Event()

        async def others():  # room for the images, not for the rest of the request's estimate
            async with gate.hold(gate.budget - decoded - 1024, "the others"):
                await release.wait()

        filler = asyncio.ensure_future(others())
        await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(server.chat(image_chat()))
        for _ in range(500):
            if gate.waiting_held:
                break
            await asyncio.sleep(0.01)
        held = (gate.waiting_held, gate.in_use)
        release.set()
        answer = await asyncio.wait_for(waiting, 60)
        await filler
        return alone, answer, held, gate.status()

    alone, answer, held, status = asyncio.run(scenario())
    assert held == (decoded, 1 * MB - 1024)  # the images stay held (and in use) while it waits
    assert answer.text == alone.text and answer.completion_tokens == alone.completion_tokens
    assert status["in_use_mb"] == 0 and status["held_while_waiting_mb"] == 0
